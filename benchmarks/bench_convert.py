"""Benchmark: `npystream convert` of the 2 GB object .npy (20,000 float32 arrays) vs `cp`.

Workload (issue 5): the object ``.npy`` that ``np.save`` writes for 20,000
float32 arrays with lengths uniform in [1,000, 49,000) (seed 0), about 2 GB.
It is generated once into ``/work/benchdata/`` (or ``--dir``) with
:func:`generate_float32_objects`, which streams it with ``save_objects``
(byte-identical to ``np.save``); ``benchmarks/bench_objects.py`` may import it.

Measured, page cache warm (the file is read once before timing), each run
a fresh process, wall time as seen from this process, peak anonymous
memory (``RssAnon`` of the child, sampled every 2 ms):

* ``cp SRC COPY``                                 (the bar: 1.5x)
* ``npystream convert SRC DST.ragged``            (object .npy -> ragged store)
* ``cat SRC | npystream convert - DST2.ragged``   (the same through a pipe: no index, no
  zero-copy, one element at a time through ``iter_objects``)
* ``npystream convert DST.ragged BACK.npy``       (ragged store -> object .npy)

Ratios are from the same run.  Usage::

    python benchmarks/bench_convert.py [--dir /work/benchdata] [--count 20000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

from npystream.demo import measure

LO, HI = 1_000, 49_000


def generate_float32_objects(path: str, count: int = 20_000, seed: int = 0) -> str:
    """Write (once) the seeded object .npy of ``count`` float32 arrays; return its path."""
    if os.path.exists(path):
        return path
    from npystream.formats.objwriter import save_objects

    rng = np.random.default_rng(seed)
    lengths = rng.integers(LO, HI, size=count)

    def elements():
        for n in lengths:
            yield rng.standard_normal(int(n), dtype=np.float32)

    save_objects(path, elements(), length=count)
    return path


def _warm(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass


def _tree_rm(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


_CP = """
import json, subprocess, sys, time
t = time.perf_counter()
subprocess.run(["cp", sys.argv[1], sys.argv[2]], check=True)
print(json.dumps({"seconds": time.perf_counter() - t}))
"""

_CONVERT = """
import json, sys, time
t = time.perf_counter()
from npystream.conversion import convert
r = convert(sys.argv[1], sys.argv[2], overwrite=True, progress=False)
print(json.dumps({"seconds": time.perf_counter() - t, "elements": r.elements}))
"""


def _run(code: str, *args: str, stdin: str | None = None) -> tuple[float, float, int | None]:
    os.sync()  # start every timed run with no dirty pages from the previous one
    t = time.perf_counter()
    if stdin is not None:  # a real pipe: cat SRC | python ...
        cat = subprocess.Popen(["cat", stdin], stdout=subprocess.PIPE)
        m = measure(code, *args, stdin=cat.stdout)
        cat.stdout.close()
        cat.wait()
    else:
        m = measure(code, *args)
    wall = time.perf_counter() - t
    if m.returncode != 0:
        raise SystemExit(f"failed: {m.stderr}")
    return wall, m.out["seconds"], m.peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/work/benchdata")
    ap.add_argument("--count", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    src = os.path.join(a.dir, f"objects_f32_{a.count}_seed0.npy")
    t = time.perf_counter()
    generate_float32_objects(src, a.count)
    gen_s = time.perf_counter() - t
    size = os.path.getsize(src)
    print(f"file: {src}  {size / 1e9:.2f} GB, {a.count} float32 arrays (ready in {gen_s:.1f} s)")
    copy = os.path.join(a.dir, "bench_convert_cp.npy")
    store = os.path.join(a.dir, "bench_convert.ragged")
    back = os.path.join(a.dir, "bench_convert_back.npy")
    rows: dict[str, list[tuple[float, float, int | None]]] = {
        "cp": [], "to_ragged": [], "to_npy": [], "stdin": []}
    for _ in range(a.repeat):
        _warm(src)
        _tree_rm(copy)
        rows["cp"].append(_run(_CP, src, copy))
        _tree_rm(copy)
        _warm(src)
        _tree_rm(store)
        rows["to_ragged"].append(_run(_CONVERT, src, store))
        _tree_rm(back)
        rows["to_npy"].append(_run(_CONVERT, store, back))
        _tree_rm(store + "2")
        rows["stdin"].append(_run(_CONVERT, "-", store + "2", stdin=src))
        _tree_rm(store + "2")
    same = subprocess.run([sys.executable, "-m", "npystream", "verify", src, store],
                          capture_output=True, text=True)
    identical = subprocess.run(["cmp", "-s", src, back]).returncode == 0
    for p in (copy, store, back):
        _tree_rm(p)

    def med(name: str, i: int) -> float:
        return statistics.median(r[i] for r in rows[name])

    def peak(name: str) -> str:
        vals = [r[2] for r in rows[name] if r[2] is not None]
        return f"{max(vals) / 2**20:.0f} MiB" if vals else "n/a"

    cp = med("cp", 0)
    print(f"\nmedian of {a.repeat} runs, page cache warm; wall = whole process incl. interpreter start")
    print(f"{'':34} {'wall s':>8} {'in-process s':>13} {'x cp (wall)':>12} {'GB/s':>6}  peak RssAnon")
    for name, label in (("cp", "cp"), ("to_ragged", "convert object .npy -> ragged"),
                        ("stdin", "cat | convert - (streamed) -> ragged"),
                        ("to_npy", "convert ragged -> object .npy")):
        w, s = med(name, 0), med(name, 1)
        print(f"{label:34} {w:8.2f} {s:13.2f} {w / cp:12.2f} {size / 1e9 / w:6.2f}  {peak(name)}")
    print(f"\nverify SRC vs store: {same.stdout.strip() or same.stderr.strip()}")
    print(f"ragged -> .npy output byte-identical to the np.save-identical source: {identical}")


if __name__ == "__main__":
    main()
