"""Fixed-dtype .npy: npystream.open / iter_batches against np.load over the whole matrix."""

from __future__ import annotations

import gzip
import io
import os
import sys
import threading
import tracemalloc
import warnings
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import npystream
from npystream.errors import (
    FormatError,
    NotSeekableError,
    NpyStreamError,
    TruncatedError,
    UnsupportedError,
)
from npystream.formats.fixed import open_npy
from npystream.formats.npy import read_header
from npystream.sources import open_source

# Every dtype numpy saves without pickling.  Multi-byte kinds are tried in both byte orders.
ALIGNED = np.dtype({"names": ["a", "b", "c"], "formats": ["u1", "<f8", "<i2"]}, align=True)
PADDED = np.dtype({"names": ["x", "y"], "formats": ["<i4", "u1"], "offsets": [0, 8], "itemsize": 16})
DTYPES: dict[str, np.dtype] = {
    "bool": np.dtype("?"),
    "i1": np.dtype("i1"), "u1": np.dtype("u1"),
    "i2": np.dtype("<i2"), "u2": np.dtype("<u2"),
    "i4": np.dtype("<i4"), "u4": np.dtype("<u4"),
    "i8": np.dtype("<i8"), "u8": np.dtype("<u8"),
    "f2": np.dtype("<f2"), "f4": np.dtype("<f4"), "f8": np.dtype("<f8"),
    "longdouble": np.dtype(np.longdouble).newbyteorder("<"),
    "c8": np.dtype("<c8"), "c16": np.dtype("<c16"),
    "clongdouble": np.dtype(np.clongdouble).newbyteorder("<"),
    "M8[ns]": np.dtype("<M8[ns]"), "M8[D]": np.dtype("<M8[D]"), "M8[Y]": np.dtype("<M8[Y]"),
    "m8[s]": np.dtype("<m8[s]"), "m8[us]": np.dtype("<m8[us]"),
    "S5": np.dtype("S5"), "U7": np.dtype("<U7"), "V6": np.dtype("V6"),
    "struct": np.dtype([("a", "<i4"), ("b", "<f8")]),
    "nested": np.dtype([("p", [("x", "<f4"), ("y", "<f4")]), ("tag", "S3")]),
    "aligned": ALIGNED,
    "padded": PADDED,
    "subarray": np.dtype([("m", "<f4", (2, 3)), ("k", "<i2")]),
    "unicode_names": np.dtype([("\u512a", "<f4"), ("é", "<i2")]),
    "mixed_order": np.dtype([("le", "<i4"), ("be", ">i4")]),
}
SHAPES = [(), (0,), (3, 0), (7,), (4, 3), (2, 3, 4)]
VERSIONS = [(1, 0), (2, 0), (3, 0)]


