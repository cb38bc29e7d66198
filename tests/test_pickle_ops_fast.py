"""The pure-Python scanner's fast paths (``pickle_ops._fast_arrays`` / ``_fast_strings``) against its generic loop.

``scan_ops`` recognises whole ndarray and short-literal elements with ``re``
patterns and applies their net effect at once.  These tests run the scanner
twice on the same bytes, fast paths on and off (``pickle_ops.FAST_PATHS``),
and compare after *every* call: the outcome (returned pos, or ScanError kind /
message / offset / index), every ScanState attribute, and the order of
``reads``.  Inputs: files written by ``np.save`` (protocol 4) and by
``pickle.dump`` with protocol 3 (numpy 1.x's BINPUT), with many element kinds;
protocol-3 files re-encoded with LONG_BINGET/LONG_BINPUT everywhere;
protocol-4 files re-framed with frame breaks at every opcode boundary of an
element; every file fed through a window in random pieces as ``_StreamScan``
does, and mapped whole; truncations, and random byte mutations (hypothesis).
A spy checks that the fast paths really take the elements they are meant for.
"""

from __future__ import annotations

import pickle
import pickletools
import random
import struct
from functools import cache
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst
from objcases import npy_preamble, obj_array

from npystream.formats import pickle_ops as ops
from npystream.formats.npy import read_header
from npystream.formats.pickle_safety import SafetyPolicy, make_global_check
from npystream.sources import MemorySource

GLOBAL_CHECK = make_global_check(SafetyPolicy.make())
FIELDS = [f for f in ops.ScanState.__slots__ if f != "global_check"]

# ---------------------------------------------------------------------------
# inputs


def _arrays(rng: np.random.Generator, n: int) -> list[Any]:
    """Small ndarrays of the kinds the fast path takes, and some it must leave to the generic loop."""
    out: list[Any] = []
    for i in range(n):
        k = i % 23
        if k == 0:
            out.append(np.arange(int(rng.integers(0, 70)), dtype=np.int32))
        elif k == 1:
            out.append(rng.random(int(rng.integers(1, 40))))
        elif k == 2:
            out.append(np.arange(12, dtype=np.int16).reshape(3, 4))
        elif k == 3:
            out.append(np.asfortranarray(np.arange(24, dtype=np.int32).reshape(2, 3, 4)))
        elif k == 4:
            out.append(np.zeros((2, 1, 2, 3, 1), dtype=np.uint8))  # ndim 5: MARK ... TUPLE shape
        elif k == 5:
            out.append(np.arange(70, dtype=np.float64))  # 560 bytes: BINBYTES
        elif k == 6:
            out.append(np.zeros(0, dtype=np.int32))  # b'' is a singleton: its second use is a BINGET
        elif k == 7:
            out.append(np.array([1], dtype=np.int8))  # 1-byte payloads are singletons too
        elif k == 8:
            out.append(np.array(3.5))  # 0-d: EMPTY_TUPLE shape
        elif k == 9:
            out.append(f"str{i}")
        elif k == 10:
            out.append(np.arange(300, dtype=np.int64).reshape(300, 1))  # shape int 300: BININT2
        elif k == 11:
            out.append(np.arange(5, dtype=">i4"))  # big-endian dtype: its own dtype object
        elif k == 12:
            # beyond a frame (written outside frames), a few times
            out.append(np.ones(70000 if i % 230 == 12 else 300, dtype=np.uint8))
        elif k == 13:
            out.append(np.array(["ab", "c"]))  # unicode dtype
        elif k == 14:
            out.append(obj_array([1, np.arange(3)]))  # nested object array
        elif k == 15:
            out.append(np.arange(int(rng.integers(2, 60)), dtype=np.int32))
        elif k == 16:
            out.append(None)
        elif k == 17:
            out.append(b"bytes-%d" % i)
        elif k == 18:
            out.append(np.datetime64("2020-01-01") + np.arange(3))
        else:
            out.append(np.arange(int(rng.integers(1, 64)), dtype=np.int32) * i)
    return out


def _strings(rng: np.random.Generator, n: int) -> list[Any]:
    words = ["", "a", "é\x94", "x" * 255, "y" * 300, "\u0394\u0394", "C\x94C"]  # \x94 and 'C' inside data
    out: list[Any] = []
    for i in range(n):
        k = int(rng.integers(0, 12))
        if k < 7:
            out.append(words[k] + str(i % 7))
        elif k == 7:
            out.append(bytes([0x94, 0x43, 0x8C, i % 256]))
        elif k == 8:
            out.append(out[-1] if out else "first")  # the same object again: a BINGET element
        else:
            out.append(f"s{int(rng.integers(0, 10**9)):x}")
    return out


