"""RaggedWriter.append_from_file: an element's bytes read from its file (preadv into the buffer,
copy_file_range when larger than the buffer), the same store as append()."""

from __future__ import annotations

import errno
import mmap
import os

import numpy as np
import pytest

from npystream.errors import CastError, TruncatedError
from npystream.formats.ragged import RaggedArray, RaggedWriter

pytestmark = pytest.mark.skipif(not (hasattr(os, "copy_file_range") and hasattr(os, "preadv")),
                                reason="no os.copy_file_range / os.preadv")


def _store_bytes(path):
    return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


def _views_of_file(tmp_path, arrays):
    """Write the arrays' bytes to a file (with gaps); return (fd, map, [(view, offset)])."""
    path = tmp_path / "src.bin"
    offsets = []
    with open(path, "wb") as f:
        for i, a in enumerate(arrays):
            f.write(b"\x00" * (7 + i % 5))  # unaligned, non-adjacent ranges
            offsets.append(f.tell())
            f.write(np.ascontiguousarray(a).tobytes())
    fd = os.open(path, os.O_RDONLY)
    mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    views = [np.frombuffer(mm, dtype=a.dtype, count=a.size, offset=off).reshape(a.shape)
             for a, off in zip(arrays, offsets)]
    return fd, mm, list(zip(views, offsets))


@pytest.mark.parametrize("buffer_size", [4 << 20, 24 << 10])  # preadv only / also copy_file_range
@pytest.mark.parametrize("dtype,shape", [
    ("<f4", (5000,)),
    (">f8", (3000,)),
    ("<i2", (4000, 3)),
    ([("a", "<i4"), ("b", ">f8", (2,))], (900,)),
])
def test_same_store_as_append(tmp_path, dtype, shape, buffer_size):
    rng = np.random.default_rng(0)
    dt = np.dtype(dtype)
    arrays = []
    for i in range(8):
        n = (shape[0] * (i + 1)) // 4
        raw = rng.integers(0, 256, n * int(np.prod(shape[1:])) * dt.itemsize, dtype=np.uint8)
        arrays.append(raw.view(dt).reshape((n, *shape[1:])))
    fd, mm, views = _views_of_file(tmp_path, arrays)
    try:
        with RaggedWriter(tmp_path / "a.ragged", durable=False) as w:
            for a in arrays:
                w.append(a)
        with RaggedWriter(tmp_path / "b.ragged", durable=False, buffer_size=buffer_size) as w:
            for v, off in views:
                w.append_from_file(v, fd, off)
        assert _store_bytes(tmp_path / "a.ragged") == _store_bytes(tmp_path / "b.ragged")
        r = RaggedArray(tmp_path / "b.ragged")
        assert r.dtype == dt and len(r) == len(arrays)
        for a, b in zip(arrays, r):
            assert a.shape == b.shape and a.tobytes() == b.tobytes()
    finally:
        del views
        del mm  # closed with the last view
        os.close(fd)


def test_elements_that_do_not_fit_take_the_append_path(tmp_path):
    arrays = [np.arange(5000, dtype="<f4"), np.arange(5000, dtype="<f8"),
              np.arange(6000, dtype="<f4")[::2], np.arange(4000, dtype=">f4")]
    fd, mm, views = _views_of_file(tmp_path, arrays)
    try:
        with RaggedWriter(tmp_path / "a.ragged", durable=False, cast="same_kind") as w:
            for v, off in views:
                w.append_from_file(v, fd, off)
        r = RaggedArray(tmp_path / "a.ragged")
        for a, b in zip(arrays, r):
            assert b.dtype == np.dtype("<f4") and np.array_equal(a, b)
        with RaggedWriter(tmp_path / "b.ragged", durable=False) as w:
            w.append_from_file(*views[0][:1], fd, views[0][1])
            with pytest.raises(CastError) as info:
                w.append_from_file(views[1][0], fd, views[1][1])
        assert info.value.index == 1 and len(RaggedArray(tmp_path / "b.ragged")) == 1
    finally:
        del views
        del mm  # closed with the last view
        os.close(fd)


