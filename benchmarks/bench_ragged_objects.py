"""Benchmark: reading the elements of a ragged store of kind "object" (small dicts).

Every element is checked by the ``.npy`` reader's scanner before the safe
unpickler loads it (``pickle_walk.load_pickle``); this measures what that
costs per element.  The store (50,000 elements, a few MB) is written to a
temporary directory and deleted at the end.  Usage::

    python benchmarks/bench_ragged_objects.py [--count 50000] [--repeat 3]

Run it once per code path (``NPYSTREAM_PURE_PYTHON=1`` for the fallback).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import npystream
from npystream.formats.ragged import save_ragged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="npystream-bench-") as d:
        path = os.path.join(d, "objects.ragged")
        save_ragged(path, [{"k": i, "v": [i, str(i)]} for i in range(args.count)], kind="object")
        store = npystream.open(path)
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            n = sum(1 for _ in store)
            best = min(best, time.perf_counter() - t0)
        load = os.getloadavg()[0]
        print(f"{n} small object elements: best {best:.2f} s, {best / n * 1e6:.1f} us/element "
              f"(load average {load:.1f})")


if __name__ == "__main__":
    main()