def _random(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """Arbitrary bytes as an array: np.save writes them raw, np.load reads them raw."""
    n = int(np.prod(shape)) * dtype.itemsize
    arr = np.frombuffer(rng.bytes(n), dtype=np.uint8)
    if dtype.itemsize == 0:
        return np.zeros(shape, dtype)
    return arr.view(dtype).reshape(shape).copy()


def _save(path: os.PathLike | str, arr: np.ndarray, version: tuple[int, int]) -> None:
    with open(path, "wb") as f, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.lib.format.write_array(f, arr, version=version)


def assert_same(got: np.ndarray, ref: np.ndarray) -> None:
    """Same shape, same dtype (byte order included), same order flags, same bytes."""
    assert got.shape == ref.shape
    assert got.dtype == ref.dtype
    assert got.dtype.descr == ref.dtype.descr
    assert got.flags.f_contiguous == ref.flags.f_contiguous
    assert got.flags.c_contiguous == ref.flags.c_contiguous
    assert got.tobytes(order="A") == ref.tobytes(order="A")


def _orders_dtypes():
    for name, dt in DTYPES.items():
        orders = ["<", ">"] if any(
            (f.itemsize > 1 and f.kind not in "SV") for f in _leaf_dtypes(dt)
        ) else ["="]
        for bo in orders:
            yield pytest.param(name, bo, id=f"{name}{bo}")


def _leaf_dtypes(dt: np.dtype):
    if dt.fields:
        for sub, *_ in dt.fields.values():
            yield from _leaf_dtypes(sub)
    elif dt.subdtype:
        yield from _leaf_dtypes(dt.subdtype[0])
    else:
        yield dt


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: f"v{v[0]}")
@pytest.mark.parametrize(("name", "byteorder"), list(_orders_dtypes()))
def test_open_matches_np_load(tmp_path, name, byteorder, version):
    dtype = DTYPES[name]
    if byteorder != "=":
        dtype = dtype.newbyteorder(byteorder) if name != "mixed_order" else dtype
    if name == "unicode_names" and version != (3, 0):
        pytest.skip("non-latin-1 field names need format 3.0")
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        for order in "CF":
            arr = _random(rng, dtype, shape)
            if order == "F":
                if arr.ndim < 2:
                    continue
                arr = np.asfortranarray(arr)
            path = tmp_path / f"a{len(shape)}{order}.npy"
            _save(path, arr, version)
            ref = np.load(path)
            got = npystream.open(path)
            assert isinstance(got, np.memmap), (shape, order)
            assert not got.flags.writeable
            assert_same(got, ref)
            h = read_header(path)
            assert h.version == version
            fortran = arr.flags.f_contiguous and not arr.flags.c_contiguous  # numpy's rule
            assert (h.shape, h.fortran_order, h.pickled) == (ref.shape, fortran, False)
            # and streamed: concatenating the blocks gives the array back
            with open(path, "rb") as f:
                raw = f.read()
            if ref.ndim == 0:
                blocks = list(npystream.iter_batches(io.BytesIO(raw), 2))
                assert len(blocks) == 1
                assert_same(blocks[0], ref)
                continue
            axis = -1 if fortran else 0
            blocks = list(npystream.iter_batches(io.BytesIO(raw), 2, axis=axis))
            assert len(blocks) == -(-ref.shape[axis] // 2)
            for k, block in enumerate(blocks):
                part = ref[2 * k : 2 * k + 2] if axis == 0 else ref[..., 2 * k : 2 * k + 2]
                assert_same(block, part)


def test_subarray_dtype_like_numpy(tmp_path):
    arr = np.zeros((4,), dtype=np.dtype(("<i4", (3,))))  # numpy folds it into shape (4, 3)
    np.save(tmp_path / "s.npy", arr)
    ref = np.load(tmp_path / "s.npy")
    got = npystream.open(tmp_path / "s.npy")
    assert_same(got, ref)
    assert got.shape == (4, 3)


@pytest.mark.parametrize("mode", ["r", "r+", "c", "readonly", "readwrite", "copyonwrite"])
def test_modes(tmp_path, mode):
    path = tmp_path / "m.npy"
    ref = np.arange(12, dtype=">i4").reshape(3, 4)
    np.save(path, ref)
    m = npystream.open(path, mode=mode)
    assert isinstance(m, np.memmap)
    assert_same(np.asarray(m), np.load(path))
    canonical = {"readonly": "r", "readwrite": "r+", "copyonwrite": "c"}.get(mode, mode)
    if canonical == "r":
        assert not m.flags.writeable
        with pytest.raises(ValueError):
            m[0, 0] = 5
        return
    m[1, 2] = -7
    m.flush()
    del m
    expected = ref.copy()
    if canonical == "r+":
        expected[1, 2] = -7
    assert_same(np.load(path), expected)


def test_bad_mode(tmp_path):
    np.save(tmp_path / "m.npy", np.arange(3))
    for mode in ("w+", "w", "rb", 1):
        with pytest.raises(ValueError, match="'r', 'r\\+' or 'c'"):
            npystream.open(tmp_path / "m.npy", mode=mode)


def test_open_file_object_and_offset(tmp_path):
    """A file object positioned at the second of two concatenated arrays (np.load reads it so)."""
    first, second = np.arange(5, dtype="<f4"), np.arange(6, dtype=">i2").reshape(2, 3)
    path = tmp_path / "two.npy"
    with open(path, "wb") as f:
        np.save(f, first)
        np.save(f, second)
    with open(path, "rb") as f:
        assert_same(npystream.open(f), first)
        f.seek(len(_npy_bytes(first)))
        got = npystream.open(f)
        assert_same(got, second)
        assert not f.closed  # a caller's file object is never closed


def test_open_fd_only_file_object(tmp_path):
    """A file object with a descriptor but no usable path (os.fdopen): mapped through the fd."""
    path = tmp_path / "fd.npy"
    np.save(path, np.arange(10.0))
    fd = os.open(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        got = npystream.open(f)
        assert isinstance(got, np.memmap)
        assert_same(got, np.load(path))


def test_open_bytes_gives_view(tmp_path):
    buf = io.BytesIO()
    np.save(buf, np.arange(6, dtype="<u2").reshape(2, 3))
    data = buf.getvalue()
    got = npystream.open(data)
    assert_same(got, np.arange(6, dtype="<u2").reshape(2, 3))
    assert not got.flags.writeable
    cow = npystream.open(data, mode="c")
    cow[0, 0] = 9
    assert cow[0, 0] == 9 and got[0, 0] == 0
    with pytest.raises(UnsupportedError, match="r\\+"):
        npystream.open(data, mode="r+")


def test_truncated_data_raises_at_open(tmp_path):
    path = tmp_path / "t.npy"
    np.save(path, np.arange(100, dtype="<f8"))
    raw = path.read_bytes()
    header = read_header(path)
    for cut in (header.data_offset, header.data_offset + 1, len(raw) - 8, len(raw) - 1):
        path.write_bytes(raw[:cut])
        with pytest.raises(TruncatedError) as info:
            npystream.open(path)
        err = info.value
        assert isinstance(err, FormatError) and isinstance(err, EOFError)
        assert err.path == str(path)
        assert err.offset == cut
        assert "800" in str(err) and "truncated" in str(err)


@pytest.mark.parametrize("mode", ["r", "r+", "c"])
def test_truncated_file_is_never_grown(tmp_path, mode):
    """np.load(mmap_mode='r+') pads a truncated file with zeros; we refuse and leave it alone."""
    path = tmp_path / "t.npy"
    raw = _npy_bytes(np.arange(100, dtype="<f8"))[:-400]
    path.write_bytes(raw)
    with pytest.raises(TruncatedError, match="400|truncated"):
        npystream.open(path, mode=mode)
    assert path.read_bytes() == raw


def test_truncated_file_fails_when_iter_batches_is_called(tmp_path):
    path = tmp_path / "t.npy"
    path.write_bytes(_npy_bytes(np.arange(100, dtype="<f8"))[:-1])
    with pytest.raises(TruncatedError):
        npystream.iter_batches(path, 10)  # before any block is asked for


def test_npz_load_checks_the_promised_size_before_allocating(tmp_path):
    """A deflated member whose header promises 8 TB: TruncatedError, not a huge allocation."""
    from npystream.formats.npy import encode_header

    path = tmp_path / "lie.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.npy", encode_header("<f8", (10**12,)) + bytes(64))
    with npystream.open(path) as archive, pytest.raises(TruncatedError, match="promises"):
        archive.load("a")


def test_trailing_bytes_are_ignored_like_numpy(tmp_path):
    path = tmp_path / "t.npy"
    np.save(path, np.arange(4))
    with open(path, "ab") as f:
        f.write(b"junk")
    assert_same(npystream.open(path), np.load(path))


def test_gzip_and_pipe_refuse_mmap_and_point_to_iter_batches(tmp_path):
    path = tmp_path / "x.npy.gz"
    with gzip.open(path, "wb") as g:
        np.save(g, np.arange(4))
    with pytest.raises(NotSeekableError, match="iter_batches") as info:
        npystream.open(path)
    assert isinstance(info.value, OSError)
    rf, thread = _pipe_source(_npy_bytes(np.arange(3)))
    with rf, pytest.raises(NotSeekableError, match="iter_batches"):
        npystream.open(rf)
    thread.join(5)


def test_object_npy_refused_by_open_npy(tmp_path):
    path = tmp_path / "o.npy"
    np.save(path, np.array([1, "a"], dtype=object), allow_pickle=True)
    src = open_source(path)
    with src:
        header = read_header(src)
        with pytest.raises(UnsupportedError, match="iter_objects"):
            open_npy(src, header)


# ---------------------------------------------------------------------------- iter_batches


def _join(blocks: list[np.ndarray]) -> np.ndarray:
    """np.concatenate, keeping the blocks' byte order (concatenate normalises it)."""
    for b in blocks[1:]:
        assert b.dtype == blocks[0].dtype
    return np.concatenate(blocks).astype(blocks[0].dtype)


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _pipe_source(data: bytes, chunk: int = 65536):
    """A real os.pipe fed by a writer thread (not a seekable BytesIO pretending)."""
    r, w = os.pipe()

    def feed():
        with os.fdopen(w, "wb", buffering=0) as wf:
            for i in range(0, len(data), chunk):
                wf.write(data[i : i + chunk])

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    return os.fdopen(r, "rb"), t


def test_batches_are_memmap_views_for_files(tmp_path):
    ref = np.arange(1000, dtype="<f4").reshape(100, 10)
    path = tmp_path / "v.npy"
    np.save(path, ref)
    with npystream.iter_batches(path, 30) as it:
        assert it.shape == (100, 10) and it.dtype == np.dtype("<f4") and len(it) == 4
        blocks = list(it)
    assert [b.shape for b in blocks] == [(30, 10), (30, 10), (30, 10), (10, 10)]
    whole = blocks[0].base  # the one memmap of the whole array: every block is a view of it
    assert isinstance(whole, np.memmap) and whole.shape == (100, 10)
    for b in blocks:
        assert isinstance(b, np.memmap)
        assert not b.flags.writeable
        assert not b.flags.owndata
        assert b.base is whole
    assert_same(_join(blocks), ref)


@pytest.mark.parametrize("kind", ["gzip_path", "gzip_fileobj", "pipe", "bytesio", "bytes", "stdin"])
def test_stream_batches(tmp_path, kind, monkeypatch):
    ref = np.arange(5000, dtype=">i8").reshape(1000, 5)
    data = _npy_bytes(ref)
    thread = None
    if kind == "gzip_path":
        source = tmp_path / "s.npy.gz"
        source.write_bytes(gzip.compress(data))
    elif kind == "gzip_fileobj":
        (tmp_path / "s.npy.gz").write_bytes(gzip.compress(data))
        source = open(tmp_path / "s.npy.gz", "rb")  # noqa: SIM115 - raw gzip bytes, detected
    elif kind == "pipe":
        source, thread = _pipe_source(data, chunk=777)
    elif kind == "bytesio":
        source = io.BytesIO(data)
    elif kind == "bytes":
        source = data
    else:
        rf, thread = _pipe_source(data)
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(rf))
        source = "-"
    blocks = list(npystream.iter_batches(source, 128))
    assert [len(b) for b in blocks] == [128] * 7 + [104]
    for b in blocks:
        assert b.dtype == np.dtype(">i8")
        if kind != "bytes":
            assert b.flags.writeable and b.flags.c_contiguous  # fresh arrays
    assert_same(_join(blocks), ref)
    if thread is not None:
        thread.join(5)
    if hasattr(source, "close"):
        source.close()


