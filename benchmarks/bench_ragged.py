"""Ragged store vs its peers: write from a generator, random reads, sequential pass, reduceat.

All peers run in one process, one after another, on the same seeded data
(default: 200,000 float32 arrays of 10-2,000 items, 766 MiB), page cache warm:

* ``npystream``  - ``save_ragged(..., durable=False)`` / ``RaggedArray``
  (and a write-only row with ``durable=True``: fsync at every commit)
* ``list``       - an in-memory Python list of arrays (reads only)
* ``pyarrow``    - IPC file of one ``large_list<float32>`` column written with
  ``ipc.new_file``; read with ``pa.memory_map`` + ``ipc.open_file`` as numpy
  views of each batch's offsets/values, ``searchsorted`` over batch starts
* ``npy-append-array`` - two ``.npy`` files (values + offsets) appended in
  batches, read back with ``np.load(mmap_mode='r')``
* ``mmap_ninja`` - ``RaggedMmap.from_generator`` / ``RaggedMmap``
* ``h5py``       - a vlen float32 dataset (``--h5py``; slow, fewer reads)

Timings are the best of ``--repeat`` runs; peak memory is the peak of
``RssAnon`` (sampled every 2 ms from /proc/self/status) above the level
before the write.  Run::

    python benchmarks/bench_ragged.py            # full size, ~1-2 minutes
    python benchmarks/bench_ragged.py --n 20000  # quick
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from benchdata import DATA as _DATA

DATA = str(_DATA)


# --------------------------------------------------------------------------- helpers


def rss_anon() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakAnon:
    """Sample RssAnon in a thread; ``peak`` is the maximum above the starting level."""

    def __enter__(self) -> PeakAnon:
        gc.collect()
        self.base = rss_anon()
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon() - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_anon() - self.base)


def best(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def make_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded source data in DATA (made once): flat float32 values and int64 offsets."""
    os.makedirs(DATA, exist_ok=True)
    vpath = os.path.join(DATA, f"ragged_src_{n}_{seed}_values.npy")
    opath = os.path.join(DATA, f"ragged_src_{n}_{seed}_offsets.npy")
    if not (os.path.exists(vpath) and os.path.exists(opath)):
        rng = np.random.default_rng(seed)
        lens = rng.integers(10, 2001, size=n)
        offs = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        vals = np.lib.format.open_memmap(vpath + ".tmp.npy", mode="w+", dtype="<f4",
                                         shape=(int(offs[-1]),))
        step = 1 << 24
        for lo in range(0, len(vals), step):
            vals[lo : lo + step] = rng.random(min(step, len(vals) - lo), dtype=np.float32)
        vals.flush()
        del vals
        os.replace(vpath + ".tmp.npy", vpath)
        np.save(opath, offs)
    vals = np.asarray(np.load(vpath, mmap_mode="r"))
    offs = np.load(opath)
    vals.sum()  # warm the page cache
    return vals, offs


def source(vals: np.ndarray, offs: np.ndarray) -> Iterator[np.ndarray]:
    """The generator every writer consumes: zero-copy views of the (cached) source."""
    bounds = offs.tolist()
    for i in range(len(bounds) - 1):
        yield vals[bounds[i] : bounds[i + 1]]


def batched(it: Iterator[np.ndarray], k: int) -> Iterator[list[np.ndarray]]:
    chunk: list[np.ndarray] = []
    for x in it:
        chunk.append(x)
        if len(chunk) == k:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def fresh(path: str) -> str:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)
    return path


# --------------------------------------------------------------------------- peers
# Each peer: write(gen, path) and open(path) -> (get(i) -> ndarray, iterate() -> iterator)


def np_write(gen: Iterator[np.ndarray], path: str) -> None:
    from npystream import save_ragged

    save_ragged(path, gen, durable=False)


def np_write_durable(gen: Iterator[np.ndarray], path: str) -> None:
    from npystream import save_ragged

    save_ragged(path, gen, durable=True)


def np_open(path: str) -> tuple[Callable[[int], np.ndarray], Callable[[], Iterator[np.ndarray]]]:
    from npystream import RaggedArray

    r = RaggedArray(path)
    return r.__getitem__, r.__iter__


def pa_write(gen: Iterator[np.ndarray], path: str) -> None:
    import pyarrow as pa

    schema = pa.schema([("x", pa.large_list(pa.float32()))])
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, schema) as w:
        for chunk in batched(gen, 10000):
            lens = np.fromiter((len(c) for c in chunk), dtype=np.int64, count=len(chunk))
            offs = np.zeros(len(chunk) + 1, dtype=np.int64)
            np.cumsum(lens, out=offs[1:])
            arr = pa.LargeListArray.from_arrays(pa.array(offs), pa.array(np.concatenate(chunk)))
            w.write_batch(pa.record_batch([arr], schema=schema))


