"""Streams whose open batch exceeds SPILL_ABOVE: the batch goes to a temporary file, elements stay exact.

The budget is lowered (256 KiB) so small files spill; numpy is the oracle.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from objcases import assert_same_elements, expected_elements, obj_array, through_pipe

import npystream
from npystream import NpyStreamError, TruncatedError
from npystream.formats import pickle_stream

LOW = 256 << 10


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def _through_pipe(data: bytes):
    return through_pipe(data)


@pytest.fixture
def spills(monkeypatch):
    """Lower SPILL_ABOVE; returns the sizes of the batches decoded from the temporary file."""
    monkeypatch.setattr(pickle_stream, "SPILL_ABOVE", LOW)
    sizes: list[int] = []
    open_view = pickle_stream._Spill.open_view

    def counting(self):
        sizes.append(self.size)
        return open_view(self)

    monkeypatch.setattr(pickle_stream._Spill, "open_view", counting)
    return sizes


def _mixed() -> list:
    """Big arrays, nested chains around them (np.save keeps their slots pending), small values; 4 batches."""
    mid = np.arange(40_000, dtype="f8")
    items: list = [mid + i for i in range(30)]
    items.append((mid, (1, {"k": (2, mid[::-1].copy())})))
    items.extend(range(1500))
    items.extend(np.arange(5000 + i, dtype="<i4") for i in range(600))
    items.append(np.arange(300_000, dtype=">f4"))  # one opcode above the budget, non-native byte order
    items.extend(["text", b"bytes", None, 2**80])
    return items


def test_spilled_batches_equal_np_load_through_a_pipe(spills):
    data = _npy(obj_array(_mixed()))
    got, exc = _through_pipe(data)
    assert exc is None, exc
    assert_same_elements(got, expected_elements(np.load(io.BytesIO(data), allow_pickle=True)))
    assert len(spills) >= 3 and max(spills) > 4 * LOW  # the batches really went through the file


def test_spilled_elements_are_like_the_in_memory_ones(monkeypatch, spills):
    """Types and flags as without spilling (writeable, aligned, native where np.load's are); no view of the file."""
    data = _npy(obj_array([np.arange(40_000, dtype="f8") + i for i in range(40)] + [np.arange(3.0)]))
    got, exc = _through_pipe(data)
    assert exc is None and spills
    monkeypatch.setattr(pickle_stream, "SPILL_ABOVE", 1 << 40)
    kept, exc = _through_pipe(data)
    assert exc is None
    ref = np.load(io.BytesIO(data), allow_pickle=True)
    for a, b, r in zip(got, kept, ref):
        assert type(a) is type(b) is np.ndarray
        assert (a.flags.writeable, a.flags.aligned, a.flags.owndata) == (b.flags.writeable, b.flags.aligned, b.flags.owndata)
        assert a.flags.writeable == r.flags.writeable and a.dtype == r.dtype
        np.testing.assert_array_equal(a, r)
    got[0][:] = -1  # writing into one element changes no other (none shares the reused file)
    assert got[1][0] == 1.0 and got[-2][5] == 44.0


def test_truncated_spilled_stream_matches_the_in_memory_reader(monkeypatch, spills):
    """Cut inside a spilled batch: the same elements before the damage and the same error as unspilled."""
    data = _npy(obj_array(_mixed()))
    cut = data[: len(data) * 2 // 3]
    got, exc = _through_pipe(cut)
    assert isinstance(exc, TruncatedError) and spills
    monkeypatch.setattr(pickle_stream, "SPILL_ABOVE", 1 << 40)
    kept, exc2 = _through_pipe(cut)
    assert type(exc2) is type(exc) and str(exc2) == str(exc)
    assert_same_elements(got, kept)
    assert len(got) > 1500


def test_unusable_temp_dir_is_a_clear_error(monkeypatch, spills, tmp_path):
    missing = tmp_path / "no-such-dir"
    monkeypatch.setattr(tempfile, "tempdir", str(missing))
    got, exc = _through_pipe(_npy(obj_array(_mixed())))
    assert isinstance(exc, NpyStreamError), exc
    msg = str(exc)
    assert str(missing) in msg and "TMPDIR" in msg and "No such file" in msg
    assert got == []  # the first batch already needed the file


_CHILD_FULL = textwrap.dedent(
    """
    import resource, signal, sys
    import npystream
    from npystream.formats import pickle_stream
    pickle_stream.SPILL_ABOVE = 256 << 10
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # the temp dir "fills up" at 1 MiB
    n = 0
    try:
        for x in npystream.iter_objects(sys.stdin.buffer):
            n += 1
    except npystream.NpyStreamError as exc:
        print(type(exc).__name__, n, exc)
    """
)


def test_temp_file_that_cannot_grow_is_a_clear_error(tmp_path):
    """A write to the temporary file fails mid-batch (file size limit): NpyStreamError naming the dir and TMPDIR."""
    src = tmp_path / "mixed.npy"
    src.write_bytes(_npy(obj_array(_mixed())))
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    env = {**os.environ, "TMPDIR": str(spill_dir)}
    out = subprocess.run(  # stdin a pipe: the stream reader, not the mapped file
        f"cat {src} | {sys.executable} -c '{_CHILD_FULL}'", shell=True, capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    name, n, msg = out.stdout.split(" ", 2)
    assert name == "NpyStreamError" and int(n) == 0
    assert str(spill_dir) in msg and "TMPDIR" in msg and "could not write" in msg
    assert list(spill_dir.iterdir()) == []  # the temporary file was never visible there


_CHILD_LOOP = "import sys, npystream\nfor x in npystream.iter_objects(sys.stdin.buffer):\n    x.sum()\n"


def _peak_rss_anon(cmd: str) -> tuple[int, int]:
    """Run ``cmd`` in a shell; (exit code, peak RssAnon bytes of its python process, sampled every 2 ms)."""
    proc = subprocess.Popen(["bash", "-c", cmd])
    peak = 0
    while proc.poll() is None:
        for child in _children(proc.pid):
            try:
                with open(f"/proc/{child}/status") as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            peak = max(peak, int(line.split()[1]) * 1024)
            except OSError:
                pass
        time.sleep(0.002)
    return proc.wait(), peak


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssAnon from /proc")
def test_big_batch_through_cat_stays_under_100_mb(tmp_path):
    """One batch of 1000 arrays of 200 KB (200 MB of raw bytes) through ``cat |``: peak RssAnon < 100 MB."""
    path = tmp_path / "big_batch.npy"
    arr = np.empty(1000, dtype=object)
    for i in range(1000):
        arr[i] = np.full(50_000, i, dtype="f4")
    np.save(path, arr, allow_pickle=True)
    del arr
    assert path.stat().st_size > 200_000_000
    code, peak = _peak_rss_anon(f"cat {path} | {sys.executable} -c '{_CHILD_LOOP}'")
    path.unlink()
    assert code == 0
    assert 0 < peak < 100_000_000, f"peak RssAnon {peak / 2**20:.0f} MiB"


def test_spilled_gzip_equals_np_load(spills, tmp_path):
    """Another forward-only source spills the same way: a gzip file."""
    import gzip

    data = _npy(obj_array(_mixed()))
    gz = tmp_path / "mixed.npy.gz"
    gz.write_bytes(gzip.compress(data, compresslevel=1))
    want = expected_elements(np.load(io.BytesIO(data), allow_pickle=True))
    assert_same_elements(list(npystream.iter_objects(gz)), want)
    assert len(spills) >= 3
