"""Benchmark: iter_batches over a 2 GiB float32 .npy vs np.load(mmap_mode='r') vs np.copyto.

Workloads (each run in a fresh child process, page cache warm, best of ``--reps`` runs
interleaved across the methods of a group):

* ``copy``: every block of ``--batch-mib`` MiB is ``np.copyto``'d into one reused buffer
  (the consumer does the least possible work, so per-block overhead shows);
* ``sum``: every block is summed (a typical light consumer);
* ``copyto_ram``: the same bytes copied block by block from an array already in RAM:
  the memory-bandwidth limit of the copy workload (no page faults, no file);
* pipe: the 2 GiB file through ``cat FILE |`` summed block by block with ``iter_batches``
  vs ``np.load(io.BytesIO(pipe.read()))`` (``np.load`` cannot read a pipe: it seeks);
* gzip: a ``--gz-mib`` MiB float32 ``.npy.gz`` summed block by block with
  ``iter_batches`` vs ``np.load(gzip.open(path))`` (numpy has no streaming path).

Peak anonymous memory is RssAnon from /proc/self/status sampled every 2 ms by a
thread, minus the value before the workload (file-backed mmap pages are not anonymous).
CPU seconds (user + system, getrusage, best of the runs) are printed beside wall time:
on a shared machine they move much less than wall time.  The child in ``cat FILE |``
counts only the Python process's CPU, not ``cat``'s.

Usage::

    python benchmarks/bench_fixed.py [--size-gib 2] [--gz-mib 512] [--reps 3] [--batch-mib 8]

Data goes to the benchmark data directory (benchmarks/benchdata.py; override with NPYSTREAM_BENCHDATA); it is created once.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
from benchdata import DATA as _DATA

DATA_DIR = str(_DATA)


from benchdata import AnonPeak, rss_anon_kib  # noqa: E402 - one sampler for every benchmark


def make_data(size_gib: float, gz_mib: int) -> tuple[str, str]:
    os.makedirs(DATA_DIR, exist_ok=True)
    cols = 256
    rows = int(size_gib * (1 << 30)) // (cols * 4)
    path = os.path.join(DATA_DIR, f"bench_fixed_f32_{rows}x{cols}.npy")
    if not os.path.exists(path):
        tmp = path + ".tmp"
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype="<f4", shape=(rows, cols))
        rng = np.random.default_rng(0)
        step = 1 << 16
        for i in range(0, rows, step):
            mm[i : i + step] = rng.random((min(step, rows - i), cols), dtype=np.float32)
        mm.flush()
        del mm
        os.replace(tmp, path)
    gz_rows = gz_mib * (1 << 20) // (cols * 4)
    gz_path = os.path.join(DATA_DIR, f"bench_fixed_f32_{gz_rows}x{cols}.npy.gz")
    if not os.path.exists(gz_path):
        tmp = gz_path + ".tmp"
        from npystream.formats.npy import encode_header, read_header

        with open(path, "rb") as src, gzip.open(tmp, "wb", compresslevel=1) as dst:
            read_header(src)  # leaves src at the start of the data
            dst.write(encode_header("<f4", (gz_rows, cols)))
            left = gz_rows * cols * 4
            while left:
                chunk = src.read(min(left, 16 << 20))
                dst.write(chunk)
                left -= len(chunk)
        os.replace(tmp, gz_path)
    return path, gz_path


def warm(path: str) -> None:
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(64 << 20)
        while f.readinto(buf):
            pass


# -- workloads (run in a child) ------------------------------------------------


def run_workload(name: str, path: str, gz_path: str, batch_bytes: int) -> None:
    import npystream

    npystream.iter_batches  # noqa: B018 - resolve the lazy import before timing starts

    def block_rows(m: np.ndarray) -> int:
        return max(1, batch_bytes // (m.shape[1] * m.dtype.itemsize))

    nbytes = npystream.read_header(gz_path if name.startswith("gz_") else path).nbytes
    buf = np.zeros(batch_bytes, dtype=np.uint8)
    buf[:] = 1  # fault the reused destination in before the baseline is taken
    ram = None
    if name == "copyto_ram":
        ram = np.load(path)  # the whole file in RAM (anonymous): the source of a pure memcpy
    base = rss_anon_kib()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    with AnonPeak() as peak:
        total = 0.0
        if name == "iter_batches_copy":
            for b in npystream.iter_batches(path, batch_bytes=batch_bytes):
                dst = buf[: b.nbytes].view(b.dtype).reshape(b.shape)
                np.copyto(dst, b)
            del b  # the last view keeps the mapping alive: unmap inside the timing, like `del m`
        elif name == "np_load_mmap_copy":
            m = np.load(path, mmap_mode="r")
            step = block_rows(m)
            for i in range(0, m.shape[0], step):
                b = m[i : i + step]
                np.copyto(buf[: b.nbytes].view(b.dtype).reshape(b.shape), b)
            del m
        elif name == "copyto_ram":
            step = block_rows(ram)
            for i in range(0, ram.shape[0], step):
                b = ram[i : i + step]
                np.copyto(buf[: b.nbytes].view(b.dtype).reshape(b.shape), b)
        elif name == "iter_batches_sum":
            for b in npystream.iter_batches(path, batch_bytes=batch_bytes):
                total += float(b.sum(dtype=np.float64))
            del b  # as above
        elif name == "np_load_mmap_sum":
            m = np.load(path, mmap_mode="r")
            step = block_rows(m)
            for i in range(0, m.shape[0], step):
                total += float(m[i : i + step].sum(dtype=np.float64))
            del m
        elif name == "pipe_iter_batches_sum":
            with subprocess.Popen(["cat", path], stdout=subprocess.PIPE) as proc:
                for b in npystream.iter_batches(proc.stdout, batch_bytes=batch_bytes):
                    total += float(b.sum(dtype=np.float64))
        elif name == "pipe_np_load_bytesio_sum":
            # np.load cannot read a pipe (it seeks): the usual workaround reads it all first.
            import io

            with subprocess.Popen(["cat", path], stdout=subprocess.PIPE) as proc:
                a = np.load(io.BytesIO(proc.stdout.read()))
            step = block_rows(a)
            for i in range(0, a.shape[0], step):
                total += float(a[i : i + step].sum(dtype=np.float64))
            del a
        elif name == "gz_iter_batches_sum":
            for b in npystream.iter_batches(gz_path, batch_bytes=batch_bytes):
                total += float(b.sum(dtype=np.float64))
        elif name == "gz_np_load_sum":
            with gzip.open(gz_path, "rb") as g:
                a = np.load(g)
            step = block_rows(a)
            for i in range(0, a.shape[0], step):
                total += float(a[i : i + step].sum(dtype=np.float64))
            del a
        else:
            raise SystemExit(f"unknown workload {name}")
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    print(json.dumps({"name": name, "seconds": seconds, "cpu_seconds": cpu, "bytes": nbytes,
                      "anon_base_kib": base, "anon_peak_kib": peak.peak, "total": total}))


def child(name: str, path: str, gz_path: str, batch_bytes: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", name, "--path", path, "--gz-path", gz_path,
         "--batch-bytes", str(batch_bytes)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--gz-mib", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch-mib", type=float, default=8)
    ap.add_argument("--child")
    ap.add_argument("--path")
    ap.add_argument("--gz-path")
    ap.add_argument("--batch-bytes", type=int)
    args = ap.parse_args()
    if args.child:
        run_workload(args.child, args.path, args.gz_path, args.batch_bytes)
        return
    path, gz_path = make_data(args.size_gib, args.gz_mib)
    batch_bytes = int(args.batch_mib * (1 << 20))
    warm(path)
    warm(gz_path)
    groups = [
        ("copy each block into a reused buffer", ["iter_batches_copy", "np_load_mmap_copy", "copyto_ram"]),
        ("sum each block", ["iter_batches_sum", "np_load_mmap_sum"]),
        ("pipe (cat FILE |), sum each block", ["pipe_iter_batches_sum", "pipe_np_load_bytesio_sum"]),
        ("gzip .npy.gz, sum each block", ["gz_iter_batches_sum", "gz_np_load_sum"]),
    ]
    print(f"file: {path} ({os.path.getsize(path) / 2**30:.2f} GiB), "
          f"gzip: {gz_path} ({os.path.getsize(gz_path) / 2**20:.0f} MiB compressed), "
          f"blocks of {args.batch_mib:g} MiB, best of {args.reps}, page cache warm")
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, {os.cpu_count()} CPUs")
    for title, names in groups:
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for _ in range(args.reps):  # interleaved, so a busy moment does not hit one method only
            for name in names:
                runs[name].append(child(name, path, gz_path, batch_bytes))
        results = {}
        for name in names:
            best = min(runs[name], key=lambda r: r["seconds"])
            cpu = min(r["cpu_seconds"] for r in runs[name])
            results[name] = (best, cpu, max(r["anon_peak_kib"] - r["anon_base_kib"] for r in runs[name]))
        ref = results[names[0]][0]["seconds"]
        ref_cpu = results[names[0]][1]
        print(f"\n{title}")
        cols = ["method", "wall s", "GB/s", f"wall / {names[0]}", "CPU s", "CPU ratio",
                "peak anon MiB over start"]
        rows = []
        for name in names:
            best, cpu, peak = results[name]
            rows.append([name, f"{best['seconds']:.3f}", f"{best['bytes'] / best['seconds'] / 1e9:.2f}",
                         f"{best['seconds'] / ref:.2f}", f"{cpu:.3f}", f"{cpu / ref_cpu:.2f}",
                         f"{peak / 1024:.1f}"])
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |")
        print("|" + "|".join("-" * (w + 1) + ":" if i else "-" * (w + 2) for i, w in enumerate(widths)) + "|")
        for r in rows:
            print("| " + " | ".join(v.ljust(w) if i == 0 else v.rjust(w)
                                     for i, (v, w) in enumerate(zip(r, widths))) + " |")


if __name__ == "__main__":
    main()
