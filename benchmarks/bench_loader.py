"""Training-loop batches: ``npystream.batches`` vs what training scripts usually do.

One epoch of shuffled, padded batches of 64 from 200,000 int32 sequences of
16-1,024 tokens (~400 MB; seeded), page cache warm.  Each contender runs in
its own fresh process (``--run NAME``), so one's imports and data never count
against another's memory:

* ``inmem``           - the baseline: every sequence loaded into a Python list of
  arrays (load time reported apart), ``np.random.permutation``, a Python pad loop
* ``dataloader-0/2``  - ``torch.utils.data.DataLoader`` over a map-style dataset
  of that list, ``shuffle=True``, a numpy padding ``collate_fn``, 0 / 2 workers
* ``hf-datasets``     - Hugging Face ``datasets``: the store saved as an Arrow
  dataset (``save_to_disk``, memory-mapped by ``load_from_disk``),
  ``.shuffle(seed)``, ``with_format("numpy")``, ``.iter(64)``, a Python pad loop
* ``npystream``       - ``npystream.batches(store, 64, shuffle=True)`` (and with
  ``prefetch=2``; ``npystream-pure``: the pure-Python/numpy gather,
  ``NPYSTREAM_PURE_PYTHON=1``)
* ``npystream-torch-0/2`` - ``DataLoader(npystream.torch.BatchDataset(...),
  batch_size=None, num_workers=0/2)``

Throughput is samples (sequences) per second over the epoch, best of
``--repeat`` epochs per process and of ``--rounds`` rounds that run every
contender once each (interleaved, so swings of the machine's load hit all); CPU is user + system seconds of the process and its
DataLoader workers for the epoch (less sensitive to other jobs on the machine).  Memory is the peak of anonymous memory sampled every
5 ms during the epoch: ``RssAnon`` of the main process, and ``Pss_Anon`` summed
over the main process and its DataLoader workers every 50 ms (shared
copy-on-write pages counted once; read only when there are workers, since
reading ``smaps_rollup`` costs CPU in proportion to the memory mapped).  Padding efficiency (real tokens / padded tokens) is measured
with and without ``bucket=100``.  ``--plot docs/loader_bench.png`` draws the
bar chart the README shows.  Data lives in ``--dir`` (default
``~/.cache/npystream-bench/loader``)::

    python benchmarks/bench_loader.py                 # ~5-10 minutes on a busy 2-core VM
    python benchmarks/bench_loader.py --n 20000       # quick
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

BATCH = 64
CONTENDERS = ["inmem", "dataloader-0", "dataloader-2", "hf-datasets", "npystream",
              "npystream-pure", "npystream-prefetch", "npystream-torch-0", "npystream-torch-2"]


# --------------------------------------------------------------------------- memory


def _status_field(pid: int | str, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _pss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss_Anon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(x) for x in fh.read().split()]
    except OSError:
        return []


class Peak:
    """Sample main RssAnon and the process tree's Pss_Anon in a thread; keep the peaks."""

    def __enter__(self) -> Peak:
        gc.collect()
        self.rss = self.tree = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _sample(self, tree: bool = True) -> None:
        me = os.getpid()
        self.rss = max(self.rss, _status_field("self", "RssAnon:"))
        kids = _children(me)
        if not kids:  # one process: Pss_Anon == RssAnon, and smaps_rollup costs CPU in proportion to RSS
            self.tree = max(self.tree, self.rss)
        elif tree:
            self.tree = max(self.tree, _pss_anon(me) + sum(_pss_anon(c) for c in kids))

    def _run(self) -> None:
        k = 0
        while not self._stop.is_set():
            self._sample(tree=k % 10 == 0)  # the costly tree walk every 50 ms, RssAnon every 5 ms
            k += 1
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self._sample()


# --------------------------------------------------------------------------- data


def store_path(d: str, n: int) -> str:
    return os.path.join(d, f"tokens-{n}.ragged")


def make_store(d: str, n: int, seed: int) -> str:
    import npystream

    path = store_path(d, n)
    if os.path.isdir(path):
        try:
            if len(npystream.RaggedArray(path)) == n:
                return path
        except npystream.NpyStreamError:
            pass
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(16, 1025, n)

    def gen() -> Any:
        for i, k in enumerate(lengths.tolist()):
            yield np.arange(i, i + k, dtype=np.int32) % 50_000

    npystream.save_ragged(path, gen(), mode="w", durable=False)
    return path


