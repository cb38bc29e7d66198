"""RaggedWriter(write_behind=True): the buffer's pwrite() on a helper thread; the same store."""

from __future__ import annotations

import errno
import os
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import npystream.formats.ragged as ragged
from npystream.errors import NpyStreamError
from npystream.formats.ragged import RaggedArray, RaggedWriter


def _store_bytes(path):
    return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


def _items(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(int(k), dtype=np.float32) for k in rng.integers(0, 5000, n)]


def _helpers():
    """The writer helper threads: Python ones by name; the C helper is not a Python thread, but
    names itself "npystream-wb" (on Linux: /proc/self/task/N/comm)."""
    named = [t for t in threading.enumerate() if t.name == "npystream-ragged-writer"]
    if ragged._C_WRITE_BEHIND is None or not os.path.isdir("/proc/self/task"):
        return named
    native = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                if f.read().strip() == "npystream-wb":
                    native.append(None)
        except OSError:  # the thread ended meanwhile
            pass
    return named + native


@pytest.fixture(params=["c", "python"])
def helper(request, monkeypatch):
    """Run a test with the C helper thread (npystream._speedups.WriteBehind) and with the Python one."""
    if request.param == "c":
        if ragged._C_WRITE_BEHIND is None:
            pytest.skip("no C helper (pure Python mode or no compiler)")
    else:
        monkeypatch.setattr(ragged, "_C_WRITE_BEHIND", None)
    return request.param


class _Proxy:
    """Stands for a helper object whose methods a test replaces (C objects take no attributes)."""

    def __init__(self, wb):
        self._inner = wb

    def __getattr__(self, name):
        return getattr(self._inner, name)


@pytest.mark.parametrize("durable", [False, True])
def test_same_store_as_without(tmp_path, durable, helper):
    items = _items()
    big = np.arange(20_000, dtype=np.float32)  # larger than the buffer: written directly
    for name, behind in (("a.ragged", False), ("b.ragged", True)):
        with RaggedWriter(tmp_path / name, buffer_size=8192, commit_bytes=100_000, durable=durable,
                          write_behind=behind) as w:
            for i, x in enumerate(items):
                w.append(x)
                if i == 150:
                    w.flush()
                    assert len(RaggedArray(tmp_path / name)) == 151  # a commit waits for the writes
                    w.append(big)
    assert _store_bytes(tmp_path / "a.ragged") == _store_bytes(tmp_path / "b.ragged")
    with RaggedWriter(tmp_path / "b.ragged", mode="a", buffer_size=8192, write_behind=True) as w:
        w.extend(items[:10])
    r = RaggedArray(tmp_path / "b.ragged")
    expected = items[:151] + [big] + items[151:] + items[:10]
    assert len(r) == len(expected) and all(np.array_equal(a, b) for a, b in zip(expected, r))


@pytest.mark.parametrize("kind", ["str", "bytes", "object"])
def test_other_kinds(tmp_path, kind, helper):
    make = {"str": lambda i: "é" * (i % 50), "bytes": lambda i: bytes(i % 50),
            "object": lambda i: {"i": i, "s": "x" * (i % 50)}}[kind]
    items = [make(i) for i in range(500)]
    for name, behind in (("a.ragged", False), ("b.ragged", True)):
        with RaggedWriter(tmp_path / name, kind=kind, buffer_size=512, durable=False,
                          write_behind=behind) as w:
            w.extend(items)
    assert _store_bytes(tmp_path / "a.ragged") == _store_bytes(tmp_path / "b.ragged")


