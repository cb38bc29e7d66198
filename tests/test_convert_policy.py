"""Conversion keeps what it reads; one safety policy for convert, verify and head; resume skips the done prefix."""

from __future__ import annotations

import collections
import json
import os
import shutil

import numpy as np
import pytest
from objcases import obj_array

import npystream
from npystream import CastError, FormatError, UnsafePickleError
from npystream.cli import main
from npystream.conversion import convert, describe_source
from npystream.verification import equal, verify


def _leftovers(folder):
    return sorted(n for n in os.listdir(folder) if "npystream-tmp" in n)


# ---------------------------------------------------------------------------
# Python 2 files: encoding / fix_imports everywhere


@pytest.fixture
def py2(tmp_path, numpy_testdata):
    path = tmp_path / "py2-objarr.npy"
    shutil.copy(numpy_testdata / "py2-objarr.npy", path)
    return path


def test_python2_file_converts_and_verifies(py2, tmp_path):
    want = np.load(py2, allow_pickle=True, encoding="latin1")
    with pytest.raises(FormatError, match="encoding='latin1'"):
        convert(py2, tmp_path / "a.ragged", kind="object")
    assert not (tmp_path / "a.ragged").exists() and _leftovers(tmp_path) == []
    res = convert(py2, tmp_path / "a.ragged", kind="object", encoding="latin1")
    assert res.elements == 4
    got = list(npystream.open(tmp_path / "a.ragged"))
    assert all(equal(g, w) for g, w in zip(got, want.flat, strict=True))
    assert verify(py2, tmp_path / "a.ragged", encoding="latin1").equal
    with pytest.raises(FormatError, match="encoding"):
        verify(py2, tmp_path / "a.ragged")
    # and back to an object .npy, then convert --verify in one go
    convert(tmp_path / "a.ragged", tmp_path / "b.npy")
    assert verify(py2, tmp_path / "b.npy", encoding="latin1").equal
    convert(py2, tmp_path / "c.ragged", encoding="latin1", verify=True)
    with pytest.raises(ValueError, match="codec"):
        convert(py2, tmp_path / "d.ragged", encoding="no-such-codec")
    with pytest.raises(TypeError, match="fix_imports"):
        verify(py2, py2, fix_imports="yes")


def test_python2_file_through_the_cli(py2, tmp_path, capsys):
    out = tmp_path / "a.ragged"
    assert main(["convert", str(py2), str(out), "--kind", "object"]) == 1
    assert "--encoding latin1" in capsys.readouterr().err
    assert main(["convert", str(py2), str(out), "--encoding", "latin1", "--kind", "object", "-q"]) == 0
    assert main(["verify", str(py2), str(out), "--encoding", "latin1"]) == 0
    assert capsys.readouterr().out.strip() == "equal: 4 elements"
    assert main(["head", str(py2), "--encoding", "latin1"]) == 0
    assert "builtins.range" in capsys.readouterr().out


def test_allow_global_spelled_one_way_with_the_old_alias(tmp_path, capsys):
    path = tmp_path / "od.npy"
    np.save(path, obj_array([collections.OrderedDict(a=1), collections.OrderedDict(b=2)]))
    for cmd in (["head", str(path)], ["verify", str(path), str(path)],
                ["convert", str(path), str(tmp_path / "x.ragged"), "-q"]):
        assert main(cmd) == 1
        assert "collections.OrderedDict" in capsys.readouterr().err
        for flag in ("--allow-global", "--allow"):
            assert main([*cmd, flag, "collections.OrderedDict", "--overwrite"] if cmd[0] == "convert"
                        else [*cmd, flag, "collections.OrderedDict"]) == 0, capsys.readouterr().err
    # the ragged store's pickled elements are read back under the same allow-list
    assert verify(path, tmp_path / "x.ragged", allowed_globals=["collections.OrderedDict"]).equal
    with pytest.raises(UnsafePickleError, match="OrderedDict"):
        verify(path, tmp_path / "x.ragged")
    assert main(["verify", str(path), str(tmp_path / "x.ragged"), "--trusted"]) == 0


# ---------------------------------------------------------------------------
# conversion keeps each element's type and value


@pytest.mark.parametrize("items", [
    [[1, 2], [3], []],                                              # lists: never ndarrays
    [np.float32(1.5), np.int64(3), np.datetime64("2020-01-01")],    # numpy scalars: never 0-d arrays
    [np.array(2.5, dtype="<f4"), np.array(1, dtype="<f4")],         # 0-d arrays stay 0-d arrays
    [{"a": 1}, (1, 2), None, 3, 2.5, "s", b"b"],
    [np.array([{"a": 1}], dtype=object), np.arange(2)],             # an object ndarray: pickled
    ["a", "bc"],
    [b"a", b""],
], ids=["lists", "scalars", "arrays-0d", "mixed", "object-array", "str", "bytes"])
def test_conversion_keeps_types(tmp_path, items):
    src = tmp_path / "in.npy"
    np.save(src, obj_array(items))
    loaded = np.load(src, allow_pickle=True)
    res = convert(src, tmp_path / "out.ragged", verify=True)
    assert res.elements == len(items)
    got = list(npystream.RaggedArray(tmp_path / "out.ragged"))
    for g, w in zip(got, loaded.flat, strict=True):
        assert equal(g, w), (g, w)
    convert(tmp_path / "out.ragged", tmp_path / "back.npy")
    back = np.load(tmp_path / "back.npy", allow_pickle=True)
    assert all(equal(g, w) for g, w in zip(back.flat, loaded.flat, strict=True))