def pa_open(path: str) -> tuple[Callable[[int], np.ndarray], Callable[[], Iterator[np.ndarray]]]:
    import pyarrow as pa

    reader = pa.ipc.open_file(pa.memory_map(path, "r"))
    offs_l, vals_l, starts = [], [], [0]
    for b in range(reader.num_record_batches):
        col = reader.get_batch(b).column(0)
        offs_l.append(col.offsets.to_numpy())
        vals_l.append(col.values.to_numpy(zero_copy_only=True))
        starts.append(starts[-1] + len(col))
    starts_np = np.array(starts[:-1])

    def get(i: int) -> np.ndarray:
        b = int(np.searchsorted(starts_np, i, "right")) - 1
        j = i - starts[b]
        o = offs_l[b]
        return vals_l[b][o[j] : o[j + 1]]

    def iterate() -> Iterator[np.ndarray]:
        for o, v in zip(offs_l, vals_l):
            bounds = o.tolist()
            for j in range(len(bounds) - 1):
                yield v[bounds[j] : bounds[j + 1]]

    return get, iterate


def naa_write(gen: Iterator[np.ndarray], path: str) -> None:
    from npy_append_array import NpyAppendArray

    os.makedirs(path)
    end = 0
    with NpyAppendArray(os.path.join(path, "values.npy")) as fv, \
            NpyAppendArray(os.path.join(path, "offsets.npy")) as fo:
        fo.append(np.zeros(1, dtype=np.int64))
        for chunk in batched(gen, 10000):
            lens = np.fromiter((len(c) for c in chunk), dtype=np.int64, count=len(chunk))
            fv.append(np.concatenate(chunk))
            fo.append(np.cumsum(lens) + end)
            end += int(lens.sum())


def naa_open(path: str) -> tuple[Callable[[int], np.ndarray], Callable[[], Iterator[np.ndarray]]]:
    vals = np.load(os.path.join(path, "values.npy"), mmap_mode="r")
    offs = np.load(os.path.join(path, "offsets.npy"), mmap_mode="r")

    def get(i: int) -> np.ndarray:
        return vals[offs[i] : offs[i + 1]]

    def iterate() -> Iterator[np.ndarray]:
        bounds = offs.tolist()
        for j in range(len(bounds) - 1):
            yield vals[bounds[j] : bounds[j + 1]]

    return get, iterate


def ninja_write(gen: Iterator[np.ndarray], path: str) -> None:
    from mmap_ninja.ragged import RaggedMmap

    RaggedMmap.from_generator(out_dir=path, sample_generator=gen, batch_size=10000, verbose=False)


def ninja_open(path: str) -> tuple[Callable[[int], np.ndarray], Callable[[], Iterator[np.ndarray]]]:
    from mmap_ninja.ragged import RaggedMmap

    r = RaggedMmap(path)

    def iterate() -> Iterator[np.ndarray]:
        for j in range(len(r)):
            yield r[j]

    return r.__getitem__, iterate


def h5_write(gen: Iterator[np.ndarray], path: str) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        ds = None
        pos = 0
        for chunk in batched(gen, 10000):
            if ds is None:
                ds = f.create_dataset("x", shape=(0,), maxshape=(None,),
                                      dtype=h5py.vlen_dtype(np.float32), chunks=(10000,))
            ds.resize((pos + len(chunk),))
            arr = np.empty(len(chunk), dtype=object)
            arr[:] = chunk
            ds[pos : pos + len(chunk)] = arr
            pos += len(chunk)


def h5_open(path: str) -> tuple[Callable[[int], np.ndarray], Callable[[], Iterator[np.ndarray]]]:
    import h5py

    ds = h5py.File(path, "r")["x"]

    def iterate() -> Iterator[np.ndarray]:
        for j in range(len(ds)):
            yield ds[j]

    return ds.__getitem__, iterate


