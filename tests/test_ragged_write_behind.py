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
    return [t for t in threading.enumerate() if t.name == "npystream-ragged-writer"]


@pytest.mark.parametrize("durable", [False, True])
def test_same_store_as_without(tmp_path, durable):
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
def test_other_kinds(tmp_path, kind):
    make = {"str": lambda i: "é" * (i % 50), "bytes": lambda i: bytes(i % 50),
            "object": lambda i: {"i": i, "s": "x" * (i % 50)}}[kind]
    items = [make(i) for i in range(500)]
    for name, behind in (("a.ragged", False), ("b.ragged", True)):
        with RaggedWriter(tmp_path / name, kind=kind, buffer_size=512, durable=False,
                          write_behind=behind) as w:
            w.extend(items)
    assert _store_bytes(tmp_path / "a.ragged") == _store_bytes(tmp_path / "b.ragged")


def test_error_in_the_helper_is_raised_and_breaks_the_writer(tmp_path, monkeypatch):
    items = _items(200, seed=1)
    w = RaggedWriter(tmp_path / "a.ragged", buffer_size=8192, durable=False, write_behind=True)
    for x in items[:50]:
        w.append(x)
    w.flush()
    real = ragged._pwrite_all

    def failing(fd, data, offset):
        if memoryview(data).nbytes > 1000:  # the buffer's writes, not headers or meta.json
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data, offset)

    monkeypatch.setattr(ragged, "_pwrite_all", failing)
    with pytest.raises(OSError) as info:
        for x in items[50:]:
            w.append(x)
        w.flush()
    assert info.value.errno == errno.ENOSPC
    monkeypatch.setattr(ragged, "_pwrite_all", real)
    with pytest.raises(NpyStreamError, match="failed while writing"):
        w.append(items[0])
    w.close()
    assert len(RaggedArray(tmp_path / "a.ragged")) == 50  # the last commit
    assert _helpers() == []


def test_interrupt_while_waiting_for_the_helper(tmp_path, monkeypatch):
    items = _items(100, seed=2)
    w = RaggedWriter(tmp_path / "a.ragged", buffer_size=4096, durable=False, write_behind=True)
    for x in items[:40]:
        w.append(x)
    wb = w._wb
    real_wait = wb.wait
    calls = []

    def interrupted():
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C while the previous buffer is being written
        real_wait()

    monkeypatch.setattr(wb, "wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        for x in items[40:]:
            w.append(x)
    n = len(w)
    w.close()  # still consistent: commits every element appended before the interrupt
    r = RaggedArray(tmp_path / "a.ragged")
    assert len(r) == n and all(np.array_equal(a, b) for a, b in zip(items, r))


def test_helper_thread_ends_with_the_writer(tmp_path):
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