@pytest.mark.parametrize("odd", [[1, 2], np.float32(1.0), np.arange(2, dtype="<f8"), "s"],
                         ids=["list", "numpy-scalar", "other-dtype", "str"])
def test_an_element_the_store_would_change_is_refused(tmp_path, capsys, odd):
    src = tmp_path / "in.npy"
    np.save(src, obj_array([np.arange(3, dtype="<f4"), np.arange(2, dtype="<f4"), odd]))
    with pytest.raises(CastError, match="--kind object") as info:
        convert(src, tmp_path / "out.ragged")
    assert info.value.index == 2
    assert not (tmp_path / "out.ragged").exists() and _leftovers(tmp_path) == []
    assert main(["convert", str(src), str(tmp_path / "out.ragged")]) == 1
    err = capsys.readouterr().err
    assert "element 2" in err and "--kind object" in err
    assert not (tmp_path / "out.ragged").exists() and _leftovers(tmp_path) == []
    assert main(["convert", str(src), str(tmp_path / "out.ragged"), "--kind", "object", "--verify", "-q"]) == 0
    assert verify(src, tmp_path / "out.ragged").equal


def test_lists_file_from_the_issue(tmp_path, capsys):
    """`convert lists.npy lists.ragged` then `verify`: both keep a list a list and a scalar a scalar."""
    src = tmp_path / "lists.npy"
    np.save(src, obj_array([[1, 2, 3], [4], np.float32(2.5), np.arange(2)]))
    assert main(["convert", str(src), str(tmp_path / "lists.ragged"), "-q"]) == 0
    assert main(["verify", str(src), str(tmp_path / "lists.ragged")]) == 0
    r = npystream.open(tmp_path / "lists.ragged")
    assert type(r[0]) is list and type(r[2]) is np.float32 and type(r[3]) is np.ndarray


def test_verify_uses_the_strict_rule(tmp_path):
    """A ragged store of 0-d arrays is not the numpy scalars it may have come from."""
    src = tmp_path / "s.npy"
    np.save(src, obj_array([np.float32(1.5), np.float32(2.5)]))
    npystream.save_ragged(tmp_path / "zero_d.ragged", [np.array(1.5, "f4"), np.array(2.5, "f4")])
    res = verify(src, tmp_path / "zero_d.ragged")
    assert not res.equal and res.index == 0 and "float32" in res.message


def test_failed_verify_leaves_no_dst(tmp_path, monkeypatch):
    import npystream.verification as verification

    src = tmp_path / "a.npy"
    np.save(src, obj_array([np.arange(3), np.arange(2)]))
    monkeypatch.setattr(verification, "equal", lambda a, b: False)  # a conversion that reads back wrong
    with pytest.raises(FormatError, match="verification failed"):
        convert(src, tmp_path / "out.ragged", verify=True)
    assert not (tmp_path / "out.ragged").exists() and _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------
# --resume skips what is done without decoding it


def test_resume_does_not_decode_the_done_prefix(tmp_path, monkeypatch):
    """Elements 0-3 hold a refused global: a resumed run after them never decodes them, so it succeeds."""
    from npystream._atomic import temp_name
    from npystream.formats import pickle_walk

    items = [collections.OrderedDict(a=i) for i in range(4)] + [np.arange(i, dtype="<f4") for i in range(30)]
    src = tmp_path / "a.npy"
    np.save(src, obj_array(items))
    dst = tmp_path / "o.ragged"
    partial = temp_name(str(dst), "partial")
    npystream.save_ragged(partial, [np.arange(2, dtype="<f4")] * 4)  # what a killed run left
    with open(partial + ".json", "w") as f:
        json.dump(dict(describe_source(str(src)).identity, kind=None, cast=None), f)
    runs = []
    real = pickle_walk._IndexedReader.run

    def spy(self, a, b, ends=None):
        runs.append(a)
        return real(self, a, b, ends)

    monkeypatch.setattr(pickle_walk._IndexedReader, "run", spy)
    res = convert(src, dst, resume=True)
    assert res.resumed_from == 4 and res.elements == 34
    assert runs and min(runs) == 4
    r = npystream.RaggedArray(dst)
    assert all(equal(r[4 + i], items[4 + i]) for i in range(30))
