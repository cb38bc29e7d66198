"""Benchmark: npystream on Dask (1 vs 2 workers) and ``convert --workers``.

Two workloads, generated once into the benchmark data directory
(``benchmarks/benchdata.py``, or ``--dir``):

* ``small2m``: 2,000,000 int32 arrays of lengths uniform in [0, 12) (seed 0),
  about 104 MB of pickle -- per-element cost dominates.  Rows:
  ``convert --workers 1`` (the one-process converter), ``--workers 2`` (fork
  pool), and the same partitioning on a Dask ``LocalCluster`` of 2 workers
  (cluster start-up included, as a user of ``--workers`` would pay it).
  Every output is compared byte for byte with the one-process output
  (``values.npy``, ``offsets.npy``, ``meta.json``).
* ``arrays``: int32 arrays of lengths uniform in [0, 500) (seed 1), up to
  ``--size`` bytes (default 2 GB, about 1.9 million elements).  Rows:
  ``sum(x.sum() for x in iter_objects(f))`` in this process, and
  ``to_dask(f).map(lambda x: x.sum()).sum()`` on a ``LocalCluster`` of 1 and
  of 2 workers (one thread each; cluster start-up timed separately; the
  ``.nsidx`` exists: its build is timed on its own as ``index``).  Peak
  anonymous memory of each worker process (``RssAnon``, sampled every 20 ms).

Each timed run is a fresh process for ``convert`` (``python -m npystream``);
the page cache is warm (files read once first).  Report ``uptime`` next to
the figures: ratios within one run are what count.  Usage::

    python benchmarks/bench_dask.py [--dir DIR] [--size BYTES] [--repeat 3] [--only convert|dask]
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import statistics
import sys
import threading
import time

import numpy as np
from benchdata import data_dir

import npystream


def _rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class _Sampler:
    """Peak RssAnon of some processes, sampled every 20 ms on a thread."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.peak = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for pid in self.pids:
                self.peak[pid] = max(self.peak[pid], _rss_anon(pid))

    def stop(self) -> dict[int, int]:
        self._stop.set()
        self._thread.join()
        return self.peak


def _warm(path: str) -> None:
    with open(path, "rb") as fh:
        while fh.read(16 << 20):
            pass


def make_small(path: str, n: int = 2_000_000) -> None:
    """2M int32 arrays of lengths [0, 12), through the streaming writer (byte-identical to np.save)."""
    from npystream.formats.objwriter import save_objects

    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 12, n)
    save_objects(path, (np.arange(int(k), dtype=np.int32) for k in lengths), length=n)


def make_arrays(path: str, size: int) -> None:
    """int32 arrays of lengths [0, 500) up to about ``size`` bytes of pickle."""
    from npystream.formats.objwriter import save_objects

    rng = np.random.default_rng(1)
    n = max(1, size // 1150)  # ~1 KB of data + ~150 bytes of pickle per element
    lengths = rng.integers(0, 500, n)
    save_objects(path, (np.arange(int(k), dtype=np.int32) for k in lengths), length=n)


def _run_sampled(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, float]:
    """Run ``cmd``; return (wall s, its own CPU s, the largest CPU s of one of its child processes).

    CPU times are sampled every 20 ms with psutil (the last sample before a
    process ends).  On a machine shared with other work, wall time depends on
    what else runs; ``own + max(child)`` is the critical path the run would
    take on otherwise idle cores (the client's serial work, plus the slowest
    worker; the client waits while its workers run).
    """
    import psutil

    t = time.perf_counter()
    proc = psutil.Popen(cmd, env=env)
    own = 0.0
    child: dict[int, float] = {}
    while proc.poll() is None:
        try:
            c = proc.cpu_times()
            own = c.user + c.system
            for kid in proc.children(recursive=True):
                try:
                    k = kid.cpu_times()
                    child[kid.pid] = k.user + k.system
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"{cmd} failed with {proc.returncode}")
    return wall, own, max(child.values(), default=0.0)


def _convert(src: str, dst: str, workers: int) -> tuple[float, float, float]:
    shutil.rmtree(dst, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(
        os.path.abspath(npystream.__file__))), os.environ.get("PYTHONPATH")])))
    return _run_sampled([sys.executable, "-m", "npystream", "convert", src, dst, "-q", "--workers", str(workers)],
                        env)


_DASK_CONVERT = """
import sys, time
t = time.perf_counter()
from npystream import conversion, parallel_convert
info = conversion.describe_source(sys.argv[1])
parallel_convert.convert_object_parallel(sys.argv[1], sys.argv[2], workers=2, identity=info.identity,
    overwrite=False, resume=False, safety={"trusted": False, "allowed_globals": ()}, kind="array", cast=None,
    durable=False,
    label=sys.argv[1], executor="dask")
"""


def _convert_dask(src: str, dst: str) -> tuple[float, float, float]:
    shutil.rmtree(dst, ignore_errors=True)
    return _run_sampled([sys.executable, "-c", _DASK_CONVERT, src, dst])


def _same(a: str, b: str) -> bool:
    return all(filecmp.cmp(os.path.join(a, p), os.path.join(b, p), shallow=False)
               for p in ("values.npy", "offsets.npy", "meta.json"))


