"""The forward-only streaming reader (``npystream.formats.pickle_stream``): exact results, memory of one batch.

numpy (``np.load``) is the oracle.  Most tests run twice: with the module's
real limits, and with tiny ones (reads of 512 bytes, a 2 KiB window, payload
hand-off from 4 KiB) so that small files exercise window compaction/growth
and the payload path in every batch.  A spy records the size of each batch
the reader decoded.
"""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hostile_pickles import array_elem, envelope, integer, npy_file, raw_bytes
from objcases import (
    CASE_NAMES,
    assert_same_elements,
    case,
    case_bytes,
    expected_elements,
    obj_array,
)
from short_reads import ShortReads

import npystream
from npystream import FormatError, TruncatedError, UnsupportedError
from npystream.formats import pickle_stream as ps

_Pipe = ShortReads


TINY = {
    "STREAM_READ": 512,
    "WINDOW_MIN": 2048,
    "ZC_MIN": 256,
    "HAND_OFF": 4096,
    "LARGE_ELEMENT_BYTES": 256,
    "_ROOM_AFTER_BIG": 2 * 512,
    "CHUNK_BYTES": 4096,
}


@pytest.fixture
def spy(monkeypatch):
    """Per closed batch: the number of elements in it."""
    seen: list[int] = []
    orig = ps._StreamReader._close_batch

    def close_batch(self, starts, memo_at, end, memo_end):
        seen.append(len(starts))
        return orig(self, starts, memo_at, end, memo_end)

    monkeypatch.setattr(ps._StreamReader, "_close_batch", close_batch)
    return seen


@pytest.fixture(params=["real", "tiny"])
def limits(request, monkeypatch):
    """The module's limits, or tiny ones that make small files grow, compact and hand off the window."""
    if request.param == "tiny":
        for name, value in TINY.items():
            monkeypatch.setattr(ps, name, value)
    return request.param


def _npy(arr: np.ndarray, protocol: int | None = None) -> bytes:
    buf = io.BytesIO()
    if protocol is None:
        np.save(buf, arr, allow_pickle=True)
        return buf.getvalue()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(arr))
    import pickle

    return buf.getvalue() + pickle.dumps(arr, protocol=protocol)


def _expected(data: bytes) -> list:
    return expected_elements(np.load(io.BytesIO(data), allow_pickle=True))


def _sources(data: bytes):
    yield "pipe", _Pipe(data)
    yield "pipe-1", _Pipe(data, step=1 << 20)
    yield "gzip", io.BytesIO(gzip.compress(data, compresslevel=1))


def _drain(source) -> tuple[list, BaseException | None]:
    got: list = []
    try:
        for x in npystream.iter_objects(source):
            got.append(x)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return got, exc
    return got, None


