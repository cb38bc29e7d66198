"""Benchmark: streaming an object .npy through a pipe (``cat FILE | ...``): time and peak anonymous memory.

Workload (issues 3 and 5): the 2 GB object ``.npy`` of 20,000 float32 arrays
(lengths uniform in [1,000, 49,000), ``benchmarks/bench_convert.py`` generates
it into ``obj_float32_arrays.npy`` in the benchmark data directory (benchmarks/benchdata.py)).  numpy writes 1000
elements per APPENDS batch, ~100 MB here, so a reader that holds a batch
holds ~100 MB (more with bigger elements).  Rows, each a fresh process
reading ``cat FILE`` on its stdin:

* ``iter_objects``: ``for x in npystream.iter_objects(sys.stdin.buffer)``, touching every element
* ``convert``: ``npystream convert - DST.ragged --quiet`` (object stream -> ragged store)
* ``np.load``: ``np.load(io.BytesIO(sys.stdin.buffer.read()), allow_pickle=True)`` and a loop over it

Wall time seen from this process (the pipe included), and peak ``RssAnon``
of the reading process, sampled by a thread of this process every 2 ms from
``/proc/PID/status``.  Ratios are from the same run; the table is markdown.
Usage::

    python benchmarks/bench_stream.py [--src FILE.npy] [--repeat 3] [--rows iter,convert,npload]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from benchdata import DATA

DEFAULT_SRC = str(DATA / "obj_float32_arrays.npy")

ITER_CODE = """
import sys, npystream
n = 0
total = 0
for x in npystream.iter_objects(sys.stdin.buffer):
    n += 1
    total += x.size
print(n, total)
"""

NPLOAD_CODE = """
import io, sys, numpy as np
a = np.load(io.BytesIO(sys.stdin.buffer.read()), allow_pickle=True)
n = 0
total = 0
for x in a.flat:
    n += 1
    total += x.size
print(n, total)
"""


def _rss_anon(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_piped(src: str, cmd: list[str]) -> tuple[float, int, str]:
    """``cat src | cmd``: (seconds, peak RssAnon bytes of cmd, its stdout)."""
    peak = [0]
    t0 = time.perf_counter()
    cat = subprocess.Popen(["cat", src], stdout=subprocess.PIPE)
    proc = subprocess.Popen(cmd, stdin=cat.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert cat.stdout is not None
    cat.stdout.close()  # the reader owns the pipe now

    def sample() -> None:
        while proc.poll() is None:
            v = _rss_anon(proc.pid)
            if v is not None and v > peak[0]:
                peak[0] = v
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    cat.wait()
    wall = time.perf_counter() - t0
    t.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({proc.returncode}): {err.decode(errors='replace')[-2000:]}")
    return wall, peak[0], out.decode().strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", default=DEFAULT_SRC)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rows", default="iter,convert,npload")
    args = ap.parse_args(argv)
    if not os.path.exists(args.src):
        print(f"{args.src} is missing: generate it with benchmarks/bench_convert.py", file=sys.stderr)
        return 1
    rows = args.rows.split(",")
    size = os.path.getsize(args.src)
    subprocess.run(["cat", args.src], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    tmp = tempfile.mkdtemp(prefix="bench_stream_", dir=os.path.dirname(os.path.abspath(args.src)))
    results: dict[str, list[tuple[float, int]]] = {r: [] for r in rows}
    outputs: dict[str, str] = {}
    try:
        for _ in range(args.repeat):
            for row in rows:
                if row == "iter":
                    cmd = [sys.executable, "-c", ITER_CODE]
                elif row == "convert":
                    dst = os.path.join(tmp, "out.ragged")
                    shutil.rmtree(dst, ignore_errors=True)
                    cmd = [sys.executable, "-m", "npystream", "convert", "-", dst, "--quiet"]
                elif row == "npload":
                    cmd = [sys.executable, "-c", NPLOAD_CODE]
                else:
                    raise SystemExit(f"unknown row {row!r}")
                wall, peak, out = run_piped(args.src, cmd)
                results[row].append((wall, peak))
                if row != "convert":
                    outputs[row] = out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if "iter" in outputs and "npload" in outputs and outputs["iter"] != outputs["npload"]:
        raise SystemExit(f"iter_objects and np.load disagree: {outputs['iter']} vs {outputs['npload']}")
    names = {
        "iter": "`cat FILE \\| iter_objects(sys.stdin.buffer)` loop",
        "convert": "`cat FILE \\| npystream convert - DST.ragged`",
        "npload": "`np.load(BytesIO(stdin.read()))` + loop",
    }
    base = statistics.median(w for w, _ in results["npload"]) if "npload" in results else None
    print(f"File: {args.src} ({size / 1e9:.2f} GB); median of {args.repeat} runs (min..max); peak RssAnon max over runs\n")
    print("| reader | time s | vs np.load | peak RssAnon MiB |")
    print("|---|---|---|---|")
    for row in rows:
        walls = [w for w, _ in results[row]]
        med = statistics.median(walls)
        ratio = f"{med / base:.2f}x" if base else "-"
        peak = max(p for _, p in results[row]) / 2**20
        print(f"| {names[row]} | {med:.2f} ({min(walls):.2f}..{max(walls):.2f}) | {ratio} | {peak:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
