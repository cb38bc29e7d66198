"""One rule whatever the source: short reads, what may follow STOP, length fields, FRAMEs.

Issue 10 items 7 and 8, issue 11 items 4 and 9.  Every reader (a path, an
open file, bytes, ``BytesIO``, a real pipe, gzip) must give the same answer;
numpy (``np.load``) is the oracle where it reads the file.
"""

from __future__ import annotations

import gzip
import io
import random
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from objcases import assert_same_elements, expected_elements, obj_array, through_pipe

import npystream
from npystream import FormatError, TruncatedError
from npystream.formats.npy import read_header
from npystream.sources import read_upto

TESTS = Path(__file__).resolve().parent


class RandomSizeBytesIO(io.BytesIO):
    """numpy's ``BytesIOSRandomSize`` (test_format.py): every read returns 1..n bytes."""

    def __init__(self, data: bytes, seed: int) -> None:
        super().__init__(data)
        self._rng = random.Random(seed)

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return super().read(size)
        return super().read(self._rng.randint(1, max(size, 1)))

    def readinto(self, b) -> int:  # type: ignore[override]
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def _through_pipe(data: bytes, **kw) -> list:
    got, exc = through_pipe(data, **kw)
    if exc is not None:
        raise exc
    return got


def _every_source(data: bytes, tmp_path: Path, **kw) -> dict[str, object]:
    """name -> the elements read (or the exception raised) from each kind of source."""
    path = tmp_path / "x.npy"
    path.write_bytes(data)
    gz = tmp_path / "x.npy.gz"
    gz.write_bytes(gzip.compress(data, compresslevel=1))

    def from_open_file() -> list:
        with open(path, "rb") as f:
            return list(npystream.iter_objects(f, **kw))

    def by_index() -> list:
        with npystream.open(path, **kw) as arr:
            return [arr[i] for i in range(len(arr))]

    readers = {
        "path": lambda: list(npystream.iter_objects(path, **kw)),
        "open file": from_open_file,
        "bytes": lambda: list(npystream.iter_objects(data, **kw)),
        "BytesIO": lambda: list(npystream.iter_objects(io.BytesIO(data), **kw)),
        "pipe": lambda: _through_pipe(data, **kw),
        "gzip": lambda: list(npystream.iter_objects(gz, **kw)),
        "open()": by_index,
    }
    out: dict[str, object] = {}
    for name, read in readers.items():
        try:
            out[name] = read()
        except Exception as exc:  # noqa: BLE001 - compared below
            out[name] = exc
    return out


# ---------------------------------------------------------------------------
# item 7: short reads


def test_read_upto_loops_until_n_or_eof():
    f = RandomSizeBytesIO(b"0123456789", seed=1)
    assert read_upto(f, 4) == b"0123"
    assert read_upto(f, 100) == b"456789"
    assert read_upto(f, 3) == b""


@pytest.mark.parametrize("seed", range(20))
def test_short_reads_like_numpys_randsize_reader(seed):
    """numpy's test_roundtrip_randsize: a file object returning 1..n bytes per read, header and data."""
    fixed = np.arange(24.0).reshape(4, 6)
    for version in ((1, 0), (2, 0), (3, 0)):
        buf = io.BytesIO()
        np.lib.format.write_array(buf, fixed, version=version)
        data = buf.getvalue()
        header = read_header(RandomSizeBytesIO(data, seed))
        assert header.shape == (4, 6) and header.data_offset == data.index(b"\n") + 1
        got = np.concatenate(list(npystream.iter_batches(RandomSizeBytesIO(data, seed), 3)))
        np.testing.assert_array_equal(got, fixed)
    items = obj_array([1, "two", np.arange(5), {"k": (1, 2)}, None] * 30)
    data = _npy(items)
    got = list(npystream.iter_objects(RandomSizeBytesIO(data, seed)))
    assert_same_elements(got, expected_elements(np.load(io.BytesIO(data), allow_pickle=True)))


def test_short_read_gzip_magic_is_still_seen(tmp_path):
    """The gzip sniffer reads its 2 bytes in a loop too (a 1-byte read must not hide the magic)."""
    data = gzip.compress(_npy(obj_array([1, 2, 3])))
    assert list(npystream.iter_objects(RandomSizeBytesIO(data, seed=3))) == [1, 2, 3]


# ---------------------------------------------------------------------------
# item 8: what may follow STOP, one rule


