"""Ragged store: round trips (numpy is the oracle), views, appends, errors."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst

import npystream
from npystream.errors import (
    CastError,
    FormatError,
    NpyStreamError,
    StoreNotFoundError,
    TruncatedError,
    UnsafePickleError,
    UnsupportedError,
)
from npystream.formats.ragged import RaggedArray, RaggedWriter, save_ragged

DTYPES = [
    "<f4", ">f4", "<f8", ">i8", "<i2", "u1", "|b1", "<c16", ">c8", "<f2",
    "<M8[ns]", ">m8[s]", "<U5", ">U3", "|S4", "|V3",
    [("a", "<i4"), ("b", ">f8", (2,))],
]


def _random(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    if dtype.kind == "b":
        raw = raw % 2
    if dtype.kind == "U":
        raw = np.zeros_like(raw)  # valid code points
        arr = np.frombuffer(raw.tobytes(), dtype=dtype).reshape(shape).copy()
        flat = arr.reshape(-1)
        for j in range(flat.size):
            flat[j] = "ab\u00e9\u4e2d"[: j % 4]
        return arr
    return np.frombuffer(raw.tobytes(), dtype=dtype).reshape(shape).copy()


def _elements(dtype: np.dtype, ndim: int, n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if ndim == 0:
            shape: tuple[int, ...] = ()
        else:
            shape = tuple(int(x) for x in rng.integers(0, 4, size=ndim))
            if i == 1:
                shape = (0,) + shape[1:]  # an empty element
        out.append(_random(rng, dtype, shape))
    return out


def _same(a: np.ndarray, b: np.ndarray) -> None:
    assert isinstance(b, np.ndarray)
    assert b.dtype == a.dtype and b.dtype.str == a.dtype.str
    assert b.shape == a.shape
    assert b.tobytes() == np.ascontiguousarray(a).tobytes()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ndim", [0, 1, 2, 3])
def test_round_trip_every_dtype_and_ndim(tmp_path, dtype, ndim):
    dt = np.dtype(dtype)
    elems = _elements(dt, ndim, 7)
    p = tmp_path / "x.ragged"
    r = save_ragged(p, iter(elems), durable=False)
    assert len(r) == 7 and r.dtype == dt and r.ndim == ndim and r.kind == "array"
    for a, b in zip(elems, r):
        _same(a, b)
    for i in range(-7, 7):
        _same(elems[i], r[i])
        assert not r[i].flags.writeable
    assert r.shapes.shape == (7, ndim)
    assert [tuple(s) for s in r.shapes] == [a.shape for a in elems]
    # parts are plain .npy that numpy opens on its own
    vals = np.load(p / "values.npy", mmap_mode="r")
    offs = np.load(p / "offsets.npy", mmap_mode="r")
    assert vals.dtype.str == dt.str if dt.names is None else vals.dtype == dt
    assert offs.tolist() == np.cumsum([0] + [a.size for a in elems]).tolist()
    flat = b"".join(np.ascontiguousarray(a).tobytes() for a in elems)
    assert vals.tobytes() == flat
    if ndim >= 2:
        assert np.load(p / "shapes.npy").tolist() == [list(a.shape) for a in elems]
    else:
        assert not (p / "shapes.npy").exists()
    with open(p / "values.npy", "rb") as fh:
        assert np.lib.format.read_magic(fh) in ((1, 0), (2, 0), (3, 0))
    # values start 64-byte aligned in every part
    for part in ("values.npy", "offsets.npy"):
        h = npystream.read_header(p / part)
        assert h.data_offset % 64 == 0


def test_fortran_and_noncontiguous_input(tmp_path):
    a = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    b = np.arange(40, dtype="<i4").reshape(5, 8)[::2, 1::3]
    r = save_ragged(tmp_path / "f.ragged", [a, a.T], durable=False)
    np.testing.assert_array_equal(r[0], a)
    np.testing.assert_array_equal(r[1], a.T)
    assert r[0].flags.c_contiguous
    r = save_ragged(tmp_path / "n.ragged", [b, b[:0]], durable=False)
    np.testing.assert_array_equal(r[0], b)
    assert r[1].shape == (0, 3)


def test_zero_and_one_element_stores(tmp_path):
    r = save_ragged(tmp_path / "z.ragged", [], dtype="<i2")
    assert len(r) == 0 and r.dtype == np.dtype("<i2") and list(r) == []
    assert r.lengths.tolist() == [] and r.values.size == 0 and r.offsets.tolist() == [0]
    assert list(r.iter_batches(3)) == []
    with pytest.raises(IndexError):
        r[0]
    r = save_ragged(tmp_path / "e.ragged", [])
    assert len(r) == 0 and r.dtype == np.float64  # nothing to infer from: numpy's default
    r = save_ragged(tmp_path / "o.ragged", [np.array([1.5, 2.5], ">f8")])
    assert len(r) == 1 and r[0].tolist() == [1.5, 2.5] and r[-1].dtype.str == ">f8"
    r = save_ragged(tmp_path / "oe.ragged", [np.array([], "<f4")])
    assert len(r) == 1 and r[0].shape == (0,)


def test_str_bytes_object_round_trip(tmp_path):
    texts = ["", "héllo", "中文", "a" * 10000, "\x00nul"]
    r = save_ragged(tmp_path / "s.ragged", texts)
    assert r.kind == "str" and list(r) == texts and r[1] == "héllo"
    assert r.lengths.tolist() == [len(t.encode()) for t in texts]
    blobs = [b"", b"\x00\xff", bytes(range(256)) * 50]
    r = save_ragged(tmp_path / "b.ragged", blobs)
    assert r.kind == "bytes" and list(r) == blobs and isinstance(r[0], bytes)
    objs = [{"a": [1, 2]}, None, np.arange(5.0), (1, "x", 2.5j), {1, 2}, np.float32(3)]
    r = save_ragged(tmp_path / "o.ragged", objs, kind="object")
    out = list(r)
    assert out[0] == objs[0] and out[1] is None and out[3] == objs[3] and out[4] == objs[4]
    np.testing.assert_array_equal(out[2], objs[2])
    assert out[5] == objs[5] and type(out[5]) is np.float32


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_object_safe_mode_refuses_unknown_globals(tmp_path):
    p = tmp_path / "o.ragged"
    save_ragged(p, [1, _Evil()], kind="object")
    r = RaggedArray(p)
    assert r[0] == 1
    with pytest.raises(UnsafePickleError) as info:
        r[1]
    assert "system" in str(info.value) and info.value.index == 1
    # a class defined in a module is refused too, and allowed with safe=False
    save_ragged(p, [_Plain(3)], kind="object")
    with pytest.raises(UnsafePickleError):
        RaggedArray(p)[0]
    assert RaggedArray(p, safe=False)[0].x == 3


class _Plain:
    def __init__(self, x):
        self.x = x


def test_append_across_sessions(tmp_path):
    p = tmp_path / "a.ragged"
    expect = []
    for session in range(4):
        with RaggedWriter(p, mode="a", durable=False) as w:
            assert len(w) == len(expect) and w.committed == len(expect)
            for j in range(session + 2):
                x = np.arange(session * 10 + j, dtype="<i4")
                w.append(x)
                expect.append(x)
    r = RaggedArray(p)
    assert len(r) == len(expect)
    for a, b in zip(expect, r):
        _same(a, b)
    # appending a wrong dtype to an existing store is refused, naming the element
    with RaggedWriter(p, mode="a") as w:
        with pytest.raises(CastError) as info:
            w.append(np.zeros(2, "<f8"))
        assert info.value.index == len(expect)
        w.append(np.zeros(2, "<i4"))
    assert len(RaggedArray(p)) == len(expect) + 1


def test_extend_with_small_buffer_commits_in_pieces(tmp_path):
    p = tmp_path / "b.ragged"
    elems = [np.arange(i % 37, dtype="<f8") for i in range(500)] + [np.arange(3000.0)]
    with RaggedWriter(p, durable=False, buffer_size=1000) as w:
        w.extend(elems)
        w.append(np.arange(5000.0))  # bigger than the buffer: written directly
    r = RaggedArray(p)
    assert len(r) == 502
    for a, b in zip(elems, r):
        _same(a, b)
    _same(np.arange(5000.0), r[-1])


def test_views_and_indexing(tmp_path):
    elems = _elements(np.dtype("<i8"), 1, 20, seed=3)
    r = save_ragged(tmp_path / "v.ragged", elems, durable=False)
    for sl in [slice(None), slice(2, 9), slice(None, None, 3), slice(15, 2, -2), slice(-5, None),
               slice(None, None, -1), slice(5, 5), slice(30, 40)]:
        v = r[sl]
        exp = elems[sl]
        assert isinstance(v, RaggedArray) and len(v) == len(exp)
        for a, b in zip(exp, v):
            _same(a, b)
        for i in range(-len(exp), len(exp)):
            _same(exp[i], v[i])
        assert v.lengths.tolist() == [a.size for a in exp]
        assert v.nbytes == sum(a.nbytes for a in exp)
        vv = v[1::2]
        for a, b in zip(exp[1::2], vv):
            _same(a, b)
        with pytest.raises(IndexError):
            v[len(exp)]
    got = r[[3, -1, 0]]
    assert isinstance(got, list) and len(got) == 3
    _same(elems[-1], got[1])
    mask = np.arange(20) % 4 == 0
    got = r[mask]
    assert len(got) == 5
    _same(elems[8], got[2])
    _same(elems[4], r[np.int64(4)])
    with pytest.raises(IndexError):
        r[np.ones(3, bool)]
    with pytest.raises(TypeError):
        r[1, 2]
    with pytest.raises(TypeError):
        r[1.5]
    with pytest.raises(IndexError):
        r[20]
    with pytest.raises(IndexError):
        r[-21]
    # values/offsets of views (step 1) are consistent with the elements
    v = r[4:11]
    vals, offs = v.values, v.offsets
    assert offs[0] == 0 and len(offs) == 8
    for j in range(7):
        _same(elems[4 + j], np.asarray(vals[offs[j] : offs[j + 1]]))
    assert isinstance(r.values, np.memmap) and isinstance(r.offsets, np.memmap)
    with pytest.raises(UnsupportedError):
        _ = r[::2].values
    assert "RaggedArray(" in repr(r) and "len=20" in repr(r) and "[4:11:1]" in repr(v)
    # pickling a view reopens the store
    for sl in (slice(3, 15, 4), slice(None, None, -1), slice(12, None, -5), slice(4, 4)):
        v2 = pickle.loads(pickle.dumps(r[sl]))
        assert len(v2) == len(elems[sl])
        for a, b in zip(elems[sl], v2):
            _same(a, b)


def test_iter_batches_reduceat(tmp_path):
    rng = np.random.default_rng(5)
    elems = [rng.random(int(n), dtype=np.float32) for n in rng.integers(1, 50, size=300)]
    r = save_ragged(tmp_path / "b.ragged", elems, durable=False)
    expect = np.array([e.sum(dtype=np.float64) for e in elems])
    for view, exp in [(r, expect), (r[10:250], expect[10:250]), (r[::7], expect[::7])]:
        sums = []
        for vals, offs in view.iter_batches(64):
            assert offs[0] == 0 and offs[-1] == len(vals)
            sums.append(np.add.reduceat(vals.astype(np.float64), offs[:-1]))
        np.testing.assert_allclose(np.concatenate(sums), exp, rtol=1e-12)
    with pytest.raises(ValueError):
        next(r.iter_batches(0))


def test_open_dispatches_directory(tmp_path):
    p = tmp_path / "d.ragged"
    save_ragged(p, [np.arange(3)])
    r = npystream.open(p)
    assert isinstance(r, npystream.RaggedArray) and r[0].tolist() == [0, 1, 2]


@settings(max_examples=60, deadline=None)
@given(
    hst.lists(hst.lists(hst.integers(-(2**31), 2**31 - 1), max_size=20), max_size=30),
    hst.sampled_from(["<i4", ">i4", "<i8", ">f8"]),
)
def test_hypothesis_round_trip(tmp_path_factory, data, dtype):
    p = tmp_path_factory.mktemp("h") / "h.ragged"
    elems = [np.array(x, dtype=dtype) for x in data]
    r = save_ragged(p, elems, dtype=dtype, durable=False, buffer_size=64)
    assert len(r) == len(elems)
    for a, b in zip(elems, r):
        _same(a, b)
    assert r.lengths.tolist() == [len(x) for x in data]


# --------------------------------------------------------------------------- errors


def test_mismatched_elements_raise_cast_error_naming_index(tmp_path):
    p = tmp_path / "m.ragged"
    with RaggedWriter(p, durable=False) as w:
        w.append(np.zeros(3, "<f4"))
        with pytest.raises(CastError) as info:
            w.append(np.zeros(3, "<f8"))
        assert info.value.index == 1 and "'<f8'" in str(info.value) and "cast=" in str(info.value)
        with pytest.raises(CastError, match="byte|'>f4'"):
            w.append(np.zeros(3, ">f4"))  # byte order is never changed silently
        with pytest.raises(CastError, match="ndim"):
            w.append(np.zeros((2, 2), "<f4"))
        with pytest.raises(CastError, match="kind='str'"):
            w.append("text")
        with pytest.raises(CastError, match="kind='object'"):
            w.append([1, "a", None])
        w.append(np.ones(2, "<f4"))  # the writer is still usable after refusals
    r = RaggedArray(p)
    assert len(r) == 2 and r[1].tolist() == [1.0, 1.0]
    # casting is allowed only when asked for, by numpy's rules
    with RaggedWriter(p, dtype="<f4", cast="same_kind", durable=False) as w:
        w.append(np.arange(3, dtype="<f8"))
        w.append(np.arange(2, dtype=">f4"))
        with pytest.raises(CastError):
            w.append(np.array([1 + 2j]))
    r = RaggedArray(p)
    assert r[0].dtype.str == "<f4" and r[1].tolist() == [0.0, 1.0]
    with RaggedWriter(tmp_path / "s.ragged", kind="str") as w, pytest.raises(CastError):
        w.append(b"bytes")
    with RaggedWriter(tmp_path / "b.ragged", kind="bytes") as w, pytest.raises(CastError):
        w.append("str")
    with pytest.raises(CastError, match="kind='object'"):
        RaggedWriter(tmp_path / "o.ragged", dtype=object)
    with pytest.raises(CastError, match="kind='object'"):
        save_ragged(tmp_path / "o2.ragged", [np.array([None, 1])])


def test_writer_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        RaggedWriter(tmp_path / "x", mode="r")
    with pytest.raises(ValueError, match="kind"):
        RaggedWriter(tmp_path / "x", kind="list")
    with pytest.raises(ValueError, match="cast"):
        RaggedWriter(tmp_path / "x", cast="maybe")
    p = tmp_path / "x.ragged"
    save_ragged(p, [np.arange(2)])
    with pytest.raises(FileExistsError):
        RaggedWriter(p, mode="x")
    import gc

    gc.disable()  # a refused writer must drop its lock itself, not when collected
    try:
        with pytest.raises(CastError, match="dtype"):
            RaggedWriter(p, mode="a", dtype="<f4")
        with pytest.raises(CastError, match="kind"):
            RaggedWriter(p, mode="a", kind="str")
        w = RaggedWriter(p, mode="a")
    finally:
        gc.enable()
    with pytest.raises(NpyStreamError, match="another RaggedWriter"):
        RaggedWriter(p, mode="a")
    with pytest.raises(NpyStreamError, match="another RaggedWriter"):
        RaggedWriter(p, mode="w")
    w.close()
    w.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        w.append(np.arange(2))
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(FileExistsError):
        RaggedWriter(tmp_path / "file")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a ragged store"):
        RaggedWriter(tmp_path / "dir", mode="w")
    assert (tmp_path / "dir" / "precious.txt").read_text() == "keep"
    with pytest.raises(FileNotFoundError):
        save_ragged(tmp_path / "no" / "such" / "x.ragged", [np.arange(2)])


def test_mode_w_replaces_and_x_creates(tmp_path):
    p = tmp_path / "r.ragged"
    save_ragged(p, [np.arange(5)])
    old = RaggedArray(p)
    save_ragged(p, ["new"], mode="w")
    assert RaggedArray(p)[0] == "new"
    assert old[0].tolist() == [0, 1, 2, 3, 4]  # an open reader keeps its snapshot
    save_ragged(tmp_path / "x.ragged", [b"1"], mode="x")
    assert sorted(os.listdir(tmp_path)) == ["r.ragged", "x.ragged"]  # no temp dirs left


def test_missing_store_raises_and_creates_nothing(tmp_path):
    p = tmp_path / "missing.ragged"
    with pytest.raises(StoreNotFoundError) as info:
        RaggedArray(p)
    assert isinstance(info.value, FileNotFoundError) and "missing.ragged" in str(info.value)
    with pytest.raises(FileNotFoundError):
        npystream.open(p)
    assert not p.exists() and os.listdir(tmp_path) == []


def _store(tmp_path, elems=None, **kw):
    p = tmp_path / "c.ragged"
    save_ragged(p, elems if elems is not None else [np.arange(4.0), np.arange(3.0)], **kw)
    return p


def test_not_a_store(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    with pytest.raises(FormatError, match="is a file"):
        RaggedArray(tmp_path / "f")
    (tmp_path / "d").mkdir()
    with pytest.raises(FormatError, match="meta.json is missing"):
        RaggedArray(tmp_path / "d")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: "{not json", "not valid JSON"),
        (lambda m: json.dumps([1, 2]), "expected an object"),
        (lambda m: json.dumps({**m, "format": "other"}), "'format'"),
        (lambda m: json.dumps({**m, "version": 0}), "'version'"),
        (lambda m: json.dumps({**m, "count": -1}), "'count'"),
        (lambda m: json.dumps({**m, "count": "2"}), "'count'"),
        (lambda m: json.dumps({**m, "kind": "list"}), "'kind'"),
        (lambda m: json.dumps({**m, "dtype": "<zz"}), "not a numpy dtype"),
        (lambda m: json.dumps({**m, "dtype": "<f4"}), "dtype"),
        (lambda m: json.dumps({**m, "nitems": 5}), "nitems|offsets"),
        (lambda m: json.dumps({**m, "ndim": 2}), "shapes.npy|dimension"),
        (lambda m: json.dumps({**m, "kind": "str"}), "'\\|u1'"),
    ],
)
def test_corrupt_meta_is_a_format_error(tmp_path, edit, match):
    p = _store(tmp_path)
    meta = json.loads((p / "meta.json").read_text())
    (p / "meta.json").write_text(edit(meta))
    with pytest.raises(FormatError, match=match):
        RaggedArray(p)


def test_newer_version_is_unsupported(tmp_path):
    p = _store(tmp_path)
    meta = json.loads((p / "meta.json").read_text())
    (p / "meta.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(UnsupportedError, match="upgrade"):
        RaggedArray(p)


def test_count_beyond_parts_is_truncated_error(tmp_path):
    p = _store(tmp_path)
    meta = json.loads((p / "meta.json").read_text())
    (p / "meta.json").write_text(json.dumps({**meta, "count": 50, "nitems": 7}))
    with pytest.raises(TruncatedError):
        RaggedArray(p)


@pytest.mark.parametrize("part", ["values.npy", "offsets.npy", "shapes.npy"])
def test_every_truncation_of_a_part_is_a_clear_error(tmp_path, part):
    elems = [np.ones((2, 3), "<f4"), np.zeros((1, 3), "<f4")]
    p = _store(tmp_path, elems)
    data = (p / part).read_bytes()
    for cut in list(range(0, 140, 7)) + [len(data) - 1]:
        (p / part).write_bytes(data[:cut])
        with pytest.raises(FormatError):
            RaggedArray(p)
    (p / part).unlink()
    with pytest.raises(FormatError, match="missing"):
        RaggedArray(p)


def test_corrupted_parts_are_format_errors(tmp_path):
    p = _store(tmp_path)
    good = (p / "offsets.npy").read_bytes()
    hdr = npystream.read_header(p / "offsets.npy").data_offset
    bad = bytearray(good)
    bad[hdr + 8 : hdr + 16] = np.array([9], "<i8").tobytes()  # offsets go 9 -> 7: decreasing
    (p / "offsets.npy").write_bytes(bytes(bad))
    with pytest.raises(FormatError, match="decrease|offsets"):
        RaggedArray(p)
    assert len(RaggedArray(p, validate=False)) == 2  # the O(n) check is what found it
    bad = bytearray(good)
    bad[hdr : hdr + 8] = np.array([1], "<i8").tobytes()
    (p / "offsets.npy").write_bytes(bytes(bad))
    with pytest.raises(FormatError, match="offsets\\[0\\]"):
        RaggedArray(p)
    (p / "offsets.npy").write_bytes(good.replace(b"'<i8'", b"'>i8'"))
    with pytest.raises(FormatError, match="dtype"):
        RaggedArray(p)
    (p / "offsets.npy").write_bytes(good.replace(b"False", b"True "))
    with pytest.raises(FormatError, match="Fortran"):
        RaggedArray(p)
    (p / "offsets.npy").write_bytes(b"\x93NUMPX" + good[6:])
    with pytest.raises(FormatError, match="magic"):
        RaggedArray(p)
    (p / "offsets.npy").write_bytes(good.replace(b"'descr'", b"'dexcr'"))
    with pytest.raises(FormatError, match="bad .npy header"):
        RaggedArray(p)
    (p / "offsets.npy").write_bytes(good)
    assert len(RaggedArray(p)) == 2
    # a shapes row that disagrees with the offsets
    p2 = tmp_path / "nd.ragged"
    save_ragged(p2, [np.ones((2, 3)), np.ones((1, 3))])
    sh = bytearray((p2 / "shapes.npy").read_bytes())
    off = npystream.read_header(p2 / "shapes.npy").data_offset
    sh[off : off + 8] = np.array([5], "<i8").tobytes()
    (p2 / "shapes.npy").write_bytes(bytes(sh))
    with pytest.raises(FormatError, match="shapes\\[0\\]"):
        RaggedArray(p2)


def test_invalid_utf8_and_pickle_are_format_errors(tmp_path):
    p = _store(tmp_path, ["ab", "cd"])
    data = bytearray((p / "values.npy").read_bytes())
    data[-1] = 0xFF
    (p / "values.npy").write_bytes(bytes(data))
    r = RaggedArray(p)
    assert r[0] == "ab"
    with pytest.raises(FormatError) as info:
        r[1]
    assert info.value.index == 1
    p = tmp_path / "o.ragged"
    save_ragged(p, [1, 2], kind="object")
    data = bytearray((p / "values.npy").read_bytes())
    data[-1] = 0x00  # break the STOP opcode
    (p / "values.npy").write_bytes(bytes(data))
    with pytest.raises(FormatError):
        RaggedArray(p)[1]


def test_writer_exception_in_with_keeps_prefix(tmp_path):
    p = tmp_path / "e.ragged"
    with pytest.raises(RuntimeError), RaggedWriter(p) as w:
        w.append(np.arange(3))
        raise RuntimeError("boom")
    assert RaggedArray(p)[0].tolist() == [0, 1, 2]


def test_uncommitted_tail_is_dropped_on_resume(tmp_path):
    p = _store(tmp_path, [np.arange(3.0)])
    # simulate an interrupted write: garbage after the committed data of every part
    for part in ("values.npy", "offsets.npy"):
        with open(p / part, "ab") as fh:
            fh.write(b"\xab" * 50)
    r = RaggedArray(p)
    assert len(r) == 1 and r[0].tolist() == [0.0, 1.0, 2.0]
    with RaggedWriter(p, mode="a") as w:
        assert len(w) == 1
        w.append(np.arange(2.0))
    r = RaggedArray(p)
    assert [x.tolist() for x in r] == [[0.0, 1.0, 2.0], [0.0, 1.0]]
    assert np.load(p / "values.npy").tolist() == [0.0, 1.0, 2.0, 0.0, 1.0]
    assert np.load(p / "offsets.npy").tolist() == [0, 3, 5]


def test_commits_are_visible_to_readers_before_close(tmp_path):
    p = tmp_path / "f.ragged"
    with RaggedWriter(p, dtype="<i2", durable=False, buffer_size=256, commit_bytes=1024) as w:
        for i in range(100):
            w.append(np.full(20, i, "<i2"))  # 40 bytes each
        seen = len(RaggedArray(p))
        assert w.committed == seen and 0 < seen < 100  # committed every ~1 KiB, not at the end
        assert len(w) == 100
        w.flush()
        assert w.committed == 100 and len(RaggedArray(p)) == 100
        w.append(np.zeros(3, "<i2"))
        assert len(RaggedArray(p)) == 100  # buffered, not yet committed
    r = RaggedArray(p)
    assert len(r) == 101 and r[57].tolist() == [57] * 20


def test_docs_carry_the_layout_spec_verbatim():
    import npystream.formats.ragged as mod

    doc = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "ragged.md")
    if not os.path.exists(doc):  # pragma: no cover - docs are not shipped in sdists
        pytest.skip("docs/ragged.md not present")
    with open(doc, encoding="utf-8") as fh:
        text = fh.read()
    assert mod.__doc__.strip() in text


@settings(max_examples=50, deadline=None)
@given(
    hst.integers(0, 3),
    hst.sampled_from(["<f8", ">i2", "|u1", "<c8"]),
    hst.lists(hst.lists(hst.integers(0, 3), min_size=3, max_size=3), max_size=25),
    hst.sampled_from([8, 64, 1 << 20]),
    hst.tuples(hst.none() | hst.integers(-30, 30), hst.none() | hst.integers(-30, 30),
               hst.none() | hst.integers(-4, 4).filter(lambda k: k != 0)),
)
def test_hypothesis_nd_views(tmp_path_factory, ndim, dtype, dims, buffer_size, sl):
    dt = np.dtype(dtype)
    elems = [np.arange(int(np.prod(d[:ndim])), dtype=dt).reshape(tuple(d[:ndim])) for d in dims]
    p = tmp_path_factory.mktemp("hn") / "h.ragged"
    with RaggedWriter(p, dtype=dt, durable=False, buffer_size=buffer_size,
                      commit_bytes=buffer_size) as w:
        for e in elems:
            w.append(e)
    r = RaggedArray(p)
    view, exp = r[slice(*sl)], elems[slice(*sl)]
    assert len(view) == len(exp)
    for a, b in zip(exp, view):
        _same(a, b)
    assert [tuple(s) for s in view.shapes] == [a.shape for a in exp]
    assert view.lengths.tolist() == [a.size for a in exp]
    copy = save_ragged(p.parent / "copy.ragged", view, durable=False)  # bulk path
    assert copy.ndim == r.ndim and len(copy) == len(exp)
    assert r.ndim == (ndim if elems else 1)  # an empty store has nothing to learn ndim from
    for a, b in zip(exp, copy):
        _same(a, b)


def test_bulk_and_single_appends_keep_order(tmp_path):
    src = save_ragged(tmp_path / "src.ragged", [np.arange(k, dtype="<i4") for k in range(10)])
    p = tmp_path / "mix.ragged"
    with RaggedWriter(p, durable=False, buffer_size=64, commit_bytes=64) as w:
        w.append(np.array([100, 101], "<i4"))  # buffered
        w.extend(src[3:7])  # bulk: must land after the buffered element
        w.append(np.array([200], "<i4"))
        w.extend(src[::-3])
    r = RaggedArray(p)
    expect = [[100, 101]] + [list(range(k)) for k in range(3, 7)] + [[200]] + \
        [list(range(k)) for k in range(9, -1, -3)]
    assert [x.tolist() for x in r] == expect
    with pytest.raises(CastError):
        with RaggedWriter(p, mode="a") as w:
            w.extend(save_ragged(tmp_path / "f.ragged", [np.ones(2)]))
    with pytest.raises(CastError):
        with RaggedWriter(p, mode="a") as w:
            w.extend(save_ragged(tmp_path / "s.ragged", ["a"]))
    assert len(RaggedArray(p)) == len(expect)


def test_object_kind_uses_the_object_streams_allow_list(tmp_path):
    from collections import OrderedDict

    p = tmp_path / "od.ragged"
    save_ragged(p, [OrderedDict(a=1), np.arange(3), np.dtype(">f4"), np.float16(2)], kind="object")
    r = RaggedArray(p)
    with pytest.raises(UnsafePickleError, match="collections.OrderedDict") as info:
        r[0]
    assert info.value.index == 0
    np.testing.assert_array_equal(r[1], np.arange(3))  # numpy's own callables are checked, allowed
    assert r[2] == np.dtype(">f4") and r[3] == np.float16(2)
    r = RaggedArray(p, allowed_globals=["collections.OrderedDict"])
    assert r[0] == OrderedDict(a=1)
    assert pickle.loads(pickle.dumps(r))[0] == OrderedDict(a=1)  # the allowance survives pickling
    assert RaggedArray(p, safe=False)[0] == OrderedDict(a=1)
    assert npystream.open(p, trusted=True)[0] == OrderedDict(a=1)
    with pytest.raises(UnsafePickleError):
        npystream.open(p, trusted=False)[0]


def test_masked_arrays_are_refused_and_subclasses_accepted(tmp_path):
    p = tmp_path / "m.ragged"
    with RaggedWriter(p, durable=False) as w:
        w.append(np.arange(3.0))
        with pytest.raises(CastError, match="masked"):
            w.append(np.ma.masked_array([1.0, 2.0], mask=[0, 1]))
        mm = np.lib.format.open_memmap(tmp_path / "src.npy", mode="w+", dtype="<f8", shape=(4,))
        mm[:] = [1, 2, 3, 4]
        w.append(mm[1:3])  # np.memmap is an ndarray subclass: fine
    assert [x.tolist() for x in RaggedArray(p)] == [[0.0, 1.0, 2.0], [2.0, 3.0]]
    with pytest.raises(CastError, match="masked"):
        save_ragged(tmp_path / "m2.ragged", [np.ma.masked_array([1.0], mask=[1])])


def test_io_error_mid_write_keeps_last_commit_and_blocks_the_writer(tmp_path, monkeypatch):
    import errno as _errno

    import npystream.formats.ragged as mod

    p = tmp_path / "full.ragged"
    real = os.pwrite
    calls = {"n": 0}

    def failing(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 12:
            raise OSError(_errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    w = RaggedWriter(p, dtype="<i8", durable=False, buffer_size=64, commit_bytes=64)
    monkeypatch.setattr(mod.os, "pwrite", failing)
    with pytest.raises(OSError, match="space"):
        for i in range(1000):
            w.append(np.full(3, i, "<i8"))
    with pytest.raises(NpyStreamError, match="mode='a'"):
        w.append(np.zeros(3, "<i8"))
    w.close()  # releases the store without another write attempt
    monkeypatch.setattr(mod.os, "pwrite", real)
    r = RaggedArray(p)
    n = len(r)
    assert 0 < n < 1000 and all(r[i].tolist() == [i] * 3 for i in range(n))
    with RaggedWriter(p, mode="a") as w2:
        assert len(w2) == n
        w2.append(np.full(3, n, "<i8"))
    assert RaggedArray(p)[-1].tolist() == [n] * 3


def test_describe_store(tmp_path):
    import json as _json

    from npystream.formats.ragged import describe_store

    p = tmp_path / "d.ragged"
    save_ragged(p, [np.ones((2, 3), ">f4"), np.ones((0, 3), ">f4")])
    d = describe_store(p)
    assert _json.loads(_json.dumps(d)) == d
    assert (d["kind"], d["dtype"], d["ndim"], d["count"], d["nitems"], d["nbytes"]) == \
        ("array", ">f4", 2, 2, 6, 24)
    assert d["min_length"] == 0 and d["max_length"] == 6
    assert set(d["parts"]) == {"meta.json", "values.npy", "offsets.npy", "shapes.npy"}
    assert d["parts"]["values.npy"] == npystream.read_header(p / "values.npy").data_offset + 24
    e = describe_store(save_ragged(tmp_path / "e.ragged", [], kind="str").path)
    assert e["count"] == 0 and "min_length" not in e and e["kind"] == "str"
    with pytest.raises(StoreNotFoundError):
        describe_store(tmp_path / "nope.ragged")


def test_module_doctests(tmp_path, monkeypatch):
    import doctest

    import npystream.formats.ragged as mod

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # the examples' mkdtemp() land here
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 10 and result.failed == 0


def _rss_anon() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_writer_memory_is_bounded_whatever_the_size(tmp_path):
    import gc
    import threading
    import time

    block = np.arange(16384, dtype="<f4")  # 64 KiB, reused: append must copy it

    def gen(n):
        for i in range(n):
            block[0] = i
            yield block

    gc.collect()
    base = _rss_anon()
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_anon() - base)
            time.sleep(0.001)

    t = threading.Thread(target=sample)
    t.start()
    try:
        r = save_ragged(tmp_path / "big.ragged", gen(4096), durable=False)  # 256 MiB
    finally:
        stop.set()
        t.join()
    assert len(r) == 4096 and r.nbytes == 256 << 20
    assert [int(r[i][0]) for i in (0, 1, 2047, 4095)] == [0, 1, 2047, 4095]
    assert peak[0] < 24 << 20, f"peak anonymous memory grew by {peak[0] >> 20} MiB"


def test_failure_before_the_first_element_creates_nothing(tmp_path, monkeypatch):
    import npystream.formats.ragged as mod

    p = tmp_path / "n.ragged"
    with pytest.raises(CastError):
        save_ragged(p, [np.array([None, 1])])
    with pytest.raises(RuntimeError), RaggedWriter(p, dtype="<f4"):
        raise RuntimeError("before any element")
    assert os.listdir(tmp_path) == []
    # an interrupt inside the store's creation: no store, no retry from close(), no leftovers
    real = os.rename
    monkeypatch.setattr(mod.os, "rename", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    w = RaggedWriter(p)
    with pytest.raises(KeyboardInterrupt):
        w.append(np.arange(3))
    w.close()
    monkeypatch.setattr(mod.os, "rename", real)
    assert os.listdir(tmp_path) == []
    # an old store survives a replacement that failed before its first element
    save_ragged(p, [np.arange(2)])
    with pytest.raises(CastError), RaggedWriter(p, mode="w", kind="array") as w:
        w.append("not an array")
    assert [x.tolist() for x in RaggedArray(p)] == [[0, 1]]


def test_store_directory_gets_the_umask_mode_not_mkdtemp_0700(tmp_path):
    """A store is a directory others may need to read: its mode follows the umask, like mkdir's."""
    import stat

    old = os.umask(0o027)
    try:
        save_ragged(tmp_path / "a.ragged", [np.arange(3.0)])
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.ragged").st_mode) == 0o750
    save_ragged(tmp_path / "b.ragged", [np.arange(3.0)])
    assert stat.S_IMODE(os.stat(tmp_path / "b.ragged").st_mode) == 0o777 & ~old


