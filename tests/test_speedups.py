"""Differential tests: the C accelerator ``npystream._speedups`` against the pure-Python loops.

``scan_ops`` and ``rewrite_ops`` of :mod:`npystream.formats.pickle_walk` are the
specification.  Every test runs both implementations in lockstep on the same
input with twin state objects and compares, after *every* call: the outcome
(returned pos, or ScanError kind/message/offset/index, or the exception type),
every ScanState / RewriteState attribute, and the bytes appended to ``out``.
Inputs: the object-array corpus of ``tests/objcases.py`` (mapped and streamed
through small windows, sequential and random-access rewrites), every
truncation prefix of small files, and random byte mutations (hypothesis).

Skipped when the extension is not built (``.ci/run`` checks that the build
produced it); the tests run on both CI passes since they call both
implementations directly, whatever ``NPYSTREAM_PURE_PYTHON`` selects.
"""

from __future__ import annotations

import copy
import mmap
import os
import pickle
import random
from functools import cache
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst
from objcases import CASE_NAMES, case, case_bytes, npy_preamble, obj_array

from npystream.formats import pickle_ops as ops
from npystream.formats import pickle_walk as pw
from npystream.formats.npy import read_header
from npystream.formats.pickle_safety import SafetyPolicy, make_global_check
from npystream.sources import MemorySource

_speedups = pytest.importorskip("npystream._speedups", reason="C accelerator not built (pure-Python only)")
# Under NPYSTREAM_PURE_PYTHON=1 pickle_walk does not call setup(); these tests do.
_speedups.setup(pw.ScanError, pw.ScanState, pw.RewriteState, getattr(pw, "_text_int", None))

SAFE = SafetyPolicy.make()
GLOBAL_CHECK = make_global_check(SAFE)
SCAN_FIELDS = [f for f in pw.ScanState.__slots__ if f != "global_check"]
RW_FIELDS = list(pw.RewriteState.__slots__)
# hypothesis examples per mutation test; raise it for a long one-off run (docs/speedups.md)
FUZZ_EXAMPLES = int(os.environ.get("NPYSTREAM_FUZZ_EXAMPLES", "80"))
SMALL = ["protocol2_memo", "protocol3_memo", "protocol4_structured", "numpy1_protocol2_fortran", "protocol5_memo",
         "python_objects", "numpy1_protocol3", "text_protocol0", "text_protocol1"]


# ---------------------------------------------------------------------------
# helpers


@cache
def _file(name: str) -> bytes:
    if name.startswith("text_protocol"):  # protocols 0/1: text PUT/GET/INT/STRING lines
        arr = obj_array([1, "a", ("t", 2.5), {"k": [None, True]}, b"xy", 10**30, -7] * 3)
        return npy_preamble(arr) + pickle.dumps(arr, protocol=int(name[-1]))
    return case_bytes(case(name))


@cache
def _header(data: bytes) -> Any:
    return read_header(MemorySource(data))


def _call(impl: Any, *args: Any) -> tuple:
    """Outcome of one call: ('ok', pos), ('scan', kind, message, offset, index) or ('exc', type name)."""
    try:
        return ("ok", impl(*args))
    except pw.ScanError as err:
        return ("scan", err.kind, err.message, err.offset, err.index)
    except Exception as err:  # noqa: BLE001 - the type is what we compare
        return ("exc", type(err).__name__)


def _snap(obj: Any, fields: list[str]) -> dict[str, Any]:
    return {f: copy.deepcopy(getattr(obj, f)) for f in fields}


def _same_state(py: Any, c: Any, fields: list[str], where: str) -> None:
    sp, sc = _snap(py, fields), _snap(c, fields)
    for f in fields:
        assert sc[f] == sp[f], f"{where}: attribute {f!r}: C {sc[f]!r} != Python {sp[f]!r}"


