"""Benchmark: `npystream convert` of the 2 GB object .npy (20,000 float32 arrays) vs `cp`.

Workload (issue 5): the object ``.npy`` that ``np.save`` writes for 20,000
float32 arrays with lengths uniform in [1,000, 49,000) (seed 0), about 2 GB.
It is generated once into the benchmark data directory (``benchmarks/benchdata.py``, or ``--dir``) with
:func:`generate_float32_objects`, which streams it with ``save_objects``
(byte-identical to ``np.save``); ``benchmarks/bench_objects.py`` may import it.

Measured, page cache warm (the file is read once before timing), each run
a fresh process, wall time as seen from this process, peak anonymous
memory (``RssAnon`` of the child, sampled every 2 ms):

* ``cp SRC COPY``                                 (the bar: 1.5x)
* ``npystream convert SRC DST.ragged``            (object .npy -> ragged store: zero-copy
  views of the mapped file copied into the writer's 1 MiB buffer, pwrite()n from there)
* ``cat SRC | npystream convert - DST2.ragged``   (the same through a pipe: no index, no
  zero-copy, one element at a time through ``iter_objects``)
* ``npystream convert DST.ragged BACK.npy``       (ragged store -> object .npy)

Ratios are from the same run.  Usage::

    python benchmarks/bench_convert.py [--dir DIR] [--count 20000] [--repeat 5]
        [--src FILE.npy] [--rows to_ragged,stdin,to_npy] [--no-prewarm]

Fresh memory for every run.  Each row writes about 2 GB of new page cache,
and on a virtual machine whose balloon device reports free pages to the host
(virtio-balloon free page reporting, as on the development VM) memory that
has been free for a few seconds is handed back to the host and costs a host
page fault per page when the guest touches it again: the same ``cp`` took
2.2-7.4 s after the freed pages had been reported and 0.6-1.4 s right after
3 GB had been touched and freed (``/tmp/exp/prewarm.py``, 2026-12-07).  Which
row got the fast memory then depended on the order of the rows (one run had
every ``cp`` but the first at 4.2-4.7 s and the conversions at 1.4-1.9 s).
So before every timed run the parent touches and frees ``size + 1 GB`` of
anonymous memory (after ``sync``): every row, ``cp`` included, starts with the
same supply of recently freed pages.  ``--no-prewarm`` turns that off.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
from benchdata import data_dir

from npystream.demo import measure

LO, HI = 1_000, 49_000
ROWS = {
    "cp": "cp",
    "to_ragged": "convert object .npy -> ragged",
    "stdin": "cat | convert - (streamed) -> ragged",
    "to_npy": "convert ragged -> object .npy",
}


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
import npystream.conversion as conversion
r = conversion.convert(sys.argv[1], sys.argv[2], overwrite=True, progress=False)
print(json.dumps({"seconds": time.perf_counter() - t, "elements": r.elements}))
"""


# Children run like an installed package: with compiled bytecode (pip compiles it at install
# time).  PYTHONDONTWRITEBYTECODE (set in some development shells) would make every run
# recompile npystream's modules (about 70 ms here); the cache goes outside the repository.
_ENV: dict[str, str] | None = None


def _child_env(pycache: str | None) -> dict[str, str] | None:
    if pycache is None:
        return None
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = pycache
    return env


_PREWARM = 0  # bytes of anonymous memory touched and freed before each timed run (see the docstring)


def _prewarm() -> None:
    if _PREWARM:
        block = np.ones(_PREWARM, dtype=np.uint8)  # touches every page
        del block  # freed: the pages the next run's page cache is made of