def _arrays(n: int, lo: int, hi: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return obj_array([rng.standard_normal(int(rng.integers(lo, hi))).astype(np.float32) for _ in range(n)])


# ---------------------------------------------------------------------------
# exact results


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 999, 1000, 1001, 1003, 2004, 3005])
def test_arrays_many_batches_equal_np_load(limits, spy, n):
    """Batch sizes around the margin (last batch of 1..6 elements), pipes and gzip."""
    data = _npy(_arrays(n, 50, 700, seed=n))
    expected = _expected(data)
    for _name, src in _sources(data):
        spy.clear()
        assert_same_elements(npystream.iter_objects(src), expected)
        assert sum(spy) == n
        assert max(spy, default=0) <= 1000  # numpy's batches


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_structures_equal_np_load(limits, spy, protocol):
    """Elements built with BUILD/SETITEM(S)/TUPLE1-3/APPEND(S), nested, with arrays inside."""
    rng = np.random.default_rng(protocol)
    items = []
    for i in range(2600):
        a = rng.standard_normal(int(rng.integers(1, 300)))
        kind = i % 9
        if kind == 0:
            items.append({"x": a, "label": i})  # SETITEMS
        elif kind == 1:
            items.append({"only": a})  # SETITEM
        elif kind == 2:
            items.append((a, i))  # TUPLE2
        elif kind == 3:
            items.append((a, (i, (a[:3].copy(), "s"))))  # nested TUPLE2/TUPLE3
        elif kind == 4:
            items.append([[a], [[i]], []])  # nested lists, APPEND
        elif kind == 5:
            items.append(a.reshape(-1, 1) if len(a) % 2 else np.asfortranarray(np.outer(a[:5], a[:4])))
        elif kind == 6:
            items.append((1, (2, (3, (4, (5, a[:20]))))))  # deep TUPLE2 chain: many pending slots
        elif kind == 7:
            items.append({"k": {"k": {"k": i}}})  # SETITEM chain of small objects
        else:
            items.append(a.astype(np.float32))
    data = _npy(obj_array(items), protocol=protocol)
    expected = _expected(data)
    for _name, src in _sources(data):
        spy.clear()
        assert_same_elements(npystream.iter_objects(src), expected)
        assert sum(spy) == len(items)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_corpus_tiny_limits(monkeypatch, name):
    """Every corpus case through a pipe with tiny limits: exact, or the documented UnsupportedError."""
    for key, value in TINY.items():
        monkeypatch.setattr(ps, key, value)
    data = case_bytes(case(name))
    expected = expected_elements(np.load(io.BytesIO(data), allow_pickle=True, encoding="latin1"))
    kw = {"encoding": "latin1"} if "py2" in name or "protocol2" in name else {}
    got = []
    try:
        for x in npystream.iter_objects(_Pipe(data, step=333), **kw):
            got.append(x)
    except UnsupportedError as exc:
        assert exc.index is not None and exc.offset is not None
        assert_same_elements(got[: exc.index], expected[: exc.index])
        return
    assert_same_elements(got, expected)


def test_memo_back_references_within_and_across_batches(limits):
    """The same object twice: adjacent, within a batch, across batches (small ones are retained)."""
    small = np.arange(7.0)
    shared_dict = {"a": small}
    mid = np.arange(300, dtype=np.int32)
    items = [small, small, shared_dict, (small, mid)]
    rng = np.random.default_rng(1)
    items += [rng.standard_normal(200) for _ in range(1500)]
    items += [small, shared_dict, mid, (mid, small)]
    data = _npy(obj_array(items))
    expected = _expected(data)
    for _name, src in _sources(data):
        got = list(npystream.iter_objects(src))
        assert_same_elements(got, expected)
        assert got[0] is got[1]  # same object, like np.load
        assert got[-4] is got[0] and got[-3] is got[2]


def test_big_shared_object_far_apart_is_exact_or_unsupported(monkeypatch, spy):
    """A large object read back in a later batch: UnsupportedError after an exact prefix, never garbage;
    read back within its batch: exact, the same object."""
    for key, value in TINY.items():
        monkeypatch.setattr(ps, key, value)
    monkeypatch.setattr(ps, "RETAIN_ONE", 1024)  # 'large' for the retention budget
    big = np.arange(2000.0)  # 16 KB: above the patched RETAIN_ONE
    rng = np.random.default_rng(2)
    fill = [rng.standard_normal(100) for _ in range(1200)]  # the second reference is in the next batch
    data = _npy(obj_array([big, *fill, big]))
    expected = _expected(data)
    got, exc = _drain(_Pipe(data))
    assert isinstance(exc, UnsupportedError), exc
    assert "seekable" in str(exc) and exc.index == 1201
    assert_same_elements(got, expected[:1201])
    # read back within the batch (~250 KB apart, far above the tiny window): exact, the same object
    near = _npy(obj_array([*fill[:50], big, *fill[50:350], big, *fill[350:400]]))
    spy.clear()
    got = list(npystream.iter_objects(_Pipe(near)))
    assert_same_elements(got, _expected(near))
    assert got[50] is got[351]
    assert spy == [402]