def _many_dtypes(n: int) -> list[Any]:
    """Arrays of many dtypes, created late so their dtype GETs have memo indices >= 256."""
    codes = ["i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16", "?"]
    return [np.arange(2 + i % 5).astype(codes[i % len(codes)]) for i in range(n)]


def _file(arr: np.ndarray, proto: int) -> bytes:
    return npy_preamble(arr) + pickle.dumps(arr, protocol=proto)


@cache
def corpus() -> dict[str, bytes]:
    rng = np.random.default_rng(1234)
    arrays = obj_array(_arrays(rng, 1200))
    strings = obj_array(_strings(rng, 2600))
    plain = obj_array([np.arange(int(rng.integers(1, 61)), dtype=np.int32) for _ in range(1500)])
    late = obj_array([np.arange(3, dtype=np.int32)] * 2 + [f"w{i}" for i in range(300)] + _many_dtypes(300))
    shaped = obj_array([np.arange(k % 7, dtype=np.float32) for k in range(60)], shape=(3, 4, 5), order="F")
    out = {}
    for proto in (3, 4):
        out[f"arrays_p{proto}"] = _file(arrays, proto)
        out[f"strings_p{proto}"] = _file(strings, proto)
        out[f"plain_p{proto}"] = _file(plain, proto)
        out[f"late_dtypes_p{proto}"] = _file(late, proto)
        out[f"shaped_p{proto}"] = _file(shaped, proto)
    return out


def _ops(pkl: bytes) -> list[tuple[int, int, int, Any]]:
    """(opcode byte, start, end, argument) of every opcode of a pickle."""
    found = list(pickletools.genops(pkl))
    out = []
    for (_op, arg, start), nxt in zip(found, found[1:] + [(None, None, len(pkl))]):
        out.append((pkl[start], start, nxt[2], arg))
    return out


def widen_memo(data: bytes) -> bytes:
    """A protocol-3 .npy with every BINGET/BINPUT re-encoded as LONG_BINGET/LONG_BINPUT (same meaning)."""
    hdr = read_header(MemorySource(data))
    pkl = data[hdr.data_offset :]
    out = bytearray(data[: hdr.data_offset])
    for code, start, end, arg in _ops(pkl):
        if code == ops.OP_BINGET:
            out += b"j" + struct.pack("<I", arg)
        elif code == ops.OP_BINPUT:
            out += b"r" + struct.pack("<I", arg)
        else:
            out += pkl[start:end]
    return bytes(out)


def reframe(data: bytes, breaks: set[int] | None = None, every: int | None = None) -> bytes:
    """A protocol-4 .npy re-framed: frames end at the opcode boundaries in ``breaks`` (pickle offsets of the
    original), or every ``every`` bytes at the next boundary; large payloads outside frames as pickle writes them."""
    hdr = read_header(MemorySource(data))
    pkl = data[hdr.data_offset :]
    out = bytearray(data[: hdr.data_offset])
    frame = bytearray()

    def commit() -> None:
        if frame:
            out.extend(b"\x95" + struct.pack("<Q", len(frame)) + frame)
            frame.clear()

    for code, start, end, _arg in _ops(pkl):
        if code == ops.OP_FRAME:
            continue
        if code == 0x80:  # PROTO precedes the first frame
            out += pkl[start:end]
            continue
        piece = pkl[start:end]
        if code in (0x42, 0x8E, 0x8D, 0x58, 0x96) and end - start >= 65536:
            commit()
            out += piece
            continue
        if (breaks is not None and start in breaks) or (every is not None and len(frame) >= every):
            commit()
        frame += piece
    commit()
    return bytes(out)


# ---------------------------------------------------------------------------
# the comparison


def _outcome(st: ops.ScanState, buf: Any, pos: int, end: int, base: int) -> tuple:
    try:
        return ("ok", ops.scan_ops(buf, pos, end, base, st))
    except ops.ScanError as err:
        return ("scan", err.kind, err.message, err.offset, err.index)


def _snap(st: ops.ScanState) -> dict[str, Any]:
    """Every attribute (containers copied: they hold only ints), with the order of the dicts."""
    snap = {f: (v.copy() if isinstance(v, (list, dict, bytearray)) else v) for f in FIELDS for v in [getattr(st, f)]}
    snap["reads_order"] = list(st.reads.items())
    snap["memo_depth_order"] = list(st.memo_depth.items())
    return snap