def lockstep_scan(data: bytes, *, chunk: int | None = None, global_check: Any = GLOBAL_CHECK, count: int | None = None) -> tuple:
    """Scan ``data`` (an .npy file) with both implementations; compare after every call; return the last outcome.

    ``chunk=None`` scans a mapped buffer (``data_end`` known, like ``_scan_view``);
    an int streams it through a bytearray window fed ``chunk`` bytes at a time,
    dropping consumed bytes after each batch (so ``base`` moves), like ``_StreamScan``.
    """
    try:
        header = _header(data)
    except Exception:  # noqa: BLE001 - mutated headers: scan from byte 0 with a guessed count
        header = None
    start = header.data_offset if header is not None else 0
    if count is None:
        count = header.count if header is not None else 1
    sp, sc = pw.ScanState(count, global_check), pw.ScanState(count, global_check)
    if chunk is None:
        sp.data_end = sc.data_end = len(data)
        buf: Any = memoryview(data)
        base, pos = 0, start
    else:
        buf = bytearray()
        base, pos, fed = start, 0, start
    eof = chunk is None
    for step in range(10**7):
        end = len(buf)
        rp = _call(pw.scan_ops, buf, pos, end, base, sp)
        rc = _call(_speedups.scan_ops, buf, pos, end, base, sc)
        where = f"step {step} pos {pos} base {base} chunk {chunk}"
        assert rc == rp, where
        _same_state(sp, sc, SCAN_FIELDS, where)
        if rp[0] != "ok":
            return rp
        pos = rp[1]
        if sp.status == pw.ST_BATCH:
            for st in (sp, sc):
                st.starts.clear()
                st.memo_at.clear()
            if chunk is not None:  # discard_before(batch_end)
                k = sp.batch_end - base
                if k > 0:
                    del buf[:k]
                    base += k
                    pos -= k
        elif sp.status == pw.ST_DONE:
            return rp
        elif eof:
            return rp
        else:
            piece = data[fed : fed + chunk]
            fed += len(piece)
            if piece:
                buf += piece
            else:
                eof = True
                sp.data_end = sc.data_end = base + len(buf)
    raise AssertionError("scan did not finish")  # pragma: no cover


def _commit(rw: pw.RewriteState) -> None:
    """What _Engine._commit does between programs: release the slots of last reads."""
    freed = rw.freed
    for k in range(0, len(freed), 2):
        m, s = freed[k], freed[k + 1]
        if rw.slot_of.get(m) == s:
            del rw.slot_of[m]
            rw.free.append(s)
    freed.clear()
    rw.fresh.clear()


def lockstep_rewrite(
    buf: Any,
    ranges: list[tuple[int, int, int]],
    *,
    base: int = 0,
    live: dict[int, int] | None,
    zero_copy: bool,
    free_on_read: bool = True,
    resolve: bool = True,
) -> None:
    """Rewrite each (start, end, memo) range of ``buf`` with both implementations, comparing after every call.

    A missing memo entry (RW_MISSING) is given a fresh slot in both states (what a
    resolver does) and the rewrite resumes there.
    """
    rp = pw.RewriteState(copy.deepcopy(live), zero_copy=zero_copy, free_on_read=free_on_read)
    rc = pw.RewriteState(copy.deepcopy(live), zero_copy=zero_copy, free_on_read=free_on_read)
    outp, outc = bytearray(), bytearray()
    for r, (s, e, memo) in enumerate(ranges):
        rp.memo = rc.memo = memo
        pos = s
        for attempt in range(10**6):
            a = _call(pw.rewrite_ops, buf, pos, e, base, rp, outp)
            b = _call(_speedups.rewrite_ops, buf, pos, e, base, rc, outc)
            where = f"range {r} ({s}, {e}, memo {memo}) attempt {attempt} pos {pos}"
            assert b == a, where
            assert bytes(outc) == bytes(outp), where
            _same_state(rp, rc, RW_FIELDS, where)
            if a[0] != "ok" or rp.status != ops.RW_MISSING or not resolve:
                break
            for rw in (rp, rc):  # a resolver makes the entry available in a new slot
                rw.slot_of[rw.missing] = rw.nslots
                rw.nslots += 1
            pos = a[1]
        _commit(rp)
        _commit(rc)
        assert _snap(rc, RW_FIELDS) == _snap(rp, RW_FIELDS)


