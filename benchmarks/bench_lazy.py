"""Benchmark: deferred arithmetic (`npystream.lazy`) and concatenation (`npystream.concat`) over memmaps.

Rows (each timed in a fresh child process, page cache warm, best of ``--repeat``
runs interleaved across the rows of a group):

* ``(a*2 + b).sum()`` on two 1 GiB float64 ``.npy`` memmaps: numpy eager, Dask
  (``from_array``, 4 Mi-element chunks), numexpr (4 Mi-element blocks, if
  installed), a hand-written fused loop (64 Ki-element blocks into reused
  buffers) and ``npystream.lazy``;
* writing ``a*2 + b`` to a new ``.npy``: ``npystream.save_npy`` vs ``cp`` of one input;
* ``(lazy(a)*2 + b)[123456]``: latency per call (median of 2000 calls);
* 100k random row reads (``c[i]``, one call each, and one ``c[idx]`` gather)
  from a 10-file ``concat`` vs the same reads from one memmap of the same rows;
* ``npystream concat`` (the CLI, a fresh process) of 4 x 512 MiB files vs
  ``cp`` of one file of the same 2 GiB.

Peak anonymous memory (RssAnon from /proc/self/status, sampled every 2 ms by a
thread, minus the value before the workload) is reported beside each row:
mapped file pages are not anonymous.  ``--chart PATH`` draws the table as a
bar chart (matplotlib).  ``--block-sweep`` times the lazy sum at several
block sizes (how ``npystream.deferred.BLOCK_ELEMENTS`` was chosen).

Usage::

    python benchmarks/bench_lazy.py [--dir DIR] [--repeat 3] [--repeat-fast 7] [--chart docs/bench_lazy.png]
                                    [--block-sweep] [--keep]

Data (about 6 GiB) goes to ``--dir`` (default ~/.cache/npystream-bench) and is
deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

GIB = 1 << 30
MIB = 1 << 20


from benchdata import AnonPeak, rss_anon_kib  # noqa: E402 - one sampler for every benchmark


def paths(d: str) -> dict[str, str]:
    return {"a": os.path.join(d, "lazy_a.npy"), "b": os.path.join(d, "lazy_b.npy"),
            "out": os.path.join(d, "lazy_out.npy"), "cp": os.path.join(d, "lazy_cp.npy"),
            "one": os.path.join(d, "concat_one.npy"), "cat": os.path.join(d, "concat_out.npy"),
            "cat_cp": os.path.join(d, "concat_cp.npy"), "big": os.path.join(d, "concat_big.npy")}


def make_data(d: str, size_gib: float) -> None:
    import npystream

    os.makedirs(d, exist_ok=True)
    p = paths(d)
    n = int(size_gib * GIB) // 8
    for key, seed in (("a", 1), ("b", 2)):
        if not os.path.exists(p[key]):
            rng = np.random.default_rng(seed)
            mm = npystream.create_npy(p[key] + ".tmp", (n,), "<f8", overwrite=True)
            for i in range(0, n, 1 << 22):
                mm[i:i + (1 << 22)] = rng.random(min(1 << 22, n - i))
            mm.flush()
            del mm
            os.replace(p[key] + ".tmp", p[key])
    # 10 files of 64 MiB, rows of 128 float32 (512 B); and one memmap with the same rows
    rows = 64 * MIB // 512
    for i in range(10):
        f = os.path.join(d, f"rows_{i}.npy")
        if not os.path.exists(f):
            np.save(f, np.random.default_rng(10 + i).random((rows, 128), dtype=np.float32))
    if not os.path.exists(p["one"]):
        npystream.concat([os.path.join(d, f"rows_{i}.npy") for i in range(10)]).save(p["one"])
    # 4 x 512 MiB for the CLI, and one 2 GiB file for cp
    for i in range(4):
        f = os.path.join(d, f"part_{i}.npy")
        if not os.path.exists(f):
            mm = npystream.create_npy(f, (512 * MIB // 8,), "<f8")
            mm[:] = i
            mm.flush()
            del mm
    if not os.path.exists(p["big"]):
        npystream.concat([os.path.join(d, f"part_{i}.npy") for i in range(4)]).save(p["big"])


def data_files(d: str) -> list[str]:
    return [*paths(d).values(), *[os.path.join(d, f"rows_{i}.npy") for i in range(10)],
            *[os.path.join(d, f"part_{i}.npy") for i in range(4)]]


def remove_data(d: str) -> None:
    """Delete the files this benchmark made (and the directory if that leaves it empty)."""
    for f in data_files(d):
        for name in (f, f + ".tmp"):
            if os.path.exists(name):
                os.unlink(name)
    try:
        os.rmdir(d)
    except OSError:
        pass


def warm(*files: str) -> None:
    buf = bytearray(64 * MIB)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


# --------------------------------------------------------------------------- #
# workloads (run in a child process)
# --------------------------------------------------------------------------- #


def fused_loop(a: np.ndarray, b: np.ndarray, block: int = 1 << 16) -> float:
    buf = np.empty(block, a.dtype)
    s = 0.0
    n = a.shape[0]
    for i in range(0, n, block):
        x = a[i:i + block]
        y = b[i:i + block]
        o = buf[:x.shape[0]]
        np.multiply(x, 2, out=o)
        np.add(o, y, out=o)
        s += o.sum()
    return s


def workload(name: str, d: str, arg: str) -> dict:
    import npystream

    p = paths(d)
    a = np.load(p["a"], mmap_mode="r")
    b = np.load(p["b"], mmap_mode="r")
    result: object = None
    extra: dict = {}
    base = rss_anon_kib()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with AnonPeak() as peak:
        if name == "numpy":
            result = float((a * 2 + b).sum())
        elif name == "dask":
            import dask
            import dask.array as da

            with dask.config.set(scheduler="threads"):
                x = da.from_array(a, chunks=1 << 22)
                y = da.from_array(b, chunks=1 << 22)
                result = float((x * 2 + y).sum().compute())
        elif name == "numexpr":
            import numexpr as ne

            s = 0.0
            blk = 1 << 22
            buf = np.empty(blk)
            for i in range(0, a.shape[0], blk):
                x, y = a[i:i + blk], b[i:i + blk]
                s += ne.evaluate("x*2+y", out=buf[:x.shape[0]]).sum()
            result = float(s)
        elif name == "fused":
            result = float(fused_loop(a, b))
        elif name == "lazy":
            if arg:
                import npystream.deferred as nl

                nl.BLOCK_ELEMENTS = int(arg)
            result = float((npystream.lazy(a) * 2 + b).sum())
        elif name == "save_npy":
            npystream.save_npy(p["out"], npystream.lazy(a) * 2 + b, progress=False)
        elif name == "cp":
            subprocess.run(["cp", p["a"], p["cp"]], check=True)
        elif name == "index":
            x = npystream.lazy(a) * 2 + b
            times = []
            for _ in range(2000):
                t = time.perf_counter()
                v = x[123456]
                times.append(time.perf_counter() - t)
            extra["latency_us"] = statistics.median(times) * 1e6
            result = float(v)
        elif name in ("reads_concat", "reads_one", "gather_concat", "gather_one"):
            if name.endswith("concat"):
                src = npystream.concat([os.path.join(d, f"rows_{i}.npy") for i in range(10)])
            else:
                src = np.load(p["one"], mmap_mode="r")
            idx = np.random.default_rng(0).integers(0, src.shape[0], 100_000)
            t = time.perf_counter()
            if name.startswith("reads"):
                s = 0.0
                for i in idx.tolist():
                    s += src[i][0]
            else:
                s = float(np.asarray(src[idx])[:, 0].sum())
            extra["reads_seconds"] = time.perf_counter() - t
            result = float(s)
        elif name == "concat_cli":
            subprocess.run([sys.executable, "-m", "npystream", "concat", "-q",
                            *[os.path.join(d, f"part_{i}.npy") for i in range(4)], "-o", p["cat"]],
                           check=True)
        elif name == "concat_cp":
            subprocess.run(["cp", p["big"], p["cat_cp"]], check=True)
        else:
            raise SystemExit(f"unknown workload {name}")
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(getattr(x1, f) - getattr(x0, f) for x0, x1 in ((r0, r1), (c0, c1))
              for f in ("ru_utime", "ru_stime"))
    extra["cpu_seconds"] = cpu
    return {"name": name, "seconds": extra.pop("reads_seconds", seconds), "peak_mib": (peak.peak - base) / 1024,
            "result": result, **extra}


WRITERS = {"save_npy": "out", "cp": "cp", "concat_cli": "cat", "concat_cp": "cat_cp"}


def child(name: str, d: str, arg: str = "") -> dict:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    if name in WRITERS:
        # the same start for every writer: no old output to replace, no dirty pages of the
        # previous run still being written back
        out = paths(d)[WRITERS[name]]
        if os.path.exists(out):
            os.unlink(out)
        os.sync()
    out = subprocess.run([sys.executable, __file__, "--child", name, "--dir", d, "--arg", arg],
                         check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def best(runs: list[dict]) -> dict:
    return min(runs, key=lambda r: r["seconds"])


def measure(group: list[str], d: str, repeat: int, args: dict[str, str] | None = None) -> dict[str, dict]:
    runs: dict[str, list[dict]] = {g: [] for g in group}
    for _ in range(repeat):
        for g in group:
            runs[g].append(child(g, d, (args or {}).get(g, "")))
            print(f"  {g}: {runs[g][-1]['seconds']:.3f} s, peak anon {runs[g][-1]['peak_mib']:.1f} MiB",
                  file=sys.stderr)
    return {g: best(r) | {"all": [round(x["seconds"], 3) for x in r]} for g, r in runs.items()}


def draw(res: dict[str, dict], path: str, load: str, repeat: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4))
    groups = [
        ("(a*2+b).sum(), 2 x 1 GiB", ["numpy", "dask", "numexpr", "fused", "lazy"],
         ["numpy eager", "dask", "numexpr", "hand fused", "npystream.lazy"]),
        ("write a*2+b to .npy (1 GiB)", ["save_npy", "cp"], ["save_npy", "cp one input"]),
        ("100k random rows (512 B)", ["reads_concat", "reads_one", "gather_concat", "gather_one"],
         ["c[i], 10-file concat", "m[i], one memmap", "c[idx] gather", "m[idx] gather"]),
        ("join 4 x 512 MiB", ["concat_cli", "concat_cp"], ["npystream concat", "cp 2 GiB"]),
    ]
    for ax, (title, keys, labels) in zip(axes, groups):
        keys_l = [(k, lab) for k, lab in zip(keys, labels) if k in res]
        vals = [res[k]["seconds"] for k, _ in keys_l]
        colors = ["#d62728" if k in ("lazy", "save_npy", "reads_concat", "gather_concat", "concat_cli")
                  else "#7f7f7f"
                  for k, _ in keys_l]
        bars = ax.bar([lab for _, lab in keys_l], vals, color=colors)
        for bar, (k, _) in zip(bars, keys_l):
            ax.annotate(f"{res[k]['seconds']:.2f} s\n{res[k]['peak_mib']:.0f} MiB",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("seconds (lower is better)")
        ax.set_ylim(0, max(vals) * 1.3 if vals else 1)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(f"npystream lazy/concat (red) vs alternatives: best of {repeat} runs, 2-core shared VM, "
                 f"page cache warm; labels: time, peak anonymous memory (load average {load})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=os.path.expanduser("~/.cache/npystream-bench"))
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3, help="runs of the (slow) sum group")
    ap.add_argument("--repeat-fast", type=int, default=7, help="runs of the other groups")
    ap.add_argument("--chart", help="write the bar chart PNG here")
    ap.add_argument("--block-sweep", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the data for the next run")
    ap.add_argument("--child")
    ap.add_argument("--arg", default="")
    ns = ap.parse_args()
    if ns.child:
        print(json.dumps(workload(ns.child, ns.dir, ns.arg)))
        return
    try:
        make_data(ns.dir, ns.size_gib)
        p = paths(ns.dir)
        warm(p["a"], p["b"], p["one"], p["big"], *[os.path.join(ns.dir, f"rows_{i}.npy") for i in range(10)],
             *[os.path.join(ns.dir, f"part_{i}.npy") for i in range(4)])
        res: dict[str, dict] = {}
        if ns.block_sweep:
            sizes = [1 << k for k in (13, 14, 15, 16, 17, 18, 20, 22)]
            names = [f"lazy@{s}" for s in sizes]
            sweep: dict[str, list[float]] = {n: [] for n in names}
            for _ in range(ns.repeat):
                for s, n in zip(sizes, names):
                    sweep[n].append(child("lazy", ns.dir, str(s))["seconds"])
            fused = measure(["fused"], ns.dir, ns.repeat)["fused"]["seconds"]
            print("block elements | best s | runs")
            for s, n in zip(sizes, names):
                print(f"{s:>8} | {min(sweep[n]):.3f} | {sweep[n]}")
            print(f"hand fused loop (64Ki): {fused:.3f} s")
            return
        have_ne = subprocess.run([sys.executable, "-c", "import numexpr"], capture_output=True).returncode == 0
        sum_rows = ["numpy", "dask", *(["numexpr"] if have_ne else []), "fused", "lazy"]
        rows = [os.path.join(ns.dir, f"rows_{i}.npy") for i in range(10)]
        parts = [os.path.join(ns.dir, f"part_{i}.npy") for i in range(4)]
        # each group re-reads its inputs first: other jobs on the machine may have evicted them
        warm(p["a"], p["b"])
        res.update(measure(sum_rows, ns.dir, ns.repeat))
        warm(p["a"], p["b"])
        res.update(measure(["save_npy", "cp"], ns.dir, ns.repeat_fast))
        res.update(measure(["index"], ns.dir, 1))
        warm(p["one"], *rows)
        res.update(measure(["reads_concat", "reads_one", "gather_concat", "gather_one"], ns.dir, ns.repeat_fast))
        warm(p["big"], *parts)
        res.update(measure(["concat_cli", "concat_cp"], ns.dir, ns.repeat_fast))
        load = os.getloadavg()
        load_s = ", ".join(f"{x:.2f}" for x in load)
        print(f"\nload average after the run: {load_s}")
        print("\n| approach | time (best) | all runs | CPU s (whole child) | peak anon MiB |")
        print("|---|---|---|---|---|")
        labels = {"numpy": "numpy eager `(a*2+b).sum()`", "dask": "dask `from_array(chunks=4Mi)`",
                  "numexpr": "numexpr, 4Mi-element blocks", "fused": "hand fused loop, 64Ki blocks",
                  "lazy": "`(npystream.lazy(a)*2+b).sum()`", "save_npy": "`save_npy(out, lazy(a)*2+b)`",
                  "cp": "`cp a.npy` (1 GiB)", "index": "`(lazy(a)*2+b)[123456]` (whole child)",
                  "reads_concat": "100k `c[i]`, 10-file concat", "reads_one": "100k `m[i]`, one memmap",
                  "gather_concat": "`c[idx]`, 100k rows, 10-file concat",
                  "gather_one": "`m[idx]`, 100k rows, one memmap",
                  "concat_cli": "`npystream concat` 4 x 512 MiB", "concat_cp": "`cp` 2 GiB"}
        for k, r in res.items():
            print(f"| {labels[k]} | {r['seconds']:.3f} s | {r['all']} | {r['cpu_seconds']:.2f} | "
                  f"{r['peak_mib']:.1f} |")
        print(f"\nlatency of (lazy(a)*2+b)[123456]: median {res['index']['latency_us']:.1f} us")

        def ratio(x: str, y: str) -> str:
            # the two rows of a round ran back to back: the median of the per-round ratios moves
            # least with the machine's other jobs
            rounds = statistics.median(a / b for a, b in zip(res[x]["all"], res[y]["all"]))
            return f"{res[x]['seconds'] / res[y]['seconds']:.2f}x (median per round {rounds:.2f}x)"

        print("\nratios of the best runs (target):")
        print(f"  lazy / fused loop  {ratio('lazy', 'fused')} (<= 1.3x)")
        print(f"  lazy / numpy eager {ratio('lazy', 'numpy')} (<= 0.3x)")
        print(f"  lazy / dask        {ratio('lazy', 'dask')} (<= 0.2x)")
        print(f"  lazy peak anon     {res['lazy']['peak_mib']:.1f} MiB (< 64 MiB)")
        print(f"  save_npy / cp      {ratio('save_npy', 'cp')} (<= 1.5x)")
        print(f"  b[123456]          {res['index']['latency_us'] / 1000:.3f} ms (< 1 ms)")
        print(f"  concat reads / one memmap {ratio('reads_concat', 'reads_one')} (<= 1.5x); "
              f"gather {ratio('gather_concat', 'gather_one')}")
        print(f"  npystream concat / cp {ratio('concat_cli', 'concat_cp')} (<= 1.5x)")
        if ns.chart:
            draw(res, ns.chart, load_s, f"{ns.repeat}/{ns.repeat_fast}")
            print(f"chart: {ns.chart}")
    finally:
        if not ns.keep and not ns.child:
            remove_data(ns.dir)


if __name__ == "__main__":
    main()
