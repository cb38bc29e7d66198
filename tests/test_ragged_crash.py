"""Ragged store crash safety: writers killed with SIGKILL at random instants, concurrent readers.

Every element i of the stores written here is ``_elem(i)``, so any state a
reader can see must be a prefix of one known sequence: the checks compare the
whole mapped values/offsets against that sequence, and the parts against what
``np.load`` (without npystream) reads.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from npystream.errors import FormatError
from npystream.formats.ragged import RaggedArray, RaggedWriter

TARGET = 3000
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL")


def _elem(i: int) -> np.ndarray:
    return np.arange(i % 53, dtype="<i4") + i


_LENS = np.array([i % 53 for i in range(TARGET)], dtype=np.int64)
EXP_OFFS = np.concatenate([[0], np.cumsum(_LENS)])
EXP_VALS = np.concatenate([_elem(i) for i in range(TARGET)])


def _write(path: str, mode: str, buffer_size: int, pause_every: int = 0) -> None:
    with RaggedWriter(path, mode=mode, dtype="<i4", durable=False, buffer_size=buffer_size,
                      commit_bytes=buffer_size) as w:
        for i in range(len(w), TARGET):
            w.append(_elem(i))
            if pause_every and i % pause_every == 0:
                time.sleep(0.001)


def _fork_writer(path: str, mode: str, buffer_size: int, pause_every: int = 0) -> int:
    pid = os.fork()
    if pid == 0:  # the child: write, never return into pytest
        code = 1
        try:
            _write(path, mode, buffer_size, pause_every)
            code = 0
        finally:
            os._exit(code)
    return pid


def _check_prefix(path: str) -> int:
    """Open the store as a reader would; assert it is a prefix of the sequence; return its length."""
    r = RaggedArray(path)
    n = len(r)
    assert 0 <= n <= TARGET
    offs = np.asarray(r.offsets)
    assert offs.tolist() == EXP_OFFS[: n + 1].tolist()
    assert np.array_equal(np.asarray(r.values), EXP_VALS[: EXP_OFFS[n]])
    if n:
        assert r[-1].tolist() == _elem(n - 1).tolist()
    # the parts alone, read by numpy: whatever their headers claim is fully written and correct
    vals = np.load(os.path.join(path, "values.npy"), mmap_mode="r")
    offs_np = np.load(os.path.join(path, "offsets.npy"), mmap_mode="r")
    assert len(offs_np) >= 1 and np.array_equal(offs_np, EXP_OFFS[: len(offs_np)])
    assert np.array_equal(vals, EXP_VALS[: len(vals)])
    return n


def _run_kills(tmp_path, iterations: int, seed: int) -> None:
    rnd = random.Random(seed)
    path = str(tmp_path / "k.ragged")
    last = 0
    kills = 0
    for it in range(iterations):
        # a complete store would make the next append finish at once: start it over then
        mode = "w" if it % 9 == 8 or last == TARGET else "a"
        buffer_size = rnd.choice([64, 512, 4096])
        # a 1 ms pause every 25 elements: a whole run takes > 100 ms, so the kill (< 30 ms) lands mid-write
        pid = _fork_writer(path, mode, buffer_size, pause_every=25)
        time.sleep(rnd.uniform(0, 0.03))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        kills += os.WIFSIGNALED(status)
        if not os.path.exists(path):
            # only possible while the very first store, or a mode='w' replacement, was being
            # renamed into place; never a half-created store at the path
            assert mode == "w" or last == 0
            last = 0
            continue
        n = _check_prefix(path)
        if mode == "a":
            assert n >= last, "an append after a crash lost committed elements"
        last = n
    assert kills >= iterations // 3, "the writers finished before being killed: test is not testing"
    # resume to the end: the store completes from whatever prefix survived
    _write(path, "a", 4096)
    assert _check_prefix(path) == TARGET
    leftovers = [f for f in os.listdir(tmp_path) if f != "k.ragged"]
    assert all(f.startswith(".k.ragged.") for f in leftovers), leftovers
    # what the killed creators left is removed by the next creation, once older than _STALE_AGE
    for f in leftovers:
        os.utime(tmp_path / f, (time.time() - 60, time.time() - 60))
    _write(path, "w", 4096)
    assert _check_prefix(path) == TARGET
    assert os.listdir(tmp_path) == ["k.ragged"]


@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_at_random_points_leaves_a_consistent_prefix(tmp_path, seed):
    _run_kills(tmp_path, iterations=60, seed=seed)


def test_sigkill_real_subprocesses(tmp_path):
    """The same with freshly started interpreters (the way a training job dies)."""
    path = str(tmp_path / "s.ragged")
    code = (
        "import sys, numpy as np\n"
        "from npystream.formats.ragged import RaggedWriter\n"
        "with RaggedWriter(sys.argv[1], mode='a', dtype='<i4', durable=False, buffer_size=256,\n"
        "                  commit_bytes=256) as w:\n"
        "    print('ready', flush=True)\n"
        f"    for i in range(len(w), {TARGET}):\n"
        "        w.append(np.arange(i % 53, dtype='<i4') + i)\n"
    )
    rnd = random.Random(7)
    last = 0
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", code, path], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        time.sleep(rnd.uniform(0, 0.03))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        n = _check_prefix(path)
        assert n >= last
        last = n
    _write(path, "a", 4096)
    assert _check_prefix(path) == TARGET


def test_durable_writer_survives_kill_too(tmp_path):
    path = str(tmp_path / "d.ragged")
    pid = os.fork()
    if pid == 0:
        try:
            with RaggedWriter(path, mode="a", dtype="<i4", durable=True, buffer_size=2048,
                              commit_bytes=2048) as w:
                for i in range(len(w), TARGET):
                    w.append(_elem(i))
        finally:
            os._exit(0)
    time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    if os.path.exists(path):
        _check_prefix(path)


def test_concurrent_reader_sees_growing_prefixes(tmp_path):
    path = str(tmp_path / "c.ragged")
    with RaggedWriter(path, dtype="<i4", durable=False):
        pass  # an empty store exists before the writer starts
    pid = _fork_writer(path, "a", 1024, pause_every=40)
    seen = []
    try:
        while True:
            done = os.waitpid(pid, os.WNOHANG)[0] == pid
            try:
                seen.append(_check_prefix(path))
            except FormatError:  # pragma: no cover - would be the bug this test is for
                raise
            if done:
                break
    finally:
        if not seen or seen[-1] != TARGET:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # already reaped
    assert seen == sorted(seen), "a reader saw the store shrink"
    assert seen[-1] == TARGET
    assert len(set(seen)) >= 3, f"the reader did not overlap the writer: {sorted(set(seen))[:10]}"