def _index(data: bytes) -> pw.PickleIndex:
    src = MemorySource(data)
    return pw.scan_index(src, _header(data), SAFE)


def _live(index: pw.PickleIndex) -> dict[int, int]:
    return dict(zip(index.live_memo.tolist(), index.live_last.tolist()))


def _runs(index: pw.PickleIndex, rng: random.Random) -> list[tuple[int, int, int]]:
    """The prefix, then the elements in contiguous runs of random lengths (like _chunks)."""
    header_start = _header_start(index)
    ranges = [(header_start, index.body_start, 0)]
    i = 0
    while i < index.count:
        j = min(index.count, i + rng.choice((1, 1, 2, 7, 50, 1000)))
        ranges.append((int(index.starts[i]), int(index.ends[j - 1]), int(index.memo_at[i])))
        i = j
    return ranges


_DATA_OFFSET: dict[int, int] = {}


def _header_start(index: pw.PickleIndex) -> int:
    return _DATA_OFFSET[id(index)]


def _indexed(data: bytes) -> pw.PickleIndex:
    index = _index(data)
    _DATA_OFFSET[id(index)] = _header(data).data_offset
    return index


# ---------------------------------------------------------------------------
# the opcode tables and limits are the same


def test_tables_match_python() -> None:
    names, args, kinds, consts = _speedups._tables()
    assert list(names) == ops.OP_NAME
    assert list(args) == ops.OP_ARG
    assert list(kinds) == ops.OP_KIND
    for key in ("MAX_MARK_DEPTH", "MAX_STACK", "MAX_NESTING", "PENDING_PER_LEVEL", "MEMO_DEPTH_NOTE", "MAX_LINE", "_INF"):
        assert consts[key] == getattr(ops, key), key
    for key in ("PH_PREFIX", "PH_BODY", "PH_SUFFIX", "PH_DONE", "ST_MORE", "ST_BATCH", "ST_DONE", "RW_OK", "RW_MISSING"):
        assert consts[key] == getattr(ops, key), key


# ---------------------------------------------------------------------------
# the corpus


@pytest.mark.parametrize("name", CASE_NAMES)
def test_scan_corpus(name: str) -> None:
    data = _file(name)
    out = lockstep_scan(data)
    assert out[0] == "ok"  # a valid file scans to the end
    lockstep_scan(data, global_check=None)
    lockstep_scan(data, chunk=4099)
    if len(data) < 5_000:
        lockstep_scan(data, chunk=7)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_rewrite_corpus(name: str) -> None:
    data = _file(name)
    index = _indexed(data)
    live = _live(index)
    rng = random.Random(name)
    buf = memoryview(data)
    for zero_copy in (False, True):
        lockstep_rewrite(buf, _runs(index, rng), live=live, zero_copy=zero_copy)
        lockstep_rewrite(buf, _runs(index, rng), live=None, zero_copy=zero_copy)
    lockstep_rewrite(buf, _runs(index, rng), live=live, zero_copy=True, free_on_read=False)
    # random access: the prefix, then single elements in random order (missing entries get resolved)
    order = list(range(index.count))
    rng.shuffle(order)
    ranges = _runs(index, rng)[:1] + [(int(index.starts[i]), int(index.ends[i]), int(index.memo_at[i])) for i in order[:300]]
    lockstep_rewrite(buf, ranges, live=live, zero_copy=True, free_on_read=False)
    lockstep_rewrite(buf, ranges, live=live, zero_copy=False, resolve=False)