class Spy:
    """Counts the elements the fast paths took."""

    def __init__(self, monkeypatch: Any) -> None:
        self.arrays = self.strings = self.literals = 0
        fa, fs, fl = ops._fast_arrays, ops._fast_strings, ops._fast_literals_p3

        def literals(*args: Any) -> Any:
            got = fl(*args)
            self.literals += got[1] if got else 0
            return got

        def arrays(*args: Any) -> Any:
            got = fa(*args)
            self.arrays += got[1] if got else 0
            return got

        def strings(*args: Any) -> Any:
            got = fs(*args)
            self.strings += got[1] if got else 0
            return got

        monkeypatch.setattr(ops, "_fast_arrays", arrays)
        monkeypatch.setattr(ops, "_fast_strings", strings)
        monkeypatch.setattr(ops, "_fast_literals_p3", literals)


def lockstep(data: bytes, *, pieces: list[int] | None = None, count: int | None = None, discard: bool = True) -> tuple:
    """Scan ``data`` (an .npy file) with fast paths on and off; compare after every call; return the last outcome.

    ``pieces=None`` scans the whole buffer (``data_end`` known, as on a mapped file);
    a list streams the pickle through a bytearray window fed those piece sizes in turn
    (cycled), dropping bytes before ``batch_end`` after each batch, as ``_StreamScan`` does.
    """
    try:
        header = read_header(MemorySource(data))
        start, hcount = header.data_offset, header.count
    except Exception:  # noqa: BLE001 - a mutated header: scan from byte 0
        start, hcount = 0, 1
    count = hcount if count is None else count
    states = [ops.ScanState(count, GLOBAL_CHECK), ops.ScanState(count, GLOBAL_CHECK)]
    if pieces is None:
        for st in states:
            st.data_end = len(data)
        buf: Any = memoryview(data)
        base, pos, fed, eof = 0, start, len(data), True
    else:
        buf = bytearray()
        base, pos, fed, eof = start, 0, start, False
    k = 0
    last: tuple = ()
    try:
        for step in range(10**7):
            end = len(buf)
            got = []
            for fast, st in zip((True, False), states):
                ops.FAST_PATHS = fast
                got.append((_outcome(st, buf, pos, end, base), _snap(st)))
            where = f"step {step}: pos {pos} end {end} base {base}"
            assert got[0][0] == got[1][0], where
            for f in got[1][1]:
                assert got[0][1][f] == got[1][1][f], f"{where}: {f}: fast {got[0][1][f]!r} generic {got[1][1][f]!r}"
            last = got[0][0]
            if last[0] != "ok":
                return last
            pos = last[1]
            st = states[0]
            if st.status == ops.ST_BATCH:
                for s in states:
                    s.starts.clear()
                    s.memo_at.clear()
                if pieces is not None and discard:
                    cut = st.batch_end - base
                    if cut > 0:
                        del buf[:cut]
                        base += cut
                        pos -= cut
            elif st.status == ops.ST_DONE or eof:
                return last
            else:
                size = pieces[k % len(pieces)]
                k += 1
                piece = data[fed : fed + size]
                fed += len(piece)
                if piece:
                    buf += piece
                else:
                    eof = True
                    for s in states:
                        s.data_end = base + len(buf)
    finally:
        ops.FAST_PATHS = True
    raise AssertionError("scan did not finish")  # pragma: no cover


def _random_pieces(seed: int, n: int = 50, top: int = 4000) -> list[int]:
    rnd = random.Random(seed)
    return [rnd.choice([1, 2, 3, 7, 64, 255, 256, 1000, rnd.randint(1, top)]) for _ in range(n)]


# ---------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("name", [f"{k}_p{p}" for k in ("arrays", "strings", "plain", "late_dtypes", "shaped") for p in (3, 4)])
def test_mapped_and_streamed_equal_generic(name):
    data = corpus()[name]
    assert lockstep(data)[0] == "ok"
    for seed in range(3):
        assert lockstep(data, pieces=_random_pieces(seed))[0] == "ok"
    assert lockstep(data, pieces=[4096], discard=False)[0] == "ok"


def test_fast_paths_take_the_elements(monkeypatch):
    """Not vacuous: the fast paths take most elements of numpy's common shapes, in both protocols."""
    c = corpus()
    for name, kind, at_least in [
        ("plain_p4", "arrays", 1400),
        ("plain_p3", "arrays", 1400),
        ("arrays_p4", "arrays", 300),
        ("arrays_p3", "arrays", 300),
        ("strings_p4", "strings", 1000),
        ("strings_p3", "literals", 1000),
        ("strings_p4", "literals", 50),  # BINUNICODE + MEMOIZE (strings of 256+ bytes)
        ("late_dtypes_p4", "arrays", 250),
        ("late_dtypes_p3", "arrays", 250),
    ]:
        spy = Spy(monkeypatch)
        assert lockstep(c[name])[0] == "ok"
        got = getattr(spy, kind)
        assert got >= at_least, (name, kind, got)
        monkeypatch.undo()