def test_creation_sweeps_what_killed_creators_left(tmp_path):
    """`.NAME.tmp-*` / `.NAME.old-*` directories whose creator's flock is free and that are older
    than _STALE_AGE are removed when NAME is created again; live, young and foreign ones stay."""
    import fcntl
    import time

    def leftover(name, age=60.0, inner="values.npy"):
        d = tmp_path / name
        d.mkdir()
        (d / inner).write_bytes(b"x" * 100)
        os.utime(d, (time.time() - age, time.time() - age))
        return d

    dead_tmp = leftover(".s.ragged.tmp-abc123")
    dead_old = leftover(".s.ragged.old-def456", inner="old")  # a replaced store, half deleted
    young = leftover(".s.ragged.tmp-young1", age=0.0)
    live = leftover(".s.ragged.tmp-live01")
    other = leftover(".t.ragged.tmp-other1")  # another store's
    plain = leftover("s.ragged.tmp-notours")  # not hidden: not ours
    os.symlink(dead_tmp, tmp_path / ".s.ragged.tmp-link01")
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a creator at work (this process, another descriptor)
    try:
        with RaggedWriter(tmp_path / "s.ragged", dtype="<f4") as w:
            w.append(np.ones(3, "<f4"))
        left = set(os.listdir(tmp_path))
    finally:
        os.close(fd)
    assert not dead_tmp.exists() and not dead_old.exists()
    assert young.exists() and live.exists() and other.exists() and plain.exists()
    assert ".s.ragged.tmp-link01" in left  # a symlink is never followed nor removed
    assert "s.ragged" in left and len(RaggedArray(tmp_path / "s.ragged")) == 1