def test_rewrite_with_base_and_bytes_buffers() -> None:
    """Buffers holding only part of the file (fetch() reads) with ``base`` != 0; bytes, bytearray, mmap."""
    data = _file("protocol4_mixed")
    index = _indexed(data)
    live = _live(index)
    for i in range(0, index.count, 3):
        s, e = int(index.starts[i]), int(index.ends[min(i + 2, index.count - 1)])
        piece = data[s:e]
        for buf in (piece, bytearray(piece), memoryview(piece)):
            lockstep_rewrite(buf, [(0, e - s, int(index.memo_at[i]))], base=s, live=live, zero_copy=True)


def test_scan_and_rewrite_on_mmap(tmp_path: Any) -> None:
    data = _file("protocol5_arrays")
    path = tmp_path / "a.npy"
    path.write_bytes(data)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            index = _indexed(data)
            lockstep_rewrite(view, _runs(index, random.Random(5)), live=_live(index), zero_copy=True)
            sp, sc = pw.ScanState(index.count, GLOBAL_CHECK), pw.ScanState(index.count, GLOBAL_CHECK)
            pos = _header(data).data_offset
            while True:
                a = _call(pw.scan_ops, view, pos, len(view), 0, sp)
                b = _call(_speedups.scan_ops, view, pos, len(view), 0, sc)
                assert a == b
                _same_state(sp, sc, SCAN_FIELDS, f"pos {pos}")
                if a[0] != "ok" or sp.status != pw.ST_BATCH:
                    break
                pos = a[1]
                for st in (sp, sc):
                    st.starts.clear()
                    st.memo_at.clear()
            assert sp.status == pw.ST_DONE
        finally:
            view.release()


# ---------------------------------------------------------------------------
# truncations


@pytest.mark.parametrize("name", SMALL[:3])
def test_every_truncation_prefix(name: str) -> None:
    data = _file(name)
    start = _header(data).data_offset
    outcomes = set()
    for cut in range(start, len(data) + 1):
        piece = data[:cut]
        outcomes.add(lockstep_scan(piece, count=_header(data).count)[0])
        if cut % 5 == 0:
            lockstep_scan(piece, chunk=13, count=_header(data).count)
    assert outcomes == {"scan", "ok"}  # truncated prefixes fail, the whole file scans


# ---------------------------------------------------------------------------
# hand-made damage: each error path of the scanner, in both


DAMAGE = {
    "neg_binstring": b"T\xff\xff\xff\xffab",
    "huge_binbytes8": b"\x8e" + b"\xff" * 8 + b"x",
    "long4_neg": b"\x8b\x00\x00\x00\x80",
    "binunicode_long": b"X\x00\x00\x00\x10abc",
    "text_put_bad": b"Np12x\n",
    "text_put_none": b"Np\n",
    "text_put_huge": b"Np" + b"9" * 30 + b"\n",
    "text_get_huge": b"g" + b"9" * 30 + b"\n",
    "text_get_neg": b"g-1\n",
    "text_get_none": b"gabc\n",
    "text_long_line": b"I" + b"1" * 70000 + b"\n",
    "binput_skip": b"Nq\x05",
    "get_undefined": b"h\x63",
    "long_get_undefined": b"j\x00\x00\x00\x01",
    "memoize_after_mark": b"(\x94",
    "dup_empty": b"(2",
    "stop_inside": b"N.",
    "pop_mark": b"(0",
    "pop_empty": b"0",
    "pop_mark_state": b"1",
    "append_int": b"KaKa",
    "setitems_no_container": b"(Ku",
    "unknown_op": b"\x0b",
    "ext1": b"\x82\x01",
    "binpersid": b"NQ",
    "persid": b"Pabc\n",
    "inst_os_system": b"(ios\nsystem\n",
    "global_os_system": b"cos\nsystem\n",
    "global_no_newline": b"cos",
    "frame_inside": b"\x95\x01\x00\x00\x00\x00\x00\x00\x00N\x95\x00\x00\x00\x00\x00\x00\x00\x00",
    "frame_huge": b"\x95" + b"\xff" * 8,
    "frame_absurd": b"\x95\x00\x00\x00\x00\x00\x00\x02\x00",
    "proto_middle": b"\x80\x02",
    "nested_lists": b"]" * 1100 + b"a" * 1099,
    "nested_tuple1": b"N" + b"\x85" * 1100,
    "deep_marks": b"(" * 1100,
    "reduce_into_list": b"R",
    "tuple_closes_batch": b"(Nt",
    "many_elements": b"N" * 20,
    "build_nothing": b"b",
    "deep_memo": b"]" * 40 + b"\x94" + b"a" * 39 + b"h\x00",
    "append_empties_level": b"(Ka",
    "build_empties_level": b"(Nb",
    "setitem_empties_level": b"(KKs",
}