# ---------------------------------------------------------------------------
# pickles that fold stack slots across what looks like element boundaries


def _folding_file(n_slots: int, payload: int) -> bytes:
    """Element 0: ``n_slots`` bytes objects pushed, then folded into one nested tuple by TUPLE2s; then small ints.

    (Enough small elements follow to make the header's count honest.)
    """
    body = b"".join(raw_bytes(bytes([i % 251]) * payload) for i in range(n_slots)) + b"\x86" * (n_slots - 1)
    body += b"".join(integer(i) for i in range(n_slots))
    return npy_file(envelope(body, (n_slots + 1,)), (n_slots + 1,))


@pytest.mark.parametrize("n_slots,payload", [(4, 10), (40, 100), (40, 2000), (200, 600)])
def test_fold_across_slots_is_exact(limits, spy, n_slots, payload):
    """Slots that look like elements until the TUPLE2s at the end fold them into one: exact."""
    data = _folding_file(n_slots, payload)
    expected = _expected(data)
    assert len(expected) == n_slots + 1 and isinstance(expected[0], tuple)
    got, exc = _drain(_Pipe(data, step=100))
    assert exc is None, exc
    assert_same_elements(got, expected)
    assert spy == [n_slots + 1]


def test_fold_after_valid_elements_is_exact(limits):
    """Valid elements, then slots that a later TUPLE2 chain folds, then more elements: all exact."""
    good = [array_elem("<f8", "<", (50,), np.arange(50.0).tobytes()) for _ in range(30)]
    folded = b"".join(raw_bytes(bytes([i]) * 300) for i in range(30)) + b"\x86" * 29
    body = b"".join(good) + folded + b"".join(integer(i) for i in range(30))
    data = npy_file(envelope(body, (61,)), (61,))
    got, exc = _drain(_Pipe(data, step=200))
    assert exc is None, exc
    assert_same_elements(got, _expected(data))


# ---------------------------------------------------------------------------
# damage


def test_truncation_at_every_byte(limits):
    """Every cut of a small valid stream: TruncatedError (or FormatError), a correct prefix before it."""
    rng = np.random.default_rng(3)
    items = [rng.standard_normal(int(rng.integers(20, 60))) for _ in range(6)] + [{"k": (1, 2)}, "s", None]
    data = _npy(obj_array(items))
    expected = _expected(data)
    for cut in range(len(data)):
        got, exc = _drain(_Pipe(data[:cut], step=97))
        assert isinstance(exc, FormatError), f"cut {cut}: {exc!r}"
        if cut >= 128:
            assert isinstance(exc, TruncatedError), f"cut {cut}: {exc!r}"
            assert exc.offset is not None and exc.offset <= cut
        assert_same_elements(got, expected[: len(got)])


def test_damage_inside_a_batch(monkeypatch):
    """A bad opcode deep in a batch: the elements before it (tentatively, one by one), then FormatError."""
    for key, value in TINY.items():
        monkeypatch.setattr(ps, key, value)
    good = [array_elem("<f8", "<", (40,), np.full(40, float(i)).tobytes()) for i in range(60)]
    body = b"".join(good) + b"\xff" + b"".join(good[:5])
    data = npy_file(envelope(body, (66,)), (66,))
    got, exc = _drain(_Pipe(data, step=150))
    assert isinstance(exc, FormatError) and not isinstance(exc, TruncatedError), exc
    assert len(got) >= 30
    for i, x in enumerate(got):
        np.testing.assert_array_equal(x, np.full(40, float(i)))


def test_stop_yields_exactly_stop(limits):
    from npystream.formats.npy import read_header
    from npystream.formats.pickle_walk import SafetyPolicy, iter_elements
    from npystream.sources import StreamSource

    data = _npy(_arrays(2500, 10, 400))
    expected = _expected(data)
    for stop in (0, 1, 999, 1000, 1700):
        src = StreamSource(_Pipe(data), "pipe", owned=False)
        header = read_header(src)
        got = list(iter_elements(src, header, SafetyPolicy.make(), stop=stop))
        assert_same_elements(got, expected[:stop])