def test_long_memo_opcodes():
    """LONG_BINGET / LONG_BINPUT everywhere (valid protocol 3, as a writer with a big memo would emit)."""
    for name in ("arrays_p3", "plain_p3", "late_dtypes_p3"):
        wide = widen_memo(corpus()[name])
        assert b"j" in wide and b"r" in wide
        assert lockstep(wide)[0] == "ok"
        assert lockstep(wide, pieces=_random_pieces(7))[0] == "ok"


def test_late_dtypes_use_long_binget():
    data = corpus()["late_dtypes_p4"]
    assert any(code == ops.OP_LONG_BINGET for code, *_ in _ops(data[read_header(MemorySource(data)).data_offset :]))


def test_frame_break_at_every_opcode_boundary_of_elements():
    """Frames ending at each opcode boundary inside a few elements (and small frames everywhere)."""
    rng = np.random.default_rng(9)
    data = _file(obj_array([np.arange(int(rng.integers(1, 61)), dtype=np.int32) for _ in range(40)]), 4)
    hdr = read_header(MemorySource(data))
    pkl = data[hdr.data_offset :]
    body = pkl.index(b"]\x94(") + 3
    bounds = [start for _code, start, _end, _arg in _ops(pkl) if start >= body][:150]
    for b in bounds:
        framed = reframe(data, breaks={b})
        assert lockstep(framed)[0] == "ok"
    data = corpus()["plain_p4"]
    for every in (1, 37, 200, 1000):
        framed = reframe(data, every=every)
        assert lockstep(framed)[0] == "ok"
        assert lockstep(framed, pieces=_random_pieces(every))[0] == "ok"
    assert lockstep(reframe(corpus()["strings_p4"], every=100))[0] == "ok"


def test_frame_breaks_everywhere_small_file():
    arr = obj_array([np.arange(k, dtype=np.int32) for k in range(1, 6)] + ["ab", "c"] * 3)
    data = npy_preamble(arr) + pickle.dumps(arr, protocol=4)
    hdr = read_header(MemorySource(data))
    pkl = data[hdr.data_offset :]
    for _code, start, _end, _arg in _ops(pkl):
        framed = reframe(data, breaks={start})
        assert lockstep(framed)[0] == "ok"
        assert lockstep(framed, pieces=[1])[0] == "ok"


def test_truncations():
    arr = obj_array([np.arange(k, dtype=np.int32) for k in range(1, 9)] + ["ab", "c", b"xy"] * 3)
    for proto in (3, 4):
        data = _file(arr, proto)
        hdr = read_header(MemorySource(data))
        for cut in range(hdr.data_offset, len(data)):  # lockstep compares every call
            lockstep(data[:cut])
            lockstep(data[:cut], pieces=[5, 17])


@pytest.mark.parametrize("count_delta", [-420, -3, 1, 5])
def test_element_count_limits(count_delta):
    """A header promising fewer elements than the pickle holds: the limit check fires at the same opcode
    (-420: in the middle of the last batch)."""
    for name in ("plain_p4", "plain_p3", "strings_p4"):
        data = corpus()[name]
        count = read_header(MemorySource(data)).count + count_delta
        out = lockstep(data, count=count)
        if count_delta < 0:
            assert out[0] == "scan" and "more elements than the header" in out[2], out
        lockstep(data, count=count, pieces=[3000])


def _memo_ops(pkl: bytes) -> list[tuple[int, int, int]]:
    """(opcode, start, memo counter before it) of every memo read/write of a pickle."""
    out = []
    memo = 0
    for code, start, _end, arg in _ops(pkl):
        if code in (ops.OP_BINGET, ops.OP_LONG_BINGET, ops.OP_MEMOIZE, ops.OP_BINPUT, ops.OP_LONG_BINPUT):
            out.append((code, start, memo))
        if code == ops.OP_MEMOIZE:
            memo += 1
        elif code in (ops.OP_BINPUT, ops.OP_LONG_BINPUT):
            memo = arg + 1
    return out