@pytest.mark.parametrize("buffer_size", [4 << 20, 256])
def test_source_shorter_than_the_element(tmp_path, buffer_size):
    (tmp_path / "short.bin").write_bytes(b"\x01" * 100)
    fd = os.open(tmp_path / "short.bin", os.O_RDONLY)
    try:
        w = RaggedWriter(tmp_path / "a.ragged", durable=False, buffer_size=buffer_size)
        w.append(np.ones(10, "<f4"))
        with pytest.raises(TruncatedError, match="ends before byte 400"):
            w.append_from_file(np.zeros(100, "<f4"), fd, 0)  # 400 bytes claimed, 100 there
        w.close()
        # read into the buffer: nothing was counted, the first element is committed; copied
        # file to file: the writer is broken and keeps its last commit (none yet)
        assert len(RaggedArray(tmp_path / "a.ragged")) == (1 if buffer_size > 400 else 0)
    finally:
        os.close(fd)


def test_closed_writer_refuses(tmp_path):
    w = RaggedWriter(tmp_path / "a.ragged", durable=False)
    w.append(np.ones(10, "<f4"))
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.append_from_file(np.ones(10, "<f4"), 0, 0)


def test_interrupt_inside_the_copy_keeps_earlier_elements(tmp_path, monkeypatch):
    arrays = [np.arange(5000 + i, dtype="<f4") for i in range(4)]
    fd, mm, views = _views_of_file(tmp_path, arrays)
    real = os.copy_file_range

    def interrupted(src, dst, count, offset_src=None, offset_dst=None):
        real(src, dst, count // 2, offset_src, offset_dst)
        raise KeyboardInterrupt

    try:
        w = RaggedWriter(tmp_path / "a.ragged", durable=False, buffer_size=4096)
        for v, off in views[:3]:
            w.append_from_file(v, fd, off)
        monkeypatch.setattr(os, "copy_file_range", interrupted)
        with pytest.raises(KeyboardInterrupt):
            w.append_from_file(views[3][0], fd, views[3][1])
        monkeypatch.setattr(os, "copy_file_range", real)
        w.close()  # still consistent: commits the three elements before the interrupted one
        r = RaggedArray(tmp_path / "a.ragged")
        assert len(r) == 3 and all(np.array_equal(a, b) for a, b in zip(arrays, r))
        with RaggedWriter(tmp_path / "a.ragged", mode="a", durable=False, buffer_size=4096) as w:
            w.append_from_file(views[3][0], fd, views[3][1])
        r = RaggedArray(tmp_path / "a.ragged")
        assert len(r) == 4 and all(np.array_equal(a, b) for a, b in zip(arrays, r))
    finally:
        del views
        del mm  # closed with the last view
        os.close(fd)


def test_unsupported_copy_falls_back_to_writing_from_memory(tmp_path, monkeypatch):
    arrays = [np.arange(5000 + i, dtype="<f4") for i in range(4)]
    fd, mm, views = _views_of_file(tmp_path, arrays)
    calls = []

    def unsupported(*args):
        calls.append(args)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    try:
        with RaggedWriter(tmp_path / "a.ragged", durable=False, buffer_size=4096) as w:
            w.append(arrays[0])
            for v, off in views[1:]:
                w.append_from_file(v, fd, off)
        assert len(calls) == 1
        r = RaggedArray(tmp_path / "a.ragged")
        assert all(np.array_equal(a, b) for a, b in zip(arrays, r))
    finally:
        del views
        del mm  # closed with the last view
        os.close(fd)


def test_interrupt_inside_a_read_into_the_buffer(tmp_path, monkeypatch):
    arrays = [np.arange(500 + i, dtype="<f4") for i in range(4)]
    fd, mm, views = _views_of_file(tmp_path, arrays)
    real = os.preadv

    def interrupted(f, buffers, offset):
        real(f, [memoryview(buffers[0])[:100]], offset)
        raise KeyboardInterrupt

    try:
        w = RaggedWriter(tmp_path / "a.ragged", durable=False)
        for v, off in views[:3]:
            w.append_from_file(v, fd, off)
        monkeypatch.setattr(os, "preadv", interrupted)
        w._preadv = interrupted  # the writer looked preadv up when it was made
        with pytest.raises(KeyboardInterrupt):
            w.append_from_file(views[3][0], fd, views[3][1])
        assert len(w) == 3  # the interrupted element was not counted
        w._preadv = real
        w.append_from_file(views[3][0], fd, views[3][1])  # the same writer carries on
        w.close()
        r = RaggedArray(tmp_path / "a.ragged")
        assert len(r) == 4 and all(np.array_equal(a, b) for a, b in zip(arrays, r))
    finally:
        del views
        del mm
        os.close(fd)
