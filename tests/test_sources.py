"""Byte sources: one shared test class that every kind of source runs (paths, files, pipes, gzip...)."""

from __future__ import annotations

import gzip
import io
import os
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from npystream.errors import (
    FormatError,
    NotSeekableError,
    StoreNotFoundError,
    TruncatedError,
    UnsupportedError,
)
from npystream.sources import (
    ByteSource,
    FileSource,
    MemorySource,
    StreamSource,
    WindowSource,
    open_source,
)

PAYLOAD = bytes((i * 7 + i // 251) % 256 for i in range(3000))


def _feed(w: int, data: bytes) -> threading.Thread:
    def run():
        try:
            with os.fdopen(w, "wb", buffering=0) as wf:
                for i in range(0, len(data), 700):  # several writes: readers see short reads
                    wf.write(data[i : i + 700])
        except BrokenPipeError:  # the test stopped reading early and closed its end
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


class Made:
    """A source under test plus what it must be able to do, and how to clean up."""

    def __init__(self, src: ByteSource, *, seekable: bool, mappable: bool, sized: bool,
                 kind: type, cleanup=()):
        self.src, self.seekable, self.mappable, self.sized, self.kind = src, seekable, mappable, sized, kind
        self.cleanup = list(cleanup)


def make(kind: str, data: bytes, tmp_path, monkeypatch) -> Made:
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    if kind == "path":
        return Made(open_source(path), seekable=True, mappable=True, sized=True, kind=FileSource)
    if kind == "fileobj":
        f = open(path, "rb")  # noqa: SIM115
        return Made(open_source(f), seekable=True, mappable=True, sized=True, kind=FileSource,
                    cleanup=[f.close])
    if kind == "fd_only":
        f = os.fdopen(os.open(path, os.O_RDONLY), "rb")
        return Made(open_source(f), seekable=True, mappable=True, sized=True, kind=FileSource,
                    cleanup=[f.close])
    if kind == "bytesio":
        return Made(open_source(io.BytesIO(data)), seekable=True, mappable=False, sized=True,
                    kind=FileSource)
    if kind == "memory":
        return Made(open_source(data), seekable=True, mappable=False, sized=True, kind=MemorySource)
    if kind == "window":
        big = tmp_path / "big.bin"
        big.write_bytes(b"H" * 5000 + data + b"T" * 777)
        return Made(WindowSource(str(big), 5000, len(data), "win"), seekable=True, mappable=True,
                    sized=True, kind=WindowSource)
    if kind == "pipe":
        r, w = os.pipe()
        t = _feed(w, data)
        f = os.fdopen(r, "rb")
        return Made(open_source(f), seekable=False, mappable=False, sized=False, kind=StreamSource,
                    cleanup=[f.close, lambda: t.join(5)])
    if kind == "raw_pipe":  # unbuffered: read() returns short counts
        r, w = os.pipe()
        t = _feed(w, data)
        f = os.fdopen(r, "rb", buffering=0)
        return Made(open_source(f), seekable=False, mappable=False, sized=False, kind=StreamSource,
                    cleanup=[f.close, lambda: t.join(5)])
    if kind == "fifo_path":
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)

        def writer():
            with open(fifo, "wb") as wf:
                wf.write(data)

        t = threading.Thread(target=writer, daemon=True)
        t.start()
        return Made(open_source(fifo), seekable=False, mappable=False, sized=False,
                    kind=StreamSource, cleanup=[lambda: t.join(5)])
    if kind == "stdin":
        r, w = os.pipe()
        t = _feed(w, data)
        f = os.fdopen(r, "rb")
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(f))
        return Made(open_source("-"), seekable=False, mappable=False, sized=False, kind=StreamSource,
                    cleanup=[f.close, lambda: t.join(5)])
    if kind == "gzip_stdin":
        r, w = os.pipe()
        t = _feed(w, gzip.compress(data))
        f = os.fdopen(r, "rb")
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(f))
        return Made(open_source("-"), seekable=False, mappable=False, sized=False, kind=StreamSource,
                    cleanup=[f.close, lambda: t.join(5)])
    if kind == "gzip_path":
        gz = tmp_path / "data.bin.gz"
        gz.write_bytes(gzip.compress(data))
        return Made(open_source(gz), seekable=False, mappable=False, sized=False, kind=StreamSource)
    if kind == "gzip_raw_fileobj":
        gz = tmp_path / "data.bin.gz"
        gz.write_bytes(gzip.compress(data))
        f = open(gz, "rb")  # noqa: SIM115
        return Made(open_source(f), seekable=False, mappable=False, sized=False, kind=StreamSource,
                    cleanup=[f.close])
    if kind == "gzip_pipe":
        r, w = os.pipe()
        t = _feed(w, gzip.compress(data))
        f = os.fdopen(r, "rb")
        return Made(open_source(f), seekable=False, mappable=False, sized=False, kind=StreamSource,
                    cleanup=[f.close, lambda: t.join(5)])
    if kind == "gzipfile":
        g = gzip.GzipFile(fileobj=io.BytesIO(gzip.compress(data)))
        return Made(open_source(g), seekable=False, mappable=False, sized=False, kind=StreamSource)
    if kind == "zip_member":
        zpath = tmp_path / "d.zip"
        with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("m", data)
        zf = zipfile.ZipFile(zpath)
        member = zf.open("m")
        return Made(open_source(member), seekable=False, mappable=False, sized=False,
                    kind=StreamSource, cleanup=[member.close, zf.close])
    raise AssertionError(kind)