@pytest.mark.parametrize("name", ["plain_p3", "arrays_p3", "plain_p4"])
def test_forged_memo_indices(name):
    """Each memo GET / PUT of some elements set to the indices around the valid ones (GETs of entries not yet
    written, PUTs out of sequence): the fast path leaves them to the generic loop, which raises."""
    data = _short(name)
    if name.endswith("p3"):
        data = widen_memo(data)
    hdr = read_header(MemorySource(data))
    pkl = data[hdr.data_offset :]
    body = pkl.index(b"]") + 2
    found = [m for m in _memo_ops(pkl) if m[1] > body]
    picks = found[:60] if name.endswith("p4") else found[:30] + found[len(found) // 2 : len(found) // 2 + 30]
    errors = 0
    assert len(picks) >= 50
    for code, start, memo in picks:
        if code == ops.OP_MEMOIZE:
            continue
        at = hdr.data_offset + start + 1
        for value in (memo - 1, memo, memo + 1, memo + 3, memo + 4, memo + 5):
            forged = bytearray(data)
            if code in (ops.OP_BINGET, ops.OP_BINPUT):
                if not 0 <= value < 256:
                    continue
                forged[at] = value
            else:
                forged[at : at + 4] = struct.pack("<I", value)
            out = lockstep(bytes(forged))
            errors += out[0] == "scan"
    assert errors > 50


def test_limits_near_max_stack(monkeypatch):
    monkeypatch.setattr(ops, "MAX_STACK", 600)
    for name in ("plain_p4", "strings_p4", "plain_p3"):
        lockstep(corpus()[name])


def test_recorded_memo_depth_disables_the_array_path(monkeypatch):
    """A GET of a deep memo entry makes an element deep: the fast path must not assume depth 0."""
    data = corpus()["plain_p4"]
    hdr = read_header(MemorySource(data))
    states = []
    for fast in (True, False):
        ops.FAST_PATHS = fast
        st = ops.ScanState(hdr.count, None)
        st.data_end = len(data)
        st.memo_depth[2] = 40  # as if _reconstruct's memo entry were deep
        pos = hdr.data_offset
        try:
            for _ in range(4):
                pos = ops.scan_ops(memoryview(data), pos, len(data), 0, st)
                if st.status != ops.ST_BATCH:
                    break
                st.starts.clear()
                st.memo_at.clear()
            states.append(("ok", pos, _snap(st)))
        except ops.ScanError as err:
            states.append(("scan", err.message, err.offset, _snap(st)))
        finally:
            ops.FAST_PATHS = True
    assert states[0] == states[1]


_MUTABLE = ["plain_p4", "plain_p3", "strings_p4", "arrays_p4"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    which=hst.sampled_from(_MUTABLE),
    edits=hst.lists(hst.tuples(hst.floats(0, 1), hst.integers(0, 255)), min_size=1, max_size=4),
    chunked=hst.booleans(),
)
def test_mutations(which, edits, chunked):
    """Random byte changes in the element list: the fast paths fall back exactly where the generic loop differs."""
    data = bytearray(_short(which))
    hdr = read_header(MemorySource(bytes(data)))
    body = bytes(data).index(b"]", hdr.data_offset) + 2
    for where, value in edits:
        data[body + int(where * (len(data) - body - 1))] = value
    lockstep(bytes(data), pieces=[97, 1, 5000] if chunked else None)


@cache
def _short(name: str) -> bytes:
    """The first ~150 elements of a corpus file, as its own file."""
    rng = np.random.default_rng(5)
    if name.startswith("plain"):
        items = [np.arange(int(rng.integers(1, 61)), dtype=np.int32) for _ in range(150)]
    elif name.startswith("strings"):
        items = _strings(rng, 150)
    else:
        items = _arrays(rng, 150)
    return _file(obj_array(items), int(name[-1]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=hst.sampled_from(_MUTABLE), start=hst.floats(0, 1), length=hst.integers(1, 40), seed=hst.integers(0, 99))
def test_spliced_elements(which, start, length, seed):
    """Bytes of one element copied over another's (valid-looking heads in the wrong place)."""
    data = bytearray(_short(which))
    hdr = read_header(MemorySource(bytes(data)))
    body = bytes(data).index(b"]", hdr.data_offset) + 2
    rnd = random.Random(seed)
    src = rnd.randrange(body, len(data) - length)
    dst = body + int(start * (len(data) - body - length))
    data[dst : dst + length] = data[src : src + length]
    lockstep(bytes(data), pieces=[rnd.randint(1, 3000)] if seed % 2 else None)


def test_strings_with_memoize_bytes_inside(monkeypatch):
    """Payloads holding 0x94 bytes (non-ASCII text, bytes): the numpy pass stops there and re takes the run."""
    rng = np.random.default_rng(3)
    items: list[Any] = []
    for i in range(2500):
        k = i % 5
        items.append(
            ["\u0394" * (i % 9) + str(i), b"\x94" * (i % 4 + 1) + b"%d" % i, f"p{i}", f"\x94C{i}", b"C\x01\x94%d" % i][k]
        )
    data = _file(obj_array(items), 4)
    spy = Spy(monkeypatch)
    runs = []
    real_run = ops._STR_RUN
    monkeypatch.setattr(ops, "_STR_RUN", lambda *args: runs.append(1) or real_run(*args))
    assert lockstep(data)[0] == "ok"
    assert spy.strings >= 2400, spy.strings
    assert len(runs) >= 3  # the re path took the batches (one run each)
    assert lockstep(data, pieces=_random_pieces(int(rng.integers(0, 99))))[0] == "ok"
    plain = _file(obj_array([f"a{i}" for i in range(3000)] + [None, "x"]), 4)  # every batch via numpy
    assert lockstep(plain)[0] == "ok"
    assert lockstep(reframe(plain, every=500), pieces=[333])[0] == "ok"


# ---------------------------------------------------------------------------
# the rewriter's fast paths (``_rw_array`` and the string runs) against its generic loop


def _rw_outcome(rw: ops.RewriteState, buf: Any, pos: int, end: int, base: int, out: bytearray) -> tuple:
    try:
        return ("ok", ops.rewrite_ops(buf, pos, end, base, rw, out))
    except ops.ScanError as err:
        return ("scan", err.kind, err.message, err.offset, err.index)


def _rw_snap(rw: ops.RewriteState) -> dict[str, Any]:
    snap = {f: (v.copy() if isinstance(v, (list, dict)) else v) for f in ops.RewriteState.__slots__ for v in [getattr(rw, f)]}
    snap["slot_order"] = list(rw.slot_of.items())
    return snap


def _release(rw: ops.RewriteState) -> None:
    """What the engine does between programs: recycle the slots of last reads."""
    freed = rw.freed
    for k in range(0, len(freed), 2):
        m, s = freed[k], freed[k + 1]
        if rw.slot_of.get(m) == s:
            del rw.slot_of[m]
            rw.free.append(s)
    freed.clear()
    rw.fresh.clear()


def rw_lockstep(
    buf: Any, ranges: list[tuple[int, int, int]], *, live: dict[int, int] | None, zero_copy: bool,
    free_on_read: bool = True, base: int = 0, resolve: bool = True,
) -> int:
    """Rewrite each (start, end, memo) range with fast paths on and off, comparing after every call; returns
    the bytes written."""
    rws = [ops.RewriteState(None if live is None else dict(live), zero_copy=zero_copy, free_on_read=free_on_read)
           for _ in range(2)]
    outs = [bytearray(), bytearray()]
    total = 0
    try:
        for r, (s, e, memo) in enumerate(ranges):
            for rw in rws:
                rw.memo = memo
            pos = s
            for attempt in range(10**6):
                got = []
                for fast, rw, out in zip((True, False), rws, outs):
                    ops.FAST_PATHS = fast
                    got.append((_rw_outcome(rw, buf, pos - base, e - base, base, out), _rw_snap(rw)))
                where = f"range {r} ({s}, {e}, memo {memo}) attempt {attempt}"
                assert got[0][0] == got[1][0], where
                assert outs[0] == outs[1], where
                assert got[0][1] == got[1][1], where
                res = got[0][0]
                if res[0] != "ok" or rws[0].status != ops.RW_MISSING or not resolve:
                    break
                for rw in rws:  # a resolver gives the entry a new slot
                    rw.slot_of[rw.missing] = rw.nslots
                    rw.nslots += 1
                pos = res[1] + base
            total += len(outs[0])
            for rw, out in zip(rws, outs):
                _release(rw)
                out.clear()
    finally:
        ops.FAST_PATHS = True
    return total


def _index_of(data: bytes) -> Any:
    from npystream.formats import pickle_walk as pw

    src = MemorySource(data)
    return pw.scan_index(src, read_header(src), SafetyPolicy.make())


def _rw_runs(data: bytes, index: Any, rnd: random.Random) -> list[tuple[int, int, int]]:
    ranges = [(read_header(MemorySource(data)).data_offset, index.body_start, 0)]
    i = 0
    while i < index.count:
        j = min(index.count, i + rnd.choice((1, 2, 7, 50, 1000)))
        ranges.append((int(index.starts[i]), int(index.ends[j - 1]), int(index.memo_at[i])))
        i = j
    return ranges


@pytest.mark.parametrize("name", ["arrays_p3", "arrays_p4", "strings_p4", "plain_p4", "plain_p3", "late_dtypes_p4", "shaped_p4"])
def test_rewrite_equal_generic(name, monkeypatch):
    data = corpus()[name]
    index = _index_of(data)
    live = dict(zip(index.live_memo.tolist(), index.live_last.tolist()))
    rnd = random.Random(name)
    buf = memoryview(data)
    calls = []
    real = ops._rw_array
    monkeypatch.setattr(ops, "_rw_array", lambda *a: (lambda got: calls.append(got is not None) or got)(real(*a)))
    for zero_copy in (False, True):
        assert rw_lockstep(buf, _rw_runs(data, index, rnd), live=live, zero_copy=zero_copy) > 0
        rw_lockstep(buf, _rw_runs(data, index, rnd), live=None, zero_copy=zero_copy)
    rw_lockstep(buf, _rw_runs(data, index, rnd), live=live, zero_copy=True, free_on_read=False)
    # random access: the prefix, then single elements in random order (missing entries resolved, or not)
    order = list(range(index.count))
    rnd.shuffle(order)
    ranges = _rw_runs(data, index, rnd)[:1] + [
        (int(index.starts[i]), int(index.ends[i]), int(index.memo_at[i])) for i in order[:200]
    ]
    rw_lockstep(buf, ranges, live=live, zero_copy=True, free_on_read=False)
    rw_lockstep(buf, ranges, live=live, zero_copy=False, resolve=False)
    if "strings" not in name:
        assert sum(calls) >= 20, sum(calls)  # the ndarray fast path took elements (runs: one call each)


def test_rewrite_partial_buffers_and_long_memo():
    """Buffers holding part of the file (``base`` != 0), and LONG_BINGET/LONG_BINPUT elements."""
    for data in (corpus()["plain_p4"], widen_memo(corpus()["plain_p3"]), reframe(corpus()["plain_p4"], every=300)):
        index = _index_of(data)
        live = dict(zip(index.live_memo.tolist(), index.live_last.tolist()))
        for i in range(0, min(index.count, 300), 7):
            s, e = int(index.starts[i]), int(index.ends[min(i + 5, index.count - 1)])
            piece = data[s:e]
            for buf in (piece, bytearray(piece)):
                rw_lockstep(buf, [(s, e, int(index.memo_at[i]))], base=s, live=live, zero_copy=True)
                rw_lockstep(buf, [(s, e, int(index.memo_at[i]))], base=s, live=None, zero_copy=False)


def test_rewrite_live_payloads_and_many_slots():
    """Payload memo entries that are read again (the same bytes object twice) keep their bytes; >256 slots."""
    shared = np.arange(7, dtype=np.int32)
    items: list[Any] = []
    for i in range(700):
        items.append(shared if i % 3 == 0 else np.arange(i % 50, dtype=np.int32))
        items.append(f"s{i}")
    data = _file(obj_array(items), 4)
    index = _index_of(data)
    live = dict(zip(index.live_memo.tolist(), index.live_last.tolist()))
    rnd = random.Random(2)
    for zero_copy in (False, True):
        rw_lockstep(memoryview(data), _rw_runs(data, index, rnd), live=live, zero_copy=zero_copy)
        rw_lockstep(memoryview(data), _rw_runs(data, index, rnd), live=None, zero_copy=zero_copy)


def test_protocol3_literals_numpy_and_loop(monkeypatch):
    """Protocol-3 str/bytes elements: the numpy pass (LONG_BINPUT candidates) and the one-by-one loop, with
    payloads that hold fake LONG_BINPUTs ('r' + the next index), across the 2**8 memo boundary."""
    items: list[Any] = []
    for i in range(1800):
        k = i % 6
        if k == 0:
            items.append(f"t{i}")
        elif k == 1:
            items.append(b"r" + struct.pack("<I", 300 + i) + b"%d" % i)  # looks like a LONG_BINPUT
        elif k == 2:
            items.append("r\x00\x00\x00\x00" + str(i))
        elif k == 3:
            items.append("z" * (i % 300) + str(i))
        elif k == 4:
            items.append(bytes(range(i % 256)) + b"%d" % i)
        else:
            items.append(np.arange(i % 9, dtype=np.int32))
    items[1000] = "L" * 1_500_000  # longer than the numpy pass looks ahead (1 MiB): one at a time
    data = _file(obj_array(items), 3)
    spy = Spy(monkeypatch)
    assert lockstep(data)[0] == "ok"
    assert spy.literals >= 1400, spy.literals
    assert lockstep(data, pieces=_random_pieces(11))[0] == "ok"
    assert lockstep(widen_memo(data), pieces=[501])[0] == "ok"
    for delta in (-700, -1):
        lockstep(data, count=len(items) + delta)


@cache
def _p3_literals() -> bytes:
    items = [f"w{i}" * (1 + i % 4) if i % 3 else b"b%05d" % i for i in range(400)]
    return _file(obj_array(items), 3)


def test_forged_protocol3_literals():
    """Protocol-3 literal elements forged: memo writes out of sequence, the literal opcode replaced (BININT
    reads the length as a value; BINSTRING has the same layout), a fake LONG_BINPUT with the right index
    inside the payload."""
    data = _p3_literals()
    hdr = read_header(MemorySource(data))
    pkl = data[hdr.data_offset :]
    body = pkl.index(b"]") + 2
    found = [(c, s, e, a) for c, s, e, a in _ops(pkl) if s > body]
    puts = {s: a for c, s, e, a in found if c in (ops.OP_BINPUT, ops.OP_LONG_BINPUT)}
    cases = 0
    errors = 0
    for (code, start, end, _arg), nxt in zip(found, found[1:]):
        if code not in (0x58, 0x42) or start % 5:
            continue
        at = hdr.data_offset + start
        variants = []
        for op in (b"J", b"T", b"N", b"C"):
            variants.append(data[:at] + op + data[at + 1 :])
        if nxt[1] in puts:  # the PUT right after: index +-1
            p_at = hdr.data_offset + nxt[1]
            for delta in (-1, 1):
                idx = struct.pack("<I", puts[nxt[1]] + delta) if nxt[0] == ops.OP_LONG_BINPUT else bytes([(puts[nxt[1]] + delta) % 256])
                variants.append(data[: p_at + 1] + idx + data[p_at + 1 + len(idx) :])
            if end - start >= 5 + 6 and nxt[0] == ops.OP_LONG_BINPUT:  # a fake PUT of the right index in the payload
                fake = b"r" + struct.pack("<I", puts[nxt[1]])
                variants.append(data[: at + 5] + fake + data[at + 5 + len(fake) :])
        for v in variants:
            out = lockstep(v)
            errors += out[0] == "scan"
            cases += 1
        lockstep(variants[-1], pieces=[64])
    assert cases > 200 and errors > 50, (cases, errors)


@pytest.mark.parametrize("name", ["plain_p4", "plain_p3", "strings_p4", "arrays_p3", "arrays_p4", "framed"])
def test_every_element_count(name):
    """Headers promising every count up to the real one: the element limit is hit at every position of a run,
    and runs start with every room left (frames, other kinds end them); the generic loop raises at the same
    opcode."""
    data = reframe(_short("plain_p4"), every=300) if name == "framed" else _short(name)
    real = read_header(MemorySource(data)).count
    for count in range(0, real + 1):
        out = lockstep(data, count=count)
        assert (out[0] == "scan") == (count < real), (count, out)
        if name.endswith("p3") and count % 3 == 0:
            lockstep(widen_memo(data), count=count)


def test_rewrite_string_runs_with_live_entries():
    """Long runs of short strings where some strings are read back later (their memo writes are live), and
    >256 slots: the numpy rewrite stops before each live write; without a liveness table every write is kept."""
    words = [f"w{i}" for i in range(3000)]
    items: list[Any] = list(words)
    for j in (70, 71, 500, 1999, 2500):
        items[j + 300] = words[j]  # the same object again: a BINGET, and words[j]'s memo write is live
    data = _file(obj_array(items), 4)
    index = _index_of(data)
    live = dict(zip(index.live_memo.tolist(), index.live_last.tolist()))
    assert len(live) >= 6  # the five words read again, and the prefix's
    rnd = random.Random(4)
    for zero_copy in (False, True):
        assert rw_lockstep(memoryview(data), _rw_runs(data, index, rnd), live=live, zero_copy=zero_copy) > 0
        rw_lockstep(memoryview(data), _rw_runs(data, index, rnd), live=None, zero_copy=zero_copy)
    bts = _file(obj_array([b"b%d" % i for i in range(700)]), 4)  # SHORT_BINBYTES (not with zero-copy)
    index = _index_of(bts)
    for zero_copy in (False, True):
        rw_lockstep(memoryview(bts), _rw_runs(bts, index, rnd), live=None, zero_copy=zero_copy)
