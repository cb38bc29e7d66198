"""What the benchmarks share: where their data lives, and peak anonymous memory.

Data: ``$NPYSTREAM_BENCHDATA`` if set, else ``$XDG_CACHE_HOME/npystream-bench``
(``~/.cache/npystream-bench``), outside the repository; the scripts that take ``--dir``
default to it too.  Files are made once and reused.

Memory: :class:`AnonPeak` samples RssAnon (anonymous memory; mapped file pages do not
count) in a thread, which is what "peak memory" means in every table.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path


def data_dir() -> Path:
    """The benchmark data directory (not created here)."""
    env = os.environ.get("NPYSTREAM_BENCHDATA")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "npystream-bench"


DATA = data_dir()


def rss_anon_kib() -> int:
    """This process's anonymous resident memory now, in KiB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


class AnonPeak:
    """Sample RssAnon in a thread; ``peak`` is the maximum seen, in KiB."""

    def __init__(self, every: float = 0.002) -> None:
        self.every = every
        self.peak = rss_anon_kib()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon_kib())
            time.sleep(self.every)

    def __enter__(self) -> AnonPeak:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_anon_kib())