def test_single_huge_element_is_its_own_memory(monkeypatch):
    """A payload that fills the window becomes the array's memory: no copy, writeable, equal."""
    monkeypatch.setattr(ps, "HAND_OFF", 1 << 20)
    big = np.random.default_rng(4).standard_normal(3 << 20 >> 3)  # 3 MiB
    items = [np.arange(3.0), big, "tail", np.arange(5)]
    data = _npy(obj_array(items))
    got = list(npystream.iter_objects(_Pipe(data)))
    assert_same_elements(got, _expected(data))
    arr = got[1]
    assert arr.flags.writeable and arr.flags.aligned and not arr.flags.owndata
    arr[0] = 1.0  # writeable memory no one else uses
    assert got[3][0] == 0


# ---------------------------------------------------------------------------
# memory: a subprocess streams a file through a real pipe, sampling RssAnon

_MEM_SCRIPT = textwrap.dedent(
    """
    import sys, threading, time
    def rss():
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('RssAnon:'):
                    return int(line.split()[1]) * 1024
    peak = [0]
    done = [False]
    def sample():
        while not done[0]:
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)
    import numpy as np, npystream
    base = rss()
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    n = 0
    total = 0.0
    for x in npystream.iter_objects(sys.stdin.buffer):
        n += 1
        total += float(x[0])
    done[0] = True
    t.join()
    peak[0] = max(peak[0], rss())
    print(n, base, peak[0], total)
    """
)


@pytest.mark.slow
def test_pipe_memory_is_one_batch(tmp_path):
    """~190 MB of 64 KB arrays (three batches of ~64 MB) through a real pipe (``cat``): exact, and peak
    RssAnon about one batch of raw bytes, far below the file (np.load holds all of it, twice)."""
    rng = np.random.default_rng(5)
    n = 3000
    arr = np.empty(n, dtype=object)
    for i in range(n):
        arr[i] = np.full(16_000, i, dtype=np.float32) + rng.standard_normal(1).astype(np.float32)
    path = tmp_path / "big.npy"
    np.save(path, arr)
    expect = sum(float(a[0]) for a in arr)
    del arr
    size = path.stat().st_size
    batch = size / 3
    assert size > 190e6
    env = dict(os.environ)  # NPYSTREAM_PURE_PYTHON passes through: both paths are bounded
    cat = subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE)
    try:
        out = subprocess.run(
            [sys.executable, "-c", _MEM_SCRIPT], stdin=cat.stdout, capture_output=True, text=True, env=env, timeout=300,
            check=True,
        )
    finally:
        assert cat.stdout is not None
        cat.stdout.close()
        cat.wait()
    count, base, peak, total = out.stdout.split()
    assert int(count) == n
    assert abs(float(total) - expect) < 1e-6 * abs(expect)  # every element was read, in order
    grown = int(peak) - int(base)
    assert grown < 2.5 * batch, f"peak RssAnon grew by {grown >> 20} MiB for {batch / 2**20:.0f} MiB batches"


def test_retention_count_budget():
    """A small object read back two batches later: kept while the retention budget has room (the
    same object, like np.load); with the budget full (RETAIN_MAX), released unread, and the read
    back is the documented UnsupportedError, never a wrong value."""
    x = "shared-" + "x" * 10  # one str object: memoized once, read back with a GET
    items = [x] + [f"s{i}" for i in range(2500)] + [x]
    data = _npy(obj_array(items))
    expected = _expected(data)
    got = list(npystream.iter_objects(_Pipe(data)))
    assert_same_elements(got, expected)
    assert got[0] is got[-1]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ps, "RETAIN_MAX", 1)  # full from the start (the prefix pins numpy's globals)
        got, exc = _drain(_Pipe(data))
    assert isinstance(exc, UnsupportedError), exc
    assert exc.index == 2501
    assert_same_elements(got, expected[:2501])