KINDS = ["path", "fileobj", "fd_only", "bytesio", "memory", "window", "pipe", "raw_pipe",
         "fifo_path", "stdin", "gzip_stdin", "gzip_path", "gzip_raw_fileobj", "gzip_pipe", "gzipfile", "zip_member"]


class SourceTests:
    """The contract of ByteSource; subclasses choose the payload."""

    data: bytes = PAYLOAD

    @pytest.fixture(params=KINDS)
    def made(self, request, tmp_path, monkeypatch):
        m = make(request.param, self.data, tmp_path, monkeypatch)
        yield m
        m.src.close()
        for fn in m.cleanup:
            fn()

    def test_kind_and_flags(self, made):
        src = made.src
        assert isinstance(src, made.kind)
        assert src.seekable == made.seekable
        assert src.mappable == made.mappable
        assert src.size == (len(self.data) if made.sized else None)
        assert src.tell() == 0
        assert isinstance(src.name, str) and src.name
        assert type(src).__name__ in repr(src)

    def test_read_in_pieces(self, made):
        src, out = made.src, []
        while True:
            chunk = src.read(1000)
            if not chunk:
                break
            assert len(chunk) == min(1000, len(self.data) - sum(map(len, out)))  # full reads
            out.append(chunk)
            assert src.tell() == sum(map(len, out))
        assert b"".join(out) == self.data
        assert src.read(10) == b"" and src.read(0) == b""

    def test_read_exact_and_truncation(self, made):
        src = made.src
        half = len(self.data) // 2
        assert src.read_exact(half, "first half") == self.data[:half]
        with pytest.raises(TruncatedError) as info:
            src.read_exact(len(self.data) - half + 1, "the rest")
        err = info.value
        assert isinstance(err, EOFError)
        assert err.offset == len(self.data)
        assert "the rest" in str(err)

    def test_readinto(self, made):
        buf = bytearray(len(self.data) + 10)
        assert made.src.readinto(buf) == len(self.data)
        assert bytes(buf[: len(self.data)]) == self.data
        assert made.src.tell() == len(self.data)

    def test_skip(self, made):
        src = made.src
        if len(self.data) < 200:
            pytest.skip("payload too short")
        src.skip(100)
        assert src.tell() == 100
        assert src.read(10) == self.data[100:110]
        with pytest.raises(TruncatedError):
            src.skip(len(self.data))

    def test_seek_and_read_at(self, made):
        src = made.src
        if made.seekable:
            assert src.read_at(len(self.data) // 3, 10) == self.data[len(self.data) // 3 :][:10]
            src.seek(0)
            assert src.read(5) == self.data[:5]
        else:
            with pytest.raises(NotSeekableError) as info:
                src.seek(0)
            assert isinstance(info.value, OSError)
            assert "forward" in str(info.value)
            with pytest.raises(NotSeekableError):
                src.read_at(0, 1)

    def test_map(self, made):
        src = made.src
        if made.mappable:
            target = src.mmap_target()
            assert target is not None
            assert bytes(src.map()) == self.data
            assert src.map().readonly
        elif made.kind is MemorySource:
            assert bytes(src.map()) == self.data  # zero-copy view of the bytes
        else:
            assert src.mmap_target() is None
            with pytest.raises(NotSeekableError):
                src.map()

    def test_close_twice(self, made):
        made.src.close()
        made.src.close()


class TestSources(SourceTests):
    data = PAYLOAD


class TestEmptySources(SourceTests):
    data = b""


def test_caller_file_is_not_closed(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"abc")
    with open(path, "rb") as f:
        src = open_source(f)
        src.close()
        assert not f.closed
    src = open_source(path)
    raw = src._f
    src.close()
    assert raw.closed


def test_open_source_errors(tmp_path):
    with pytest.raises(StoreNotFoundError) as info:
        open_source(tmp_path / "missing.npy")
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(UnsupportedError, match="ragged store"):
        open_source(tmp_path)
    with pytest.raises(TypeError, match="expected a path"):
        open_source(12345)


def test_gzip_detected_by_content_not_suffix(tmp_path):
    path = tmp_path / "plain_name.npy"
    path.write_bytes(gzip.compress(b"hello"))
    with open_source(path) as src:
        assert isinstance(src, StreamSource) and src.read(10) == b"hello"
    path = tmp_path / "not_gzip.gz"
    path.write_bytes(b"hello")
    with open_source(path) as src:
        assert isinstance(src, FileSource) and src.read(10) == b"hello"


def test_cut_or_corrupt_compressed_data_raises_our_errors(tmp_path):
    data = bytes(range(256)) * 4000
    gz = gzip.compress(data)
    with open_source(io.BytesIO(gz[: len(gz) // 2])) as src, pytest.raises(TruncatedError) as info:
        src.read(len(data))
    assert "compressed stream ends early" in str(info.value)
    corrupt = gz[:20] + bytes(40) + gz[60:]
    with open_source(io.BytesIO(corrupt)) as src, pytest.raises(FormatError, match="corrupt"):
        src.readinto(bytearray(len(data)))
    zpath = tmp_path / "c.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("m", data)
    raw = bytearray(zpath.read_bytes())
    raw[100:110] = bytes(10)
    zpath.write_bytes(bytes(raw))
    with zipfile.ZipFile(zpath) as zf, zf.open("m") as member, open_source(member) as src:
        with pytest.raises(FormatError):
            src.read(len(data))


def test_mapping_follows_the_open_file_not_the_path(tmp_path: Path) -> None:
    """A file replaced on disk after it was opened: the mapping still shows the opened file."""
    import numpy as np

    import npystream
    from npystream.sources import open_source

    path = tmp_path / "a.npy"
    np.save(path, np.arange(10, dtype=np.int64))
    src = open_source(str(path))
    try:
        other = tmp_path / "b.npy"
        np.save(other, np.arange(100, 110, dtype=np.int64))
        os.replace(other, path)  # the path now names another file
        view = src.map()
        assert bytes(view[-80:]) == np.arange(10, dtype=np.int64).tobytes()
    finally:
        src.close()
    # np.memmap results too (open() maps the descriptor it read the header from)
    np.save(path, np.arange(5, dtype=np.int32))
    with open(path, "rb") as f:
        replacement = tmp_path / "c.npy"
        np.save(replacement, np.arange(50, 55, dtype=np.int32))
        os.replace(replacement, path)
        arr = npystream.open(f)
        assert arr.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("head", "kind"),
    [(b"PK\x03\x04\x14\x00", "zip"), (b"PK\x05\x06", "zip"), (b"PK\x07\x08", None), (b"PK", None),
     (b"\x1f\x8b\x08\x00", "gzip"), (b"\x1f", None), (b"\x93NUMPY\x01\x00", None), (b"", None)],
)
def test_sniff(head, kind, tmp_path):
    """The one content sniffer: numpy's zip prefixes, the gzip magic; paths and file objects agree."""
    from npystream.sources import peek_head, sniff, sniff_path

    assert sniff(head) == kind
    p = tmp_path / "f"
    p.write_bytes(head + b"tail")
    assert sniff_path(p) == (kind, (head + b"tail")[:8])
    with open(p, "rb") as f:
        f.read(0)
        assert sniff(peek_head(f)) == kind
        assert f.tell() == 0  # never consumed
    assert sniff_path(tmp_path) == (None, b"")
    assert sniff_path(tmp_path / "missing") == (None, b"")