def test_zip_member_stream(tmp_path):
    ref = np.arange(300, dtype="<f8").reshape(100, 3)
    path = tmp_path / "z.npz"
    np.savez_compressed(path, a=ref)
    with zipfile.ZipFile(path) as zf, zf.open("a.npy") as member:
        blocks = list(npystream.iter_batches(member, batch_bytes=240))
    assert [len(b) for b in blocks] == [10] * 10
    assert_same(_join(blocks), ref)


def test_batch_bytes(tmp_path):
    ref = np.arange(1000, dtype="<i4").reshape(100, 10)  # 40-byte rows
    path = tmp_path / "b.npy"
    np.save(path, ref)
    for batch_bytes, rows in ((400, 10), (439, 10), (40, 1), (1, 1), (10**9, 100)):
        blocks = list(npystream.iter_batches(path, batch_bytes=batch_bytes))
        assert len(blocks[0]) == rows
        assert all(b.nbytes <= max(batch_bytes, 40) for b in blocks)
        assert_same(_join(blocks), ref)
    # default: about 8 MiB blocks
    big = np.zeros((3 << 20,), dtype="<f8")  # 24 MiB
    np.save(path, big)
    assert [b.nbytes for b in npystream.iter_batches(path)] == [8 << 20] * 3


def test_fortran_order_blocks(tmp_path):
    ref = np.asfortranarray(np.arange(60, dtype="<f4").reshape(6, 10))
    path = tmp_path / "f.npy"
    np.save(path, ref)
    data = path.read_bytes()
    # From a file: axis 0 blocks are numpy's a[i:j] (strided views); axis -1 blocks are contiguous.
    rows = list(npystream.iter_batches(path, 4))
    assert [b.shape for b in rows] == [(4, 10), (2, 10)]
    assert_same(np.asarray(rows[0]), ref[0:4])
    assert not rows[0].flags.f_contiguous and not rows[0].flags.c_contiguous
    cols = list(npystream.iter_batches(path, 4, axis=-1))
    assert [b.shape for b in cols] == [(6, 4), (6, 4), (6, 2)]
    for b, j in zip(cols, (0, 4, 8)):
        assert b.flags.f_contiguous
        assert np.array_equal(b, ref[:, j : j + 4])
    # From a stream: only the contiguous (last) axis; axis=0 is refused with the fix named.
    with pytest.raises(UnsupportedError, match="axis=-1"):
        npystream.iter_batches(io.BytesIO(data), 4)
    stream_cols = list(npystream.iter_batches(gzip.GzipFile(fileobj=io.BytesIO(gzip.compress(data))), 4, axis=-1))
    for b, c in zip(stream_cols, cols):
        assert b.flags.f_contiguous and b.flags.writeable
        assert_same(b, np.asfortranarray(c))
    # C-ordered streams refuse axis=-1 for the same reason; 1-d arrays accept both axes.
    with pytest.raises(UnsupportedError, match="axis=0"):
        npystream.iter_batches(io.BytesIO(_npy_bytes(np.zeros((3, 4)))), 2, axis=-1)
    one_d = _npy_bytes(np.arange(5))
    assert [b.tolist() for b in npystream.iter_batches(io.BytesIO(one_d), 2, axis=-1)] == [[0, 1], [2, 3], [4]]