def _run(code: str, *args: str, stdin: str | None = None) -> tuple[float, float, int | None, float]:
    """(wall s, in-process s, peak RssAnon, CPU s: user + system of the child and its children)."""
    os.sync()  # start every timed run with no dirty pages from the previous one
    _prewarm()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    if stdin is not None:  # a real pipe: cat SRC | python ...
        cat = subprocess.Popen(["cat", stdin], stdout=subprocess.PIPE)
        m = measure(code, *args, stdin=cat.stdout, env=_ENV)
        cat.stdout.close()
        cat.wait()
    else:
        m = measure(code, *args, env=_ENV)
    wall = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    if m.returncode != 0:
        raise SystemExit(f"failed: {m.stderr}")
    return wall, m.out["seconds"], m.peak, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=str(data_dir()))
    ap.add_argument("--count", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--src", help="an existing object .npy to convert instead of the generated one")
    ap.add_argument("--rows", default=",".join(ROWS),
                    help=f"comma-separated rows to run (default all: {','.join(ROWS)}; cp always runs)")
    ap.add_argument("--no-prewarm", action="store_true",
                    help="do not touch and free memory before each timed run (see the docstring)")
    ap.add_argument("--no-pycache", action="store_true",
                    help="let children recompile npystream every run if PYTHONDONTWRITEBYTECODE is set")
    a = ap.parse_args()
    global _ENV, _PREWARM
    _ENV = _child_env(None if a.no_pycache else os.path.join(a.dir, "pycache"))
    subprocess.run([sys.executable, "-c", "import npystream.conversion, npystream.formats.ragged, "
                    "npystream.object_array, npystream.objects, npystream.formats.pickle_walk, "
                    "npystream.formats.objwriter, npystream.verification"], env=_ENV, check=True)
    wanted = {r.strip() for r in a.rows.split(",") if r.strip()} | {"cp"}
    unknown = wanted - set(ROWS)
    if unknown:
        ap.error(f"unknown rows {sorted(unknown)}; pick from {','.join(ROWS)}")
    if "to_npy" in wanted:
        wanted.add("to_ragged")  # converts the store that row makes
    os.makedirs(a.dir, exist_ok=True)
    src = a.src or os.path.join(a.dir, f"objects_f32_{a.count}_seed0.npy")
    t = time.perf_counter()
    if not a.src:
        generate_float32_objects(src, a.count)
    gen_s = time.perf_counter() - t
    size = os.path.getsize(src)
    _PREWARM = 0 if a.no_prewarm else size + (1 << 30)
    print(f"file: {src}  {size / 1e9:.2f} GB, {a.count} float32 arrays (ready in {gen_s:.1f} s)")
    print("before each run: sync" + (f", {_PREWARM / 1e9:.1f} GB touched and freed" if _PREWARM else ""))
    print("children: " + ("compiled bytecode cached in " + _ENV["PYTHONPYCACHEPREFIX"] if _ENV else
                          "inherited environment (no bytecode cache if PYTHONDONTWRITEBYTECODE is set)"))
    copy = os.path.join(a.dir, "bench_convert_cp.npy")
    store = os.path.join(a.dir, "bench_convert.ragged")
    back = os.path.join(a.dir, "bench_convert_back.npy")
    rows: dict[str, list[tuple[float, float, int | None, float]]] = {name: [] for name in ROWS}
    for _ in range(a.repeat):  # interleaved: cp, then each conversion, then cp again next round
        _warm(src)
        _tree_rm(copy)
        rows["cp"].append(_run(_CP, src, copy))
        _tree_rm(copy)
        if "to_ragged" in wanted:
            _warm(src)
            _tree_rm(store)
            rows["to_ragged"].append(_run(_CONVERT, src, store, "default"))
        if "to_npy" in wanted:
            _tree_rm(back)
            rows["to_npy"].append(_run(_CONVERT, store, back, "default"))
        if "stdin" in wanted:
            _tree_rm(store + "2")
            rows["stdin"].append(_run(_CONVERT, "-", store + "2", "default", stdin=src))
            _tree_rm(store + "2")
    checks = []
    if "to_ragged" in wanted:
        same = subprocess.run([sys.executable, "-m", "npystream", "verify", src, store],
                              capture_output=True, text=True)
        checks.append(f"verify SRC vs store: {same.stdout.strip() or same.stderr.strip()}")
    if "to_npy" in wanted:
        identical = subprocess.run(["cmp", "-s", src, back]).returncode == 0
        checks.append(f"ragged -> .npy output byte-identical to the source: {identical}")
    for p in (copy, store, back):
        _tree_rm(p)

    def med(name: str, i: int) -> float:
        return statistics.median(r[i] for r in rows[name])

    def peak(name: str) -> str:
        vals = [r[2] for r in rows[name] if r[2] is not None]
        return f"{max(vals) / 2**20:.0f} MiB" if vals else "n/a"

    cp, cp_cpu = med("cp", 0), med("cp", 3)
    print(f"\nmedian of {a.repeat} runs, page cache warm; wall = whole process incl. interpreter start;")
    print("CPU = user + system time of the process and its children (cp: its Python wrapper too),")
    print("steadier than wall when other processes compete for the cores")
    print(f"{'':40} {'wall s':>7} {'in-proc s':>9} {'x cp':>6} {'CPU s':>6} {'x cp':>6} {'GB/s':>5}  peak RssAnon")
    for name in ROWS:
        if name not in wanted:
            continue
        w, s, c = med(name, 0), med(name, 1), med(name, 3)
        each = " ".join(f"{r[0]:.2f}" for r in rows[name])
        print(f"{ROWS[name]:40} {w:7.2f} {s:9.2f} {w / cp:6.2f} {c:6.2f} {c / cp_cpu:6.2f} "
              f"{size / 1e9 / w:5.2f}  {peak(name)}   (walls: {each})")
    if "to_ragged" in wanted:
        pairs = [r[0] / c[0] for r, c in zip(rows["to_ragged"], rows["cp"])]
        print(f"\nconvert / cp, wall, round by round: {' '.join(f'{x:.2f}' for x in pairs)} "
              f"(median {statistics.median(pairs):.2f})")
    print()
    for line in checks:
        print(line)


if __name__ == "__main__":
    main()
