"""Ragged store <-> pyarrow / awkward round trips (skipped when the library is missing)."""

from __future__ import annotations

import numpy as np
import pytest

from npystream.errors import UnsupportedError
from npystream.formats.ragged import RaggedArray, save_ragged


def _elems(dtype="<f4", n=50, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.random(int(k)).astype(dtype) for k in rng.integers(0, 20, size=n)]


def _same_list(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        x = np.asarray(x)
        y = np.asarray(y)
        assert x.shape == y.shape and np.array_equal(x, y)


# --------------------------------------------------------------------------- pyarrow


@pytest.mark.parametrize("dtype", ["<f4", "<i8", "<u2", ">f8", "|b1"])
def test_to_arrow_round_trip(tmp_path, dtype):
    pa = pytest.importorskip("pyarrow")
    elems = _elems(dtype)
    r = save_ragged(tmp_path / "a.ragged", elems, durable=False)
    arr = r.to_arrow()
    assert isinstance(arr, pa.LargeListArray) and len(arr) == len(elems)
    _same_list(elems, arr.to_pylist())
    for view, exp in [(r[5:30], elems[5:30]), (r[::3], elems[::3]), (r[::-1], elems[::-1])]:
        _same_list(exp, view.to_arrow().to_pylist())
    back = save_ragged(tmp_path / "b.ragged", arr, durable=False)
    assert back.dtype == np.dtype(dtype).newbyteorder("=")
    _same_list(elems, list(back))


def test_to_arrow_is_zero_copy(tmp_path):
    pytest.importorskip("pyarrow")
    r = save_ragged(tmp_path / "z.ragged", _elems(), durable=False)
    arr = r.to_arrow()
    assert arr.values.buffers()[1].address == r.values.ctypes.data
    assert arr.buffers()[1].address == np.asarray(r._st.offsets_np).ctypes.data
    v = r[10:20].to_arrow()
    assert v.values.buffers()[1].address == r.values.ctypes.data  # the same mapped values


def test_arrow_strings_bytes_scalars(tmp_path):
    pa = pytest.importorskip("pyarrow")
    texts = ["héllo", "", "中文", "x"]
    r = save_ragged(tmp_path / "s.ragged", texts)
    a = r.to_arrow()
    assert a.type == pa.large_string() and a.to_pylist() == texts
    assert r[1:3].to_arrow().to_pylist() == texts[1:3]
    assert list(save_ragged(tmp_path / "s2.ragged", pa.array(texts))) == texts
    assert list(save_ragged(tmp_path / "s3.ragged", a[1:])) == texts[1:]
    blobs = [b"\x00", b"", b"abc"]
    r = save_ragged(tmp_path / "b.ragged", blobs)
    assert r.to_arrow().type == pa.large_binary() and r.to_arrow().to_pylist() == blobs
    assert list(save_ragged(tmp_path / "b2.ragged", pa.array(blobs, pa.binary()))) == blobs
    r = save_ragged(tmp_path / "0.ragged", [np.float32(1), np.float32(2.5)])
    assert r.to_arrow().to_pylist() == [1.0, 2.5]


def test_arrow_input_variants_and_refusals(tmp_path):
    pa = pytest.importorskip("pyarrow")
    chunked = pa.chunked_array([pa.array([[1, 2], [3]]), pa.array([[], [4, 5, 6]])])
    r = save_ragged(tmp_path / "c.ragged", chunked)
    assert [x.tolist() for x in r] == [[1, 2], [3], [], [4, 5, 6]]
    sliced = pa.array([[1, 2], [3], [4, 5]], pa.large_list(pa.int32()))[1:]
    r = save_ragged(tmp_path / "sl.ragged", sliced)
    assert [x.tolist() for x in r] == [[3], [4, 5]] and r.dtype == np.int32
    with pytest.raises(UnsupportedError, match="nulls"):
        save_ragged(tmp_path / "n.ragged", pa.array([[1], None]))
    with pytest.raises(UnsupportedError, match="not a list"):
        save_ragged(tmp_path / "p.ragged", pa.array([1, 2]))
    with pytest.raises(UnsupportedError, match="nested"):
        save_ragged(tmp_path / "d.ragged", pa.array([[[1]], [[2, 3]]]))
    nd = save_ragged(tmp_path / "nd.ragged", [np.ones((2, 2))])
    with pytest.raises(UnsupportedError, match="ndim"):
        nd.to_arrow()
    ob = save_ragged(tmp_path / "o.ragged", [{"a": 1}], kind="object")
    with pytest.raises(UnsupportedError):
        ob.to_arrow()
    # appending arrow data to an existing store checks the dtype like any element
    with pytest.raises(TypeError):
        save_ragged(tmp_path / "c.ragged", pa.array([[1.5]]), mode="a")
    assert len(RaggedArray(tmp_path / "c.ragged")) == 4


# --------------------------------------------------------------------------- awkward


@pytest.mark.parametrize("dtype", ["<f4", "<i8", ">i4"])
def test_to_awkward_round_trip(tmp_path, dtype):
    ak = pytest.importorskip("awkward")
    elems = _elems(dtype)
    r = save_ragged(tmp_path / "a.ragged", elems, durable=False)
    arr = r.to_awkward()
    assert isinstance(arr, ak.Array) and len(arr) == len(elems)
    _same_list(elems, arr.to_list())
    _same_list(elems[3:9], r[3:9].to_awkward().to_list())
    _same_list(elems[::4], r[::4].to_awkward().to_list())
    back = save_ragged(tmp_path / "b.ragged", arr, durable=False)
    _same_list(elems, list(back))


def test_to_awkward_is_zero_copy(tmp_path):
    ak = pytest.importorskip("awkward")
    r = save_ragged(tmp_path / "z.ragged", _elems(), durable=False)
    arr = r.to_awkward()
    data = np.asarray(arr.layout.content.data)
    assert data.ctypes.data == r.values.ctypes.data
    assert ak.sum(arr) == pytest.approx(float(np.asarray(r.values, dtype=np.float64).sum()), rel=1e-5)


def test_awkward_strings_nd_and_refusals(tmp_path):
    ak = pytest.importorskip("awkward")
    texts = ["a", "", "ünï"]
    r = save_ragged(tmp_path / "s.ragged", texts)
    assert r.to_awkward().to_list() == texts
    assert list(save_ragged(tmp_path / "s2.ragged", ak.Array(texts))) == texts
    blobs = [b"a", b""]
    assert save_ragged(tmp_path / "b.ragged", blobs).to_awkward().to_list() == blobs
    nd = [np.arange(6.0).reshape(2, 3), np.zeros((0, 3)), np.ones((1, 3))]
    r = save_ragged(tmp_path / "nd.ragged", nd)
    arr = r.to_awkward()
    assert arr.to_list() == [x.tolist() for x in nd]
    back = save_ragged(tmp_path / "nd2.ragged", arr)
    assert back.ndim == 2
    _same_list(nd, list(back))
    reg = ak.to_regular(ak.Array([[[1, 2], [3, 4]], [[5, 6]]]), axis=2)
    back = save_ragged(tmp_path / "reg.ragged", reg)
    assert [x.tolist() for x in back] == [[[1, 2], [3, 4]], [[5, 6]]]
    bad = save_ragged(tmp_path / "bad.ragged", [np.ones((2, 3)), np.ones((2, 4))])
    with pytest.raises(UnsupportedError, match="inner"):
        bad.to_awkward()
    with pytest.raises(UnsupportedError):
        save_ragged(tmp_path / "opt.ragged", ak.Array([[1, None], [2]]))
    with pytest.raises(UnsupportedError):
        save_ragged(tmp_path / "flat.ragged", ak.Array([1, 2, 3]))