def test_batch_edge_shapes(tmp_path):
    for arr, expected in (
        (np.array(3.5), [()]),
        (np.zeros((0, 4)), []),
        (np.zeros((5, 0)), [(2, 0), (2, 0), (1, 0)]),
    ):
        data = _npy_bytes(arr)
        path = tmp_path / "e.npy"
        path.write_bytes(data)
        for source in (path, io.BytesIO(data)):
            blocks = list(npystream.iter_batches(source, 2))
            assert [b.shape for b in blocks] == expected
            if arr.ndim == 0:
                assert blocks[0] == arr
    # zero-byte rows with batch_bytes: one block with every row
    path.write_bytes(_npy_bytes(np.zeros((5, 0))))
    assert [b.shape for b in npystream.iter_batches(path, batch_bytes=8)] == [(5, 0)]


def test_truncated_stream_fails_at_the_short_block():
    data = _npy_bytes(np.arange(100, dtype="<i8").reshape(10, 10))
    it = npystream.iter_batches(io.BytesIO(data[:-5]), 3)
    got = [next(it), next(it), next(it)]
    assert [len(b) for b in got] == [3, 3, 3]
    with pytest.raises(TruncatedError) as info:
        next(it)
    assert info.value.offset == len(data) - 5
    assert "row 9" in str(info.value)