def test_numpys_py2_objarr_with_trailing_newline_every_source(tmp_path, numpy_testdata):
    """numpy's own py2-np0-objarr.npy ends with a newline after STOP: every source reads it like np.load."""
    data = (numpy_testdata / "py2-np0-objarr.npy").read_bytes()
    assert data.endswith(b".\n")
    expected = expected_elements(np.load(io.BytesIO(data), allow_pickle=True, encoding="latin1"))
    for name, got in _every_source(data, tmp_path, encoding="latin1").items():
        assert not isinstance(got, Exception), f"{name}: {got!r}"
        assert_same_elements(got, expected)


@pytest.mark.parametrize("tail", [b"\n", b"\n\n", b"x", b"\nx", b"\x00" * 3000])
def test_trailing_bytes_one_rule(tmp_path, tail):
    """One newline after STOP is tolerated everywhere; anything more is a FormatError everywhere."""
    base = _npy(obj_array([1, "a", np.arange(3)]))
    expected = expected_elements(np.load(io.BytesIO(base), allow_pickle=True))
    for name, got in _every_source(base + tail, tmp_path).items():
        if tail == b"\n":
            assert not isinstance(got, Exception), f"{name}: {got!r}"
            assert_same_elements(got, expected)
        else:
            assert isinstance(got, FormatError) and "trailing bytes" in str(got), f"{name}: {got!r}"


# ---------------------------------------------------------------------------
# issue 11 item 9: a FRAME that claims more bytes than the data has


@pytest.mark.parametrize("extra", [1, 100, 2**40])
def test_oversize_frame_refused_by_every_source(tmp_path, extra):
    data = _npy(obj_array([1, "x", np.arange(3)]))
    at = data.index(b"\x95", 128)  # numpy 2 writes protocol 4: the pickle starts with a FRAME
    (length,) = struct.unpack("<Q", data[at + 1 : at + 9])
    bad = data[: at + 1] + struct.pack("<Q", length + extra) + data[at + 9 :]
    with pytest.raises(Exception):  # noqa: B017, PT011 - np.load refuses it too (UnpicklingError)
        np.load(io.BytesIO(bad), allow_pickle=True)
    for name, got in _every_source(bad, tmp_path).items():
        assert isinstance(got, TruncatedError) and "FRAME" in str(got), f"{name}: {got!r}"


# ---------------------------------------------------------------------------
# issue 11 item 4: length fields reserve nothing before their bytes arrive

_CLAIM_SCRIPT = textwrap.dedent(
    """
    import io, os, resource, struct, sys, threading
    sys.path.insert(0, sys.argv[1])
    import npystream
    from hostile_pickles import envelope, integer, npy_file
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # 1 GiB of address space in all

    def pipe(data):
        r, w = os.pipe()
        def write():
            try:
                os.write(w, data)
            finally:
                os.close(w)
        t = threading.Thread(target=write)
        t.start()
        try:
            with os.fdopen(r, "rb") as f:
                return list(npystream.iter_objects(f))
        finally:
            t.join()

    for claim in (2**31 - 1, 2**31, 2**40, 2**63):
        for op, fmt in ((b"\\x8e", "<Q"), (b"B", "<I"), (b"\\x8d", "<Q"), (b"X", "<I"), (b"\\x96", "<Q")):
            if fmt == "<I" and claim >= 2**32:
                continue
            body = integer(1) + op + struct.pack(fmt, claim) + b"abc" * 1000
            data = npy_file(envelope(body, (2,)), (2,))
            for name, read in (("pipe", pipe), ("BytesIO", lambda d: list(npystream.iter_objects(io.BytesIO(d))))):
                try:
                    read(data)
                    print(claim, op.hex(), name, "accepted")
                except Exception as exc:
                    print(claim, op.hex(), name, type(exc).__name__)
    """
)


def test_length_claims_reserve_nothing():
    """BINBYTES8/BINUNICODE8/BYTEARRAY8/BINBYTES/BINUNICODE claiming 2 GiB .. 8 EiB, through a pipe and
    a BytesIO, in a process limited to 1 GiB of address space: TruncatedError, never MemoryError."""
    out = subprocess.run(
        [sys.executable, "-c", _CLAIM_SCRIPT, str(TESTS)], capture_output=True, text=True, timeout=120, check=True
    )
    lines = out.stdout.split("\n")[:-1]
    assert len(lines) == 2 * (4 * 5 - 4)
    for line in lines:
        assert line.endswith("TruncatedError"), line
