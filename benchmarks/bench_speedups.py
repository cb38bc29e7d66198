"""Benchmark: the two hot loops alone, C accelerator vs pure Python, on issue 3's object files.

Usage::

    python benchmarks/bench_objects.py --make        # (once) the seeded files in the benchmark data directory (benchmarks/benchdata.py)
    python benchmarks/bench_speedups.py [--only 1,2,3] [--repeat 3]

For each file (memory-mapped, page cache warmed first) it times, in one
process and one run, ``scan_ops`` over the whole pickle (what building the
offset index costs, batches collected as ``scan_index`` does) and
``rewrite_ops`` over every element in <= 1 MiB runs with the file's liveness
table (what decoding costs before the unpickler runs; payloads copied into
the program, or replaced by zero-copy ids as ``open()`` does on a file), once with
``npystream._speedups`` and once with the Python functions of
``npystream.formats.pickle_walk``.  Both implementations must produce the same
outputs (checked: element count, rewritten bytes); fastest of ``--repeat`` for
each, wall time and CPU time (``time.process_time``: the machine may be shared).
The pure-Python loops run with their fast paths (``pickle_ops.FAST_PATHS``);
``--generic`` adds a row per loop with them switched off (the plain opcode loop).
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import time
import zlib
from functools import partial

from benchdata import DATA

FILES = {1: DATA / "obj_float32_arrays.npy", 2: DATA / "obj_int32_small.npy", 3: DATA / "obj_strings.npy"}


def scan_all(impl, view, header, pw) -> tuple[int, int]:
    """Run a scan loop to STOP; return (elements, memo reads)."""
    st = pw.ScanState(header.count, None)
    st.data_end = len(view)
    pos = header.data_offset
    elements = 0
    while True:
        pos = impl(view, pos, len(view), 0, st)
        if st.status == pw.ST_BATCH:
            elements += len(st.starts) >> 3
            st.starts.clear()
            st.memo_at.clear()
        elif st.status == pw.ST_DONE:
            return elements, len(st.reads)
        else:
            raise RuntimeError(f"scan stopped at {pos} with status {st.status}")


def runs(index, limit: int = 1 << 20) -> list[tuple[int, int, int]]:
    """(start, end, memo) of runs of elements contiguous in the file, each <= ``limit`` bytes (or one element)."""
    import numpy as np

    starts, ends = index.starts, index.ends
    breaks = np.flatnonzero(ends[:-1] != starts[1:]) + 1
    bounds = [0, *breaks.tolist(), index.count]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        i = a
        while i < b:
            j = int(np.searchsorted(starts[i:b], starts[i] + limit, side="left")) + i
            j = min(max(j, i + 1), b)
            out.append((int(starts[i]), int(ends[j - 1]), int(index.memo_at[i])))
            i = j
    return out


def rewrite_all(impl, view, plan, live, pw, zero_copy) -> tuple[int, int]:
    """Rewrite every run of ``plan`` (slots released between runs as the engine does); (bytes out, crc32)."""
    rw = pw.RewriteState(live, zero_copy=zero_copy, free_on_read=True)
    total = crc = 0
    out = bytearray()
    for s, e, memo in plan:
        rw.memo = memo
        del out[:]
        pos = impl(view, s, e, 0, rw, out)
        if rw.status != pw.RW_OK or pos != e:
            raise RuntimeError(f"rewrite stopped at {pos} (status {rw.status})")
        freed = rw.freed
        for k in range(0, len(freed), 2):
            m, slot = freed[k], freed[k + 1]
            if rw.slot_of.get(m) == slot:
                del rw.slot_of[m]
                rw.free.append(slot)
        freed.clear()
        rw.fresh.clear()
        total += len(out)
        crc = zlib.crc32(out, crc)
    return total, crc


def timed(fn, repeat: int):
    """(fastest wall s, fastest CPU s, result) of ``repeat`` runs."""
    best = best_cpu = None
    result = None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        t, c = time.perf_counter() - t0, time.process_time() - c0
        best = t if best is None else min(best, t)
        best_cpu = c if best_cpu is None else min(best_cpu, c)
    return best, best_cpu, result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="1,2,3")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--py-repeat", type=int, default=1, help="runs of the pure-Python loops (default 1)")
    ap.add_argument("--generic", action="store_true", help="also time the Python loops without their fast paths")
    args = ap.parse_args(argv)

    from npystream.formats import pickle_ops as ops
    from npystream.formats import pickle_walk as pw
    from npystream.formats.npy import read_header
    from npystream.sources import open_source

    try:
        from npystream import _speedups
    except ImportError:
        print("npystream._speedups is not built", file=sys.stderr)
        return 1
    _speedups.setup(pw.ScanError, pw.ScanState, pw.RewriteState, getattr(pw, "_text_int", None))

    print("| workload | file MB | loop | C s (CPU s) | Python s (CPU s) | Python / C (CPU) |")
    print("|---|---:|---|---:|---:|---:|")
    variants = [("", True), (" [Python without fast paths]", False)] if args.generic else [("", True)]

    def row(k: int, mb: float, what: str, c: tuple, p: tuple) -> None:
        print(f"| {k} | {mb:.0f} | {what} | {c[0]:.3f} ({c[1]:.3f}) | {p[0]:.3f} ({p[1]:.3f}) | {p[1] / c[1]:.1f} |")

    for k in [int(x) for x in args.only.split(",")]:
        path = FILES[k]
        if not path.exists():
            print(f"missing {path}: run benchmarks/bench_objects.py --make first", file=sys.stderr)
            return 1
        with open(path, "rb") as fh:  # warm the page cache
            while fh.read(1 << 24):
                pass
        src = open_source(str(path))
        header = read_header(src)
        index = pw.scan_index(src, header, pw.SafetyPolicy.make())
        live = dict(zip(index.live_memo.tolist(), index.live_last.tolist()))
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                mb = len(view) / 1e6
                c = timed(partial(scan_all, _speedups.scan_ops, view, header, pw), args.repeat)
                for label, fast in variants:
                    ops.FAST_PATHS = fast
                    try:
                        p = timed(partial(scan_all, pw.scan_ops, view, header, pw), args.py_repeat)
                    finally:
                        ops.FAST_PATHS = True
                    assert c[2] == p[2], (c[2], p[2])
                    row(k, mb, "scan_ops (index build)" + label, c, p)

                plan = [(header.data_offset, index.body_start, 0), *runs(index)]  # the array's header part first
                for zero_copy in (False, True):
                    c = timed(partial(rewrite_all, _speedups.rewrite_ops, view, plan, live, pw, zero_copy), args.repeat)
                    what = "rewrite_ops, zero-copy ids" if zero_copy else "rewrite_ops, payloads copied"
                    for label, fast in variants:
                        ops.FAST_PATHS = fast
                        try:
                            p = timed(partial(rewrite_all, pw.rewrite_ops, view, plan, live, pw, zero_copy), args.py_repeat)
                        finally:
                            ops.FAST_PATHS = True
                        assert c[2] == p[2], (c[2], p[2])
                        row(k, mb, what + label, c, p)
            finally:
                view.release()
    print(
        f"(load average at the end: {os.getloadavg()[0]:.1f}; C: fastest of {args.repeat}, "
        f"Python: fastest of {args.py_repeat}; ratio of CPU times)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