def test_writer_holds_the_lock_from_creation(tmp_path):
    """The lock taken on the hidden directory is the store's writer lock once it is renamed."""
    p = tmp_path / "s.ragged"
    with RaggedWriter(p, dtype="<f4") as w:
        w.append(np.ones(3, "<f4"))
        with pytest.raises(NpyStreamError, match="another RaggedWriter"):
            RaggedWriter(p, mode="a")
        with pytest.raises(NpyStreamError, match="another RaggedWriter"):
            RaggedWriter(p, mode="w")
    with RaggedWriter(p, mode="a") as w2:
        w2.append(np.ones(2, "<f4"))
    assert len(RaggedArray(p)) == 2


@pytest.mark.parametrize("buffer_size", [8, 64, 1 << 20])
def test_text_stores_fast_path_matches_and_reports_bad_elements(tmp_path, buffer_size):
    """str/bytes stores (append()'s text hot path): the same store as element-by-element slow
    appends, any buffer size; an unencodable str or a wrong type is a CastError naming the index,
    and the elements before it are kept."""
    from npystream.errors import CastError

    words = ["", "a", "é" * 40, "naïve", "x" * 100, "日本語"] * 20
    p = tmp_path / "s.ragged"
    with RaggedWriter(p, kind="str", buffer_size=buffer_size, durable=False) as w:
        for s in words:
            w.append(s)
        with pytest.raises(CastError) as info:
            w.append("bad \ud800 surrogate")
        assert info.value.index == len(words)
        with pytest.raises(CastError):
            w.append(b"bytes in a str store")
        w.append("after")
    r = RaggedArray(p)
    assert list(r) == [*words, "after"]
    raw = [s.encode() for s in words]
    q = tmp_path / "b.ragged"
    with RaggedWriter(q, kind="bytes", buffer_size=buffer_size, durable=False) as w:
        for i, b in enumerate(raw):
            w.append(b if i % 3 else bytearray(b))  # bytes take the hot path, bytearrays the slow one
        w.append(memoryview(b"mv"))
    assert list(RaggedArray(q)) == [*raw, b"mv"]