def load_list(path: str) -> list[np.ndarray]:
    import npystream

    return [np.array(x) for x in npystream.RaggedArray(path)]


def pad_loop(seqs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """What training scripts write: a zero buffer, one slice assignment per sequence."""
    lengths = np.array([len(s) for s in seqs])
    out = np.zeros((len(seqs), int(lengths.max())), dtype=np.int32)
    for j, s in enumerate(seqs):
        out[j, : len(s)] = s
    return out, lengths


# --------------------------------------------------------------------------- contenders


def run_inmem(path: str, seed: int) -> tuple[Any, float]:
    t0 = time.perf_counter()
    data = load_list(path)
    load_s = time.perf_counter() - t0

    def epoch(e: int) -> int:
        perm = np.random.default_rng([seed, e]).permutation(len(data))
        k = 0
        for lo in range(0, len(perm), BATCH):
            values, lengths = pad_loop([data[i] for i in perm[lo : lo + BATCH]])
            k += len(lengths)
        return k

    return epoch, load_s


class ListDataset:
    def __init__(self, data: list[np.ndarray]) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.data[i]


def pad_collate(seqs: list[np.ndarray]) -> dict[str, Any]:
    import torch

    values, lengths = pad_loop(seqs)
    return {"values": torch.from_numpy(values), "lengths": torch.from_numpy(lengths)}


def run_dataloader(path: str, seed: int, workers: int) -> tuple[Any, float]:
    import torch
    from torch.utils.data import DataLoader

    t0 = time.perf_counter()
    data = load_list(path)
    load_s = time.perf_counter() - t0
    ds = ListDataset(data)

    def epoch(e: int) -> int:
        g = torch.Generator()
        g.manual_seed(seed * 1000 + e)
        dl = DataLoader(ds, batch_size=BATCH, shuffle=True, collate_fn=pad_collate,
                        num_workers=workers, generator=g)
        return sum(len(b["lengths"]) for b in dl)

    return epoch, load_s


def run_hf(path: str, seed: int, d: str) -> tuple[Any, float]:
    import datasets
    import pyarrow as pa

    import npystream

    r = npystream.RaggedArray(path)
    arrow_dir = os.path.join(d, f"hf-{len(r)}")
    if not os.path.isdir(arrow_dir):
        offsets = pa.array(np.asarray(r.offsets))
        col = pa.LargeListArray.from_arrays(offsets, pa.array(np.asarray(r.values)))
        datasets.Dataset(pa.table({"tokens": col})).save_to_disk(arrow_dir)
    t0 = time.perf_counter()
    base = datasets.load_from_disk(arrow_dir)
    load_s = time.perf_counter() - t0

    def epoch(e: int) -> int:
        ds = base.shuffle(seed=seed * 1000 + e).with_format("numpy")
        k = 0
        for batch in ds.iter(batch_size=BATCH):
            values, lengths = pad_loop(list(batch["tokens"]))
            k += len(lengths)
        return k

    return epoch, load_s


def run_npystream(path: str, seed: int, prefetch: int = 0) -> tuple[Any, float]:
    import npystream

    t0 = time.perf_counter()
    loader = npystream.batches(path, BATCH, shuffle=True, seed=seed, prefetch=prefetch)
    load_s = time.perf_counter() - t0

    def epoch(e: int) -> int:
        loader.set_epoch(e)
        return sum(len(b["lengths"]) for b in loader)

    return epoch, load_s


def run_npystream_torch(path: str, seed: int, workers: int) -> tuple[Any, float]:
    from torch.utils.data import DataLoader

    from npystream.torch import BatchDataset

    t0 = time.perf_counter()
    ds = BatchDataset(path, BATCH, shuffle=True, seed=seed)
    load_s = time.perf_counter() - t0

    def epoch(e: int) -> int:
        ds.set_epoch(e)
        return sum(len(b["lengths"]) for b in DataLoader(ds, batch_size=None, num_workers=workers))

    return epoch, load_s


def run_one(name: str, path: str, seed: int, repeat: int, d: str) -> dict[str, Any]:
    if name == "inmem":
        epoch, load_s = run_inmem(path, seed)
    elif name.startswith("dataloader-"):
        epoch, load_s = run_dataloader(path, seed, int(name.rsplit("-", 1)[1]))
    elif name == "hf-datasets":
        epoch, load_s = run_hf(path, seed, d)
    elif name == "npystream":
        epoch, load_s = run_npystream(path, seed)
    elif name == "npystream-pure":  # the numpy twin of the C gather
        os.environ["NPYSTREAM_PURE_PYTHON"] = "1"
        epoch, load_s = run_npystream(path, seed)
    elif name == "npystream-prefetch":
        epoch, load_s = run_npystream(path, seed, prefetch=2)
    elif name.startswith("npystream-torch-"):
        epoch, load_s = run_npystream_torch(path, seed, int(name.rsplit("-", 1)[1]))
    else:
        raise SystemExit(f"unknown contender {name!r}")
    times = []
    cpus = []
    samples = 0
    with Peak() as peak:
        for e in range(repeat):
            c0 = cpu_seconds()
            t0 = time.perf_counter()
            samples = epoch(e)
            times.append(time.perf_counter() - t0)
            cpus.append(cpu_seconds() - c0)
    return {"name": name, "samples": samples, "epoch_s": min(times), "load_s": load_s,
            "samples_per_s": samples / min(times), "cpu_s": min(cpus),
            "rss_anon_mb": peak.rss / 2**20, "tree_pss_anon_mb": peak.tree / 2**20}


def cpu_seconds() -> float:
    """User + system CPU of this process and its finished children (DataLoader workers)."""
    import resource

    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def padding_efficiency(path: str, seed: int) -> dict[str, float]:
    import npystream

    out = {}
    for label, bucket in (("no bucket", None), ("bucket=100", 100)):
        loader = npystream.batches(path, BATCH, shuffle=True, seed=seed, bucket=bucket)
        real = padded = 0
        t0 = time.perf_counter()
        for b in loader:
            real += int(b["lengths"].sum())
            padded += b["values"].size
        out[label] = real / padded
        out[label + " s"] = time.perf_counter() - t0
    return out


def resume_latency(path: str, seed: int) -> float:
    """Seconds for a new loader + load_state_dict + first batch, mid-epoch."""
    import npystream

    state = npystream.batches(path, BATCH, shuffle=True, seed=seed).state_dict()
    state.update(epoch=3, batch=1000)
    t0 = time.perf_counter()
    loader = npystream.batches(path, BATCH, shuffle=True, seed=seed)
    loader.load_state_dict(state)
    next(iter(loader))
    return time.perf_counter() - t0


def plot(results: list[dict[str, Any]], eff: dict[str, float], out: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 1]})
    names = [r["name"] for r in results]
    rates = [r["samples_per_s"] / 1000 for r in results]
    colors = ["#1f77b4" if n.startswith("npystream") else "#999999" for n in names]
    ax.barh(names[::-1], rates[::-1], color=colors[::-1])
    for y, (rate, r) in enumerate(zip(rates[::-1], results[::-1])):
        ax.text(rate, y, f" {rate:.0f}k/s, CPU {r['cpu_s']:.2f} s, {r['tree_pss_anon_mb']:.0f} MB",
                va="center", fontsize=8)
    ax.set_xlabel("thousand samples / s (one shuffled, padded epoch; higher is better)")
    ax.set_xlim(0, max(rates) * 1.6)
    ax.set_title(title, fontsize=9)
    labels = ["no bucket", "bucket=100"]
    ax2.bar(labels, [eff[k] * 100 for k in labels], color=["#999999", "#1f77b4"])
    ax2.set_ylim(0, 112)
    ax2.set_ylabel("real tokens / padded tokens (%)")
    for x, k in enumerate(labels):
        ax2.text(x, eff[k] * 100 + 1, f"{eff[k] * 100:.0f}%", ha="center", fontsize=9)
    ax2.set_title("padding efficiency", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200_000, help="number of sequences")
    ap.add_argument("--repeat", type=int, default=2, help="epochs per process (the best counts)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over all contenders (best counts)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=os.path.expanduser("~/.cache/npystream-bench/loader"))
    ap.add_argument("--only", default="", help="comma-separated subset of contenders")
    ap.add_argument("--plot", default="", help="write the bar chart to this PNG")
    ap.add_argument("--json", default="", help="write the results to this JSON file")
    ap.add_argument("--clean", action="store_true", help="delete --dir afterwards")
    ap.add_argument("--run", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    path = store_path(args.dir, args.n)
    if args.run:
        print(json.dumps(run_one(args.run, path, args.seed, args.repeat, args.dir)))
        return 0
    t0 = time.perf_counter()
    make_store(args.dir, args.n, args.seed)
    print(f"store: {path} ({sum(e.stat().st_size for e in os.scandir(path)) / 2**20:.0f} MiB, "
          f"made/checked in {time.perf_counter() - t0:.1f} s)", flush=True)
    names = [x for x in args.only.split(",") if x] or CONTENDERS
    runs: dict[str, list[dict[str, Any]]] = {}
    for rnd in range(args.rounds):  # rounds interleave the contenders: load swings hit them all
        print(f"round {rnd + 1}/{args.rounds} (load average {os.getloadavg()[0]:.1f})", flush=True)
        for name in names:
            cmd = [sys.executable, os.path.abspath(__file__), "--run", name, "--n", str(args.n),
                   "--repeat", str(args.repeat), "--seed", str(args.seed), "--dir", args.dir]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                print(f"  {name:20s} skipped: {tail}", flush=True)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            runs.setdefault(name, []).append(r)
            print(f"  {name:20s} {r['samples_per_s']:>10,.0f} samples/s  epoch {r['epoch_s']:6.2f} s  "
                  f"CPU {r['cpu_s']:6.2f} s  load {r['load_s']:6.2f} s  "
                  f"RssAnon {r['rss_anon_mb']:6.0f} MB  tree Pss_Anon {r['tree_pss_anon_mb']:6.0f} MB",
                  flush=True)
    results = []
    print(f"best of {args.rounds} round(s) (samples/s: fastest round; CPU: least; memory: largest):")
    for name, rs in runs.items():
        best_run = max(rs, key=lambda r: r["samples_per_s"])
        r = {**best_run, "cpu_s": min(x["cpu_s"] for x in rs),
             "rss_anon_mb": max(x["rss_anon_mb"] for x in rs),
             "tree_pss_anon_mb": max(x["tree_pss_anon_mb"] for x in rs),
             "all_samples_per_s": [x["samples_per_s"] for x in rs]}
        results.append(r)
        print(f"  {name:20s} {r['samples_per_s']:>10,.0f} samples/s  CPU {r['cpu_s']:6.2f} s  "
              f"RssAnon {r['rss_anon_mb']:6.0f} MB  tree Pss_Anon {r['tree_pss_anon_mb']:6.0f} MB  "
              f"(rounds: {', '.join(f'{x:,.0f}' for x in r['all_samples_per_s'])})", flush=True)
    eff = padding_efficiency(path, args.seed)
    print(f"padding efficiency: no bucket {eff['no bucket']:.1%}, bucket=100 {eff['bucket=100']:.1%}")
    lat = resume_latency(path, args.seed)
    print(f"new loader + load_state_dict + first batch: {lat * 1000:.1f} ms")
    load = os.getloadavg()
    print(f"load average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    by = {r["name"]: r["samples_per_s"] for r in results}
    for ours, theirs in (("npystream", "inmem"), ("npystream-torch-2", "dataloader-2"),
                         ("npystream-torch-0", "dataloader-0")):
        if ours in by and theirs in by:
            cpu = {r["name"]: r["cpu_s"] for r in results}
            print(f"{ours} / {theirs}: {by[ours] / by[theirs]:.2f}x samples/s, "
                  f"{cpu[theirs] / cpu[ours]:.2f}x less CPU per epoch")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"results": results, "padding": eff, "resume_s": lat, "loadavg": load,
                       "n": args.n}, fh, indent=1)
    if args.plot and results:
        plot(results, eff, args.plot,
             f"{args.n:,} int32 sequences of 16-1,024 tokens, batches of {BATCH} "
             f"(load average {load[0]:.1f})")
    if args.clean:
        shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