def test_build_that_empties_the_stack_is_a_format_error() -> None:
    """A 1-byte mutation (the prefix's MARK turned into BUILD) used to raise IndexError from iter_objects."""
    import npystream
    from npystream.errors import FormatError

    data = _file("numpy1_protocol2_fortran")
    assert data[241:242] == b"("
    bad = data[:241] + b"b" + data[242:]
    with pytest.raises(FormatError, match="BUILD needs 2 stack items"):
        list(npystream.iter_objects(bad))
    assert lockstep_scan(bad)[:2] == ("scan", "format")


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_hand_made_damage(name: str) -> None:
    import hostile_pickles as hp

    body = DAMAGE[name]
    for data in (hp.npy_file(hp.envelope([body]), (1,)), hp.npy_file(hp.envelope([b"N", body, b"N"]), (3,))):
        lockstep_scan(data)
        lockstep_scan(data, global_check=None)
        lockstep_scan(data, chunk=5 if len(data) < 5_000 else 4099)
        lockstep_scan(data, count=0)
        # the rewriter over the damaged element (padding keeps Python's over-reads inside the buffer)
        start = _header(data).data_offset
        padded = data + b"\x00" * 16
        if name == "text_put_huge":  # the one documented difference: C refuses a PUT index beyond 64 bits
            with pytest.raises(OverflowError):
                _speedups.rewrite_ops(padded, start, len(data), 0, pw.RewriteState(None), bytearray())
            continue
        lockstep_rewrite(memoryview(padded), [(start, len(data), 0)], live=None, zero_copy=True)
        lockstep_rewrite(memoryview(padded), [(start, len(data), 0)], live={0: -1, 3: 7}, zero_copy=True)


# ---------------------------------------------------------------------------
# random mutations of valid files


def _mutate(data: bytes, edits: list[tuple[int, int, int]], start: int) -> bytes:
    out = bytearray(data)
    for kind, where, value in edits:
        if len(out) <= start:
            break
        p = start + where % (len(out) - start)
        if kind == 0:
            out[p] = value
        elif kind == 1:
            out.insert(p, value)
        else:
            del out[p]
    return bytes(out)