def bench_convert(d: str, repeat: int) -> None:
    src = os.path.join(d, "small2m.npy")
    if not os.path.exists(src):
        print(f"generating {src} ...", flush=True)
        make_small(src)
    _warm(src)
    ref = os.path.join(d, "small2m-w1.ragged")
    rows: dict[str, list[tuple[float, float, float]]] = {
        "--workers 1": [], "--workers 2": [], "LocalCluster(2), start-up included": []}
    for _ in range(repeat):  # interleaved
        rows["--workers 1"].append(_convert(src, ref, 1))
        out = os.path.join(d, "small2m-w2.ragged")
        rows["--workers 2"].append(_convert(src, out, 2))
        if not _same(ref, out):
            raise SystemExit("--workers 2 output differs from --workers 1")
        out = os.path.join(d, "small2m-dask.ragged")
        rows["LocalCluster(2), start-up included"].append(_convert_dask(src, out))
        if not _same(ref, out):
            raise SystemExit("LocalCluster output differs from --workers 1")
    print(f"\nconvert {src} ({os.path.getsize(src) / 1e6:.0f} MB, 2,000,000 elements), {repeat} runs, medians:")
    print("  wall = seconds on this (shared) machine; path = client CPU + slowest worker's CPU (s)")
    base_wall = statistics.median(r[0] for r in rows["--workers 1"])
    base_path = statistics.median(r[1] + r[2] for r in rows["--workers 1"])
    for name, rs in rows.items():
        wall = statistics.median(r[0] for r in rs)
        path = statistics.median(r[1] + r[2] for r in rs)
        print(f"  {name:38s} wall {wall:6.2f} ({base_wall / wall:.2f}x)  path {path:6.2f} ({base_path / path:.2f}x)"
              f"  [client CPU {', '.join(f'{r[1]:.2f}' for r in rs)}; slowest worker CPU "
              f"{', '.join(f'{r[2]:.2f}' for r in rs)}; wall {', '.join(f'{r[0]:.2f}' for r in rs)}]")
    print("  outputs byte-identical to --workers 1: yes")
    for p in ("small2m-w1.ragged", "small2m-w2.ragged", "small2m-dask.ragged"):  # outputs; the input stays
        shutil.rmtree(os.path.join(d, p), ignore_errors=True)


def bench_dask(d: str, size: int, repeat: int) -> None:
    from dask.distributed import Client, LocalCluster

    src = os.path.join(d, f"arrays-{size}.npy")
    if not os.path.exists(src):
        print(f"generating {src} ...", flush=True)
        make_arrays(src, size)
    _warm(src)
    gb = os.path.getsize(src) / 1e9
    idx = src + ".nsidx"
    if os.path.exists(idx):
        os.unlink(idx)
    t = time.perf_counter()
    with npystream.open(src) as arr:
        arr.build_index(save=True)
        count = arr.size
    t_index = time.perf_counter() - t
    print(f"\n{src}: {gb:.2f} GB, {count} elements; index build {t_index:.2f} s "
          f"({t_index / gb:.2f} s/GB), .nsidx {os.path.getsize(idx) / 1e6:.1f} MB "
          f"({os.path.getsize(idx) / 1e6 / gb:.1f} MB/GB)")
    single = []
    single_cpu = []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        total = sum(int(x.sum()) for x in npystream.iter_objects(src))
        single.append(time.perf_counter() - t)
        single_cpu.append(time.process_time() - c)
    base_cpu = statistics.median(single_cpu)
    print(f"  one process, iter_objects: median {statistics.median(single):.2f} s "
          f"(runs {', '.join(f'{x:.2f}' for x in single)}), CPU {base_cpu:.2f} s")
    base = statistics.median(single)
    for workers in (1, 2):
        t = time.perf_counter()
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
        t_start = time.perf_counter() - t
        import psutil

        pids = list(client.run(os.getpid).values())
        procs = [psutil.Process(pid) for pid in pids]

        def cpu(procs: list = procs) -> list[float]:
            return [sum(p.cpu_times()[:2]) for p in procs]

        try:
            times = []
            paths = []
            peaks: dict[int, int] = {}
            for _ in range(repeat):
                t = time.perf_counter()
                c0, w0 = time.process_time(), cpu()
                bag = npystream.to_dask(src)
                sampler = _Sampler(pids)
                got = bag.map(lambda x: int(x.sum())).sum().compute()
                peak = sampler.stop()
                times.append(time.perf_counter() - t)
                paths.append(time.process_time() - c0 + max(b - a for a, b in zip(w0, cpu())))
                for pid, v in peak.items():
                    peaks[pid] = max(peaks.get(pid, 0), v)
                if got != total:
                    raise SystemExit(f"dask sum {got} != {total}")
            med = statistics.median(times)
            path = statistics.median(paths)
            print(f"  LocalCluster({workers}): start-up {t_start:.2f} s; to_dask(f).map(sum).sum() median "
                  f"{med:.2f} s (runs {', '.join(f'{x:.2f}' for x in times)}), {bag.npartitions} partitions, "
                  f"speed-up vs one process {base / med:.2f}x; critical path (client CPU + busiest worker CPU) "
                  f"{path:.2f} s, {base_cpu / path:.2f}x; peak RssAnon per worker "
                  f"{', '.join(f'{v / 1e6:.0f} MB' for v in peaks.values())}")
        finally:
            client.close()
            cluster.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=str(data_dir()))
    ap.add_argument("--size", type=int, default=2_000_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", choices=("convert", "dask"))
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    print(f"load average before: {os.getloadavg()}")
    if args.only in (None, "convert"):
        bench_convert(args.dir, args.repeat)
    if args.only in (None, "dask"):
        bench_dask(args.dir, args.size, args.repeat)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