PEERS: dict[str, tuple[Callable[..., None], Callable[..., Any], str]] = {
    "npystream": (np_write, np_open, "x.ragged"),
    "npystream durable=True": (np_write_durable, np_open, "x-durable.ragged"),
    "pyarrow": (pa_write, pa_open, "x.arrow"),
    "npy-append-array": (naa_write, naa_open, "x.naa"),
    "mmap_ninja": (ninja_write, ninja_open, "x.ninja"),
    "h5py": (h5_write, h5_open, "x.h5"),
}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200_000, help="number of arrays")
    ap.add_argument("--reads", type=int, default=100_000, help="random reads per peer")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--h5py", action="store_true", help="also run h5py (slow: 1/20 of the reads)")
    ap.add_argument("--peers", default="", help="comma-separated subset of peers")
    args = ap.parse_args(argv)

    vals, offs = make_data(args.n, args.seed)
    n = len(offs) - 1
    mib = vals.nbytes / 2**20
    print(f"data: {n} float32 arrays of 10-2000 items, {mib:.0f} MiB; python {sys.version.split()[0]}, "
          f"numpy {np.__version__}")
    idx = np.random.default_rng(args.seed + 1).integers(0, n, size=args.reads).tolist()
    work = os.path.join(DATA, "bench_ragged")
    os.makedirs(work, exist_ok=True)
    peers = [p for p in PEERS if p != "h5py" or args.h5py]
    if args.peers:
        peers = [p for p in args.peers.split(",")]
    rows: dict[str, dict[str, float]] = {}

    # the in-memory list: reads only
    lst = [np.array(vals[a:b]) for a, b in zip(offs[:-1].tolist(), offs[1:].tolist())]
    rows["list (in memory)"] = row = {}
    row["random"] = best(lambda lst=lst: [lst[i].sum() for i in idx], args.repeat) / len(idx)
    row["seq"] = best(lambda lst=lst: [x.sum() for x in lst], args.repeat)
    del lst
    flat = np.array(vals)
    starts = offs[:-1]
    row["reduceat"] = best(lambda flat=flat: np.add.reduceat(flat, starts), args.repeat)
    del flat
    gc.collect()

    for name in peers:
        write, open_, fname = PEERS[name]
        path = fresh(os.path.join(work, fname))
        with PeakAnon() as mem:
            t0 = time.perf_counter()
            write(source(vals, offs), path)
            t_write = time.perf_counter() - t0
        get, iterate = open_(path)
        # correctness spot check against the source
        for i in idx[:200]:
            if not np.array_equal(np.asarray(get(i)), vals[offs[i] : offs[i + 1]]):
                raise SystemExit(f"{name}: element {i} differs from the source")
        reads = idx if name != "h5py" else idx[: max(1, len(idx) // 20)]
        rows[name] = row = {"write": t_write, "mem": mem.peak}
        if name == "npystream durable=True":  # same reader as npystream: write only
            print(f"  {name}: done", flush=True)
            continue
        row["random"] = best(lambda get=get, reads=reads: [get(i).sum() for i in reads],
                             args.repeat) / len(reads)
        row["seq"] = best(lambda iterate=iterate: [x.sum() for x in iterate()],
                          1 if name == "h5py" else args.repeat)
        if name == "npystream":
            from npystream import RaggedArray

            r = RaggedArray(path)

            def reduce_all(r: Any = r) -> None:
                for v, o in r.iter_batches(65536):
                    np.add.reduceat(v, o[:-1])

            row["reduceat"] = best(reduce_all, args.repeat)
        print(f"  {name}: done", flush=True)

    def fmt(v: float | None, unit: str) -> str:
        if v is None:
            return "-"
        if unit == "us":
            return f"{v * 1e6:.2f}"
        if unit == "s":
            return f"{v:.3f}"
        return f"{v / 2**20:.1f}"

    def ratio(name: str, key: str, peer: str) -> str:
        a = rows.get(name, {}).get(key)
        b = rows.get(peer, {}).get(key)
        return f"{a / b:.2f}x" if a and b else "-"

    print()
    print("| peer | write s | peak anon MiB | random read+sum µs | sequential pass s |")
    print("|---|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {fmt(row.get('write'), 's')} | {fmt(row.get('mem'), 'MiB')} | "
              f"{fmt(row.get('random'), 'us')} | {fmt(row.get('seq'), 's')} |")
    print()
    print("npystream ratios (lower is better):")
    for peer in ("pyarrow", "mmap_ninja", "npy-append-array", "list (in memory)", "h5py"):
        if peer in rows and "npystream" in rows:
            print(f"  vs {peer}: write {ratio('npystream', 'write', peer)}, "
                  f"random read {ratio('npystream', 'random', peer)}, "
                  f"sequential {ratio('npystream', 'seq', peer)}")
    if "npystream" in rows:
        a = rows["npystream"]["reduceat"]
        b = rows["list (in memory)"]["reduceat"]
        print(f"  iter_batches+reduceat {a:.3f} s vs reduceat on an in-memory flat array "
              f"{b:.3f} s: {a / b:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