_EDITS = hst.lists(
    hst.tuples(hst.integers(0, 2), hst.integers(0, 1 << 30), hst.integers(0, 255)), min_size=1, max_size=4
)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=hst.sampled_from(SMALL), edits=_EDITS, chunk=hst.sampled_from([None, None, 3, 64]))
def test_mutated_files_scan(which: str, edits: list[tuple[int, int, int]], chunk: int | None) -> None:
    data = _file(which)
    start = _header(data).data_offset
    bad = _mutate(data, edits, start)
    lockstep_scan(bad, chunk=chunk, count=_header(data).count)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    which=hst.sampled_from(SMALL),
    edits=_EDITS,
    cut=hst.tuples(hst.integers(0, 1 << 30), hst.integers(0, 1 << 30)),
    memo=hst.integers(0, 40),
    live_kind=hst.sampled_from(["none", "index", "odd"]),
    zero_copy=hst.booleans(),
)
def test_mutated_files_rewrite(
    which: str, edits: list[tuple[int, int, int]], cut: tuple[int, int], memo: int, live_kind: str, zero_copy: bool
) -> None:
    data = _file(which)
    start = _header(data).data_offset
    bad = _mutate(data, edits, start)
    n = len(bad) - start
    s = start + cut[0] % n
    e = s + 1 + cut[1] % (len(bad) - s)
    live = None if live_kind == "none" else {k: k * 3 for k in range(1, 60, 2)}
    if live_kind == "index" and which != "text_protocol0":  # (protocol 0 has no EMPTY_LIST: no index)
        live = _live(_indexed(data))
    padded = memoryview(bad + b"\x00" * 16)
    lockstep_rewrite(padded, [(s, e, memo)], live=live, zero_copy=zero_copy)


# ---------------------------------------------------------------------------
# arguments and states the Python callers never pass: the C code refuses them instead of reading out of bounds


def test_bad_arguments_raise_not_crash() -> None:
    data = _file("protocol2_mixed")
    st = pw.ScanState(10, None)
    with pytest.raises(ValueError):
        _speedups.scan_ops(data, -1, len(data), 0, st)
    with pytest.raises(ValueError):
        _speedups.scan_ops(data, 0, len(data) + 1, 0, st)
    rw = pw.RewriteState(None)
    with pytest.raises(ValueError):
        _speedups.rewrite_ops(data, -5, 10, 0, rw, bytearray())
    with pytest.raises(ValueError):
        _speedups.rewrite_ops(data, 0, len(data) + 1, 0, rw, bytearray())
    with pytest.raises(TypeError):
        _speedups.rewrite_ops(data, 0, 10, 0, rw, b"not a bytearray")
    with pytest.raises(TypeError):
        _speedups.scan_ops([1, 2], 0, 1, 0, st)


@pytest.mark.parametrize(
    "body, attrs",
    [
        (b"\x94", {"n": 1, "dep": []}),  # PUT with an empty dep list
        (b"t", {"depth": 1, "n": 2, "marks": [], "dep": [0, 0]}),  # TUPLE without its saved MARK
        (b"0", {"depth": 2, "n": 0, "marks": [1]}),  # POP of a MARK that is not recorded
        (b"R", {"n": 2, "dep": [0]}),  # REDUCE with a short dep list (Python slices: no error)
        (b"t", {"depth": 1, "n": 5, "dep": [1]}),  # inner items beyond dep
        (b"2", {"n": 1, "dep": []}),  # DUP with an empty dep list
        (b"a", {"phase": 1, "depth": 1, "n": 6, "dep": []}),  # batch-of-one APPEND with nothing in dep
        (b"e", {"phase": 1, "depth": 2, "n": 0, "in_batch": True, "marks": [5, 0, 0], "dep": []}),
        (b"0", {"phase": 1, "depth": 2, "n": 3, "in_batch": True, "dep": [0, 0, 0]}),  # POP with no starts
        (b"Ng-1\n", {"memo_base": -1}),  # a negative memo base: GET -1 is accepted and recorded
    ],
)
def test_inconsistent_state_same_outcome(body: bytes, attrs: dict[str, Any]) -> None:
    """States no caller builds: C mirrors Python (IndexError/ValueError or the same result), never a crash."""
    sp, sc = pw.ScanState(10, None), pw.ScanState(10, None)
    for st in (sp, sc):
        for k, v in attrs.items():
            setattr(st, k, copy.deepcopy(v))
    a = _call(pw.scan_ops, body, 0, len(body), 0, sp)
    b = _call(_speedups.scan_ops, body, 0, len(body), 0, sc)
    assert b == a
    _same_state(sp, sc, SCAN_FIELDS, repr(body))