def test_error_in_the_helper_is_raised_and_breaks_the_writer(tmp_path, helper):
    """A disk-full error in the helper thread (values.npy's descriptor pointed at /dev/full) is
    raised in the writer's thread, breaks the writer, and leaves the last commit."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    items = _items(200, seed=1)
    before = len(_helpers())
    w = RaggedWriter(tmp_path / "a.ragged", buffer_size=8192, durable=False, write_behind=True)
    append = w.append
    for x in items[:50]:
        append(x)
    w.flush()
    fd = w._fds[ragged.VALUES]
    keep = os.dup(fd)
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, fd)
    os.close(full)
    try:
        with pytest.raises(OSError) as info:
            for x in items[50:]:
                append(x)
            w.flush()
        assert info.value.errno == errno.ENOSPC
        with pytest.raises(NpyStreamError, match="failed while writing"):
            append(items[0])
    finally:
        os.dup2(keep, fd)
        os.close(keep)
    w.close()
    assert len(RaggedArray(tmp_path / "a.ragged")) == 50  # the last commit
    assert len(_helpers()) == before


@pytest.mark.skipif(ragged._C_WRITE_BEHIND is None, reason="no C helper")
def test_c_helper_contract(tmp_path):
    """npystream._speedups.WriteBehind on its own: queued writes land, busy(), refused arguments,
    sticky errors, stop()."""
    wb = ragged._C_WRITE_BEHIND(3)
    assert wb.depth == 3
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        rng = np.random.default_rng(0)
        pieces = [rng.integers(0, 256, int(n), dtype=np.uint8) for n in rng.integers(0, 300_000, 20)]
        pieces += [b"bytes", bytearray(b"array"), memoryview(b"view")]
        offsets = np.cumsum([0] + [len(bytes(p)) for p in pieces])
        for p, off in zip(pieces, offsets):
            wb.submit(fd, p, int(off) + 7)  # more writes than the queue holds: submit waits for room
        assert isinstance(wb.busy(), bool)
        wb.wait()
        assert not wb.busy()
        want = b"".join(bytes(p) for p in pieces)
        assert os.pread(fd, len(want) + 10, 7) == want
        with pytest.raises(TypeError):
            wb.submit(fd, object(), 0)
        with pytest.raises((BufferError, ValueError)):
            wb.submit(fd, np.arange(10)[::2], 0)  # not contiguous
        with pytest.raises(ValueError):
            wb.submit(fd, b"x", -1)
        wb.wait()  # the refused writes were never handed over
        bad = os.open(tmp_path / "ro", os.O_RDONLY | os.O_CREAT)
        wb.submit(bad, b"x" * 10, 0)
        with pytest.raises(OSError) as info:
            wb.wait()
        assert info.value.errno == errno.EBADF
        with pytest.raises(OSError):  # sticky
            wb.submit(fd, b"y", 0)
        os.close(bad)
        wb.stop()  # drops the error, ends the thread
        wb.stop()
        with pytest.raises(ValueError, match="stopped"):
            wb.submit(fd, b"y", 0)
        with pytest.raises(ValueError):
            ragged._C_WRITE_BEHIND(0)
    finally:
        os.close(fd)


@pytest.mark.parametrize("when", ["before", "after"])
def test_interrupt_while_handing_over_a_write(tmp_path, monkeypatch, helper, when):
    """Ctrl-C as a full buffer is handed to the helper, before or after the hand-over (submit()
    waits for room first): close() still commits every element appended before the interrupt,
    and the interrupted one or not."""
    items = [np.concatenate([x] * 8) for x in _items(100, seed=2)]
    w = RaggedWriter(tmp_path / "a.ragged", buffer_size=1 << 18, durable=False, write_behind=True)
    append = w.append
    for x in items[:40]:
        append(x)
    wb = w._wb = _Proxy(w._wb)
    real_submit = wb.submit
    calls = []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 1 and when == "before":
            raise KeyboardInterrupt
        real_submit(*args)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(wb, "submit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        for x in items[40:]:
            append(x)
    n = len(w)
    w.close()  # still consistent: commits every element appended before the interrupt
    r = RaggedArray(tmp_path / "a.ragged")
    assert n - 1 <= len(r) <= n and all(np.array_equal(a, b) for a, b in zip(items, r))
    assert len(r) >= 40


def test_helper_thread_ends_with_the_writer(tmp_path, helper):
    before = len(_helpers())
    w = RaggedWriter(tmp_path / "a.ragged", buffer_size=4096, durable=False, write_behind=True)
    for x in _items(50, seed=3):
        w.append(x)
    assert len(_helpers()) == before + 1
    w.close()
    assert len(_helpers()) == before
    assert len(RaggedArray(tmp_path / "a.ragged")) == 50
    with RaggedWriter(tmp_path / "b.ragged", write_behind=True, durable=False) as w:
        pass  # no element: no buffer, no thread
    assert len(_helpers()) == before


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=0, max_size=40),
    buffer_size=st.sampled_from([64, 1000, 4096, 1 << 20]),
    commit_bytes=st.sampled_from([1, 5000, 64 << 20]),
    flush_at=st.integers(0, 40),
)
def test_any_mix_of_paths_gives_the_same_store(tmp_path_factory, sizes, buffer_size, commit_bytes,
                                                flush_at):
    """append() vs append_from_file() (preadv / copy_file_range), write-behind on and off."""
    tmp_path = tmp_path_factory.mktemp("mix")
    rng = np.random.default_rng(len(sizes))
    arrays = [rng.integers(-1000, 1000, n).astype("<i4") for n in sizes]
    src = tmp_path / "src.bin"
    offsets = []
    with open(src, "wb") as f:
        for a in arrays:
            f.write(b"\x07" * 3)
            offsets.append(f.tell())
            f.write(a.tobytes())
    fd = os.open(src, os.O_RDONLY)
    stores = []
    try:
        for behind, from_file in ((False, False), (True, False), (False, True), (True, True)):
            path = tmp_path / f"{behind}-{from_file}.ragged"
            with RaggedWriter(path, dtype="<i4", buffer_size=buffer_size, commit_bytes=commit_bytes,
                              durable=False, write_behind=behind) as w:
                for i, (a, off) in enumerate(zip(arrays, offsets)):
                    if from_file and hasattr(os, "preadv"):
                        w.append_from_file(a, fd, off)  # a's bytes are at off in src
                    else:
                        w.append(a)
                    if i == flush_at:
                        w.flush()
            stores.append(_store_bytes(path))
    finally:
        os.close(fd)
    assert all(s == stores[0] for s in stores[1:])
    r = RaggedArray(tmp_path / "True-True.ragged")
    assert len(r) == len(arrays) and all(np.array_equal(a, b) for a, b in zip(arrays, r))


def test_interrupts_at_random_instants_never_hang_nor_corrupt(tmp_path, helper):
    """Ctrl-C (a real SIGINT, raised at whatever bytecode the writer is at) inside appends with
    write-behind: the with-block aborts, the store stays a prefix of the sequence, appending resumes.

    Real signals land where they land, so this does not reliably reach the old hang (an interrupt
    between collecting a write's result and recording it blocked the next wait() forever); the
    line-by-line injection tests below pin that one.
    """
    import random
    import signal
    import time

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are delivered to the main thread")
    before = len(_helpers())
    items = _items(400, seed=3)
    expect = np.concatenate(items)
    path = tmp_path / "i.ragged"
    rnd = random.Random(7)
    interrupted = 0
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        for _ in range(40):
            timer = threading.Timer(rnd.uniform(0, 0.004), os.kill, (os.getpid(), signal.SIGINT))
            try:
                with RaggedWriter(path, mode="a", dtype="<f4", buffer_size=4096, commit_bytes=16384,
                                  write_behind=True) as w:
                    timer.start()
                    for x in items[len(w):]:
                        w.append(x)
                    time.sleep(0.01)  # let a late timer fire here rather than in the checks
            except KeyboardInterrupt:
                interrupted += 1
            finally:
                timer.cancel()
                timer.join()
            if not path.exists():  # interrupted before the store's first commit: nothing published
                continue
            r = RaggedArray(path)
            n = len(r)
            assert np.asarray(r.offsets).tolist()[1:] == np.cumsum([len(x) for x in items[:n]]).tolist()
            assert np.array_equal(np.asarray(r.values), expect[: int(r.offsets[-1])])
            if n == len(items):
                path_w = RaggedWriter(path, mode="w", dtype="<f4")
                path_w.close()
    finally:
        signal.signal(signal.SIGINT, old)
    assert interrupted >= 10, f"only {interrupted} of 40 runs were interrupted: the test is not testing"
    import gc

    gc.collect()
    for t in _helpers():  # an interrupt inside close() itself: the thread ends once collected
        if t is not None:
            t.join(5)
    deadline = time.monotonic() + 5
    while len(_helpers()) > before and time.monotonic() < deadline:  # C helpers: joined on collection
        time.sleep(0.01)
    assert len(_helpers()) <= before, "a helper thread outlived its writer"


def _interrupt_at_line(where: str, line: int, seen: list[int]):
    """A sys.settrace function raising KeyboardInterrupt at the ``line``-th line event of ragged's
    functions named ``where`` (counted in ``seen[0]``): an interrupt at that exact statement."""

    def tracer(frame, event, arg):
        if frame.f_code.co_name != where or frame.f_globals is not ragged.__dict__:
            return None

        def local(frame, event, arg):
            if event == "line":
                seen[0] += 1
                if seen[0] == line:
                    raise KeyboardInterrupt
            return local

        return local(frame, event, arg)

    return tracer


@pytest.mark.parametrize("where", ["submit", "wait"])
def test_write_behind_survives_an_exception_at_every_line(tmp_path, where):
    """KeyboardInterrupt injected (with a trace function) at each line of submit()/wait() in turn:
    a later wait() returns (no hang), only when the write is done, and the bytes are on disk."""
    import sys

    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    prev = b""
    try:
        k = 0
        while True:
            wb = ragged._WriteBehind()
            data = np.full(1 << 16, k % 251, dtype=np.uint8)
            seen = [0]
            tracer = _interrupt_at_line(where, k + 1, seen)

            if where == "wait":
                wb.submit(fd, data, 0)
            sys.settrace(tracer)
            try:
                if where == "submit":
                    wb.submit(fd, data, 0)
                else:
                    wb.wait()
            except KeyboardInterrupt:
                pass
            finally:
                sys.settrace(None)
            waiter = threading.Thread(target=wb.wait, daemon=True)
            waiter.start()
            waiter.join(10)
            assert not waiter.is_alive(), f"wait() hangs after an interrupt at line {k + 1} of {where}()"
            # wait() returned: no write in flight, the file holds one whole buffer
            got = os.pread(fd, 1 << 16, 0)
            assert got == bytes(data) or (where == "submit" and got == prev), f"line {k + 1} of {where}()"
            prev = got
            wb.stop()
            if seen[0] <= k:  # the call ran to completion without reaching line k + 1: all lines done
                break
            k += 1
        assert k >= 2
        # the last round ran uninterrupted: its bytes are there
        assert os.pread(fd, 1 << 16, 0) == bytes(data)
    finally:
        os.close(fd)


@pytest.mark.parametrize("behind", [False, True])
@pytest.mark.parametrize("where", ["append", "_spill", "_spill_behind", "_rotate", "_append_slow", "_commit_now"])
def test_interrupt_at_every_line_of_an_append_leaves_a_prefix(tmp_path, where, behind, helper):
    """KeyboardInterrupt injected at each line of the writer's append machinery in turn, on the append
    that fills the buffer: the with-block salvages (commits only a whole state) and the store is the
    sequence's prefix, the interrupted element included or not."""
    import sys

    if where in ("_spill_behind", "_rotate") and not behind:
        pytest.skip("only with write-behind")
    items = [np.arange(k, dtype="<f4") + k for k in range(1, 40)]
    if where == "_append_slow":
        items[30] = items[30].astype("<f8")  # not the store's dtype: the slow path (cast="same_kind")
    k = 0
    while True:
        path = tmp_path / f"s{k}.ragged"
        with RaggedWriter(path, dtype="<f4", buffer_size=256, commit_bytes=1 << 20, write_behind=behind,
                          cast="same_kind") as w:
            for x in items[:30]:
                w.append(x)
        seen = [0]
        tracer = _interrupt_at_line(where, k + 1, seen)

        try:
            with RaggedWriter(path, mode="a", buffer_size=256, commit_bytes=1 << 20, write_behind=behind,
                              cast="same_kind") as w:
                sys.settrace(tracer)
                try:
                    for x in items[30:]:
                        w.append(x)
                    if where == "_commit_now":
                        w.flush()
                finally:
                    sys.settrace(None)
        except KeyboardInterrupt:
            pass
        r = RaggedArray(path)
        n = len(r)
        assert 30 <= n <= len(items), (where, k)
        want = np.concatenate(items[:n]).astype("<f4")
        assert np.array_equal(np.asarray(r.values), want), (where, k)
        assert [len(r[i]) for i in range(n)] == [len(x) for x in items[:n]]
        if seen[0] <= k:  # ran to the end uninterrupted: every line was tried
            break
        k += 1
    assert n == len(items) and k >= 3