def test_iter_batches_bad_arguments(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, np.arange(4))
    for kwargs in (
        {"batch_size": 0}, {"batch_size": -1}, {"batch_size": True}, {"batch_size": 2.0},
        {"batch_bytes": 0}, {"batch_size": 2, "batch_bytes": 8}, {"batch_size": 2, "axis": 1},
    ):
        with pytest.raises(ValueError):
            npystream.iter_batches(path, **kwargs)


def test_iter_batches_object_npy_points_to_iter_objects(tmp_path):
    path = tmp_path / "o.npy"
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(UnsupportedError, match="iter_objects"):
        npystream.iter_batches(path, 10)


def test_iter_batches_npz_points_to_archive(tmp_path):
    path = tmp_path / "a.npz"
    np.savez(path, a=np.arange(3))
    with pytest.raises(UnsupportedError, match=r"iter_batches\(name"):
        npystream.iter_batches(path, 10)


def test_bad_file_is_a_format_error(tmp_path):
    path = tmp_path / "x.npy"
    path.write_bytes(b"hello world, not numpy")
    with pytest.raises(FormatError, match="magic") as info:
        npystream.iter_batches(path, 2)
    assert isinstance(info.value, NpyStreamError) and isinstance(info.value, ValueError)


def test_close_releases_owned_file(tmp_path):
    path = tmp_path / "c.npy.gz"
    path.write_bytes(gzip.compress(_npy_bytes(np.arange(100))))
    it = npystream.iter_batches(path, 10)
    next(it)
    raw = it._src._also_close  # the file npystream opened
    it.close()
    assert raw.closed
    with pytest.raises(StopIteration):
        next(it)
    # a caller's file object stays open
    with open(path, "rb") as f:
        list(npystream.iter_batches(f, 10))
        assert not f.closed


