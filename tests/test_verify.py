"""verify: streaming element-by-element comparison; the first difference; exit codes."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest

from npystream.cli import main
from npystream.errors import UnsupportedError
from npystream.formats.objwriter import save_objects
from npystream.formats.ragged import save_ragged
from npystream.verification import describe, equal, verify


def _arrays(n=50, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(int(k)).astype(np.float32) for k in rng.integers(0, 100, n)]


def test_fixed_files_equal_and_one_row_differs(tmp_path, capsys):
    a = np.arange(40, dtype="<i4").reshape(10, 4)
    np.save(tmp_path / "a.npy", a)
    b = a.copy()
    b[7, 2] += 1
    np.save(tmp_path / "b.npy", b)
    assert verify(tmp_path / "a.npy", tmp_path / "a.npy").equal
    res = verify(tmp_path / "a.npy", tmp_path / "b.npy")
    assert not res and res.index == 7 and "element 7 differs" in res.message
    assert main(["verify", str(tmp_path / "a.npy"), str(tmp_path / "b.npy")]) == 1
    assert "element 7" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "a.npy"), str(tmp_path / "a.npy")]) == 0
    assert capsys.readouterr().out.strip() == "equal: 10 elements"


def test_ragged_vs_fixed_rows_and_gzip(tmp_path):
    a = np.arange(12, dtype="<f8").reshape(3, 4)
    np.save(tmp_path / "a.npy", a)
    with open(tmp_path / "a.npy", "rb") as f, gzip.open(tmp_path / "a.npy.gz", "wb") as g:
        shutil.copyfileobj(f, g)
    save_ragged(tmp_path / "r.ragged", list(a))
    assert verify(tmp_path / "r.ragged", tmp_path / "a.npy").equal
    assert verify(tmp_path / "a.npy.gz", tmp_path / "r.ragged").count == 3


def test_one_element_difference_between_object_npy_and_ragged(tmp_path):
    els = _arrays()
    save_ragged(tmp_path / "r.ragged", els)
    bad = [x.copy() for x in els]
    bad[31][-1] = np.nextafter(bad[31][-1], np.float32(np.inf)) if len(bad[31]) else 0
    save_objects(tmp_path / "bad.npy", bad)
    save_objects(tmp_path / "good.npy", els)
    # the object .npy sides are read with ragged's reader on the other end
    res = verify(tmp_path / "r.ragged", tmp_path / "r.ragged")
    assert res.equal and res.count == 50
    pytest.importorskip("npystream.objects")
    assert verify(tmp_path / "good.npy", tmp_path / "r.ragged").equal
    res = verify(tmp_path / "r.ragged", tmp_path / "bad.npy")
    assert not res.equal and res.index == 31


def test_length_difference(tmp_path):
    save_ragged(tmp_path / "a.ragged", [np.arange(3)] * 4)
    save_ragged(tmp_path / "b.ragged", [np.arange(3)] * 3)
    res = verify(tmp_path / "a.ragged", tmp_path / "b.ragged")
    assert not res.equal and res.index == 3 and "B ends after 3 elements" in res.message


def test_dtype_and_shape_differences_named(tmp_path):
    save_ragged(tmp_path / "a.ragged", [np.arange(3, dtype="<f4")])
    save_ragged(tmp_path / "b.ragged", [np.arange(3, dtype="<f8")])
    res = verify(tmp_path / "a.ragged", tmp_path / "b.ragged")
    assert "dtype=<f4" in res.message and "dtype=<f8" in res.message
    save_ragged(tmp_path / "c.ragged", [np.arange(4, dtype="<f4")])
    assert "shape=(4,)" in verify(tmp_path / "a.ragged", tmp_path / "c.ragged").message


def test_whole_npz_refused(tmp_path, capsys):
    np.savez(tmp_path / "a.npz", x=np.arange(3))
    with pytest.raises(UnsupportedError, match="ARCHIVE.npz:MEMBER"):
        verify(tmp_path / "a.npz", tmp_path / "a.npz")
    assert verify(f"{tmp_path / 'a.npz'}:x", tmp_path / "a.npz:x").equal
    assert main(["verify", str(tmp_path / "a.npz"), str(tmp_path / "a.npz")]) == 1
    assert main(["verify", str(tmp_path / "nope.npy"), str(tmp_path / "a.npz:x")]) == 1
    assert main(["verify", "only-one"]) == 2


@pytest.mark.parametrize("a,b,same", [
    (np.array([np.nan, 1.0]), np.array([np.nan, 1.0]), True),
    (np.array([1.0]), np.array([1.0], dtype=">f8"), False),
    (np.arange(3), [0, 1, 2], False),
    (1, 1.0, False),
    (float("nan"), float("nan"), True),
    ({"a": [1, np.arange(2)]}, {"a": [1, np.arange(2)]}, True),
    ({"a": [1, np.arange(2)]}, {"a": [1, np.arange(3)]}, False),
    ((1, "x"), (1, "x"), True),
    (np.float32(1.5), np.array(1.5, dtype=np.float32), False),  # a numpy scalar is not a 0-d array
    (np.float32(1.5), np.float32(1.5), True),
    ([1, 2], (1, 2), False),
    (np.float32(1.5), np.array(1.5, dtype=np.float64), False),
    (np.float32(1.5), np.array([1.5], dtype=np.float32), False),
    (np.array([{"a": 1}], dtype=object), np.array([{"a": 2}], dtype=object), False),
    (np.zeros(2, dtype=[("a", "<i4")]), np.zeros(2, dtype=[("a", "<i4")]), True),
    (np.array(["2020-01-01", "NaT"], dtype="M8[D]"), np.array(["2020-01-01", "NaT"], dtype="M8[D]"), True),
])
def test_equal(a, b, same):
    assert equal(a, b) is same
    assert equal(b, a) is same


def test_describe():
    assert describe(np.zeros((2, 3), ">f4")) == "ndarray shape=(2, 3) dtype=>f4"
    assert describe("x" * 100).startswith("str len=100 'xxx")
    assert len(describe("x" * 100)) < 80


def test_module_doctests():
    import doctest

    import npystream.formats.objwriter as objwriter
    import npystream.verification as verification

    for mod in (objwriter, verification):
        res = doctest.testmod(mod)
        assert res.attempted > 0 and res.failed == 0, (mod.__name__, res)