def test_stream_memory_is_one_block():
    """32 MiB through a real pipe in 1 MiB blocks: traced peak stays near one block."""
    n = 4 << 20  # float64 elements: 32 MiB
    head = _npy_bytes(np.zeros((n,), "<f8"))[:128]
    r, w = os.pipe()
    zeros = bytes(1 << 20)

    def feed():
        with os.fdopen(w, "wb", buffering=0) as wf:
            wf.write(head)
            for _ in range(32):
                wf.write(zeros)

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    tracemalloc.start()
    try:
        total = 0
        with os.fdopen(r, "rb") as rf:
            for block in npystream.iter_batches(rf, batch_bytes=1 << 20):
                total += block.size
                del block
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    t.join(5)
    assert total == n
    assert peak < 3 << 20, f"peak traced memory {peak} bytes for 1 MiB blocks"


@settings(max_examples=60, deadline=None)
@given(
    shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=7),
    dtype=st.sampled_from(["<f4", ">i2", "u1", "<c16", "S3", "<M8[s]"]),
    fortran=st.booleans(),
    batch=st.integers(1, 9),
    use_bytes=st.booleans(),
    kind=st.sampled_from(["path", "bytesio", "gzip"]),
)
def test_batches_rebuild_the_array(tmp_path_factory, shape, dtype, fortran, batch, use_bytes, kind):
    rng = np.random.default_rng(1)
    arr = _random(rng, np.dtype(dtype), shape)
    if fortran:
        arr = np.asfortranarray(arr)
    data = _npy_bytes(arr)
    ref = np.load(io.BytesIO(data))
    f_order = arr.flags.f_contiguous and not arr.flags.c_contiguous and arr.ndim >= 2
    axis = -1 if f_order else 0
    if kind == "path":
        source = tmp_path_factory.mktemp("b") / "a.npy"
        source.write_bytes(data)
    elif kind == "bytesio":
        source = io.BytesIO(data)
    else:
        source = io.BytesIO(gzip.compress(data))
    row_bytes = ref.dtype.itemsize * int(np.prod([d for j, d in enumerate(ref.shape) if j != axis % ref.ndim]))
    kwargs = {"batch_bytes": batch * max(row_bytes, 1)} if use_bytes else {"batch_size": batch}
    blocks = list(npystream.iter_batches(source, axis=axis, **kwargs))
    n = ref.shape[axis]
    rows = n if (use_bytes and row_bytes == 0) else batch
    assert len(blocks) == (0 if n == 0 else -(-n // max(rows, 1)))
    for k, block in enumerate(blocks):
        sl = slice(k * rows, (k + 1) * rows)
        assert_same(np.asarray(block), ref[sl] if axis == 0 else ref[..., sl])
