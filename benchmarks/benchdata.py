"""Where the benchmarks keep the data they generate: one directory, outside the repository.

``$NPYSTREAM_BENCHDATA`` if set, else ``$XDG_CACHE_HOME/npystream-bench`` (``~/.cache/npystream-bench``).
The scripts that take ``--dir`` default to it too.  Files are made once and reused.
"""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """The benchmark data directory (not created here)."""
    env = os.environ.get("NPYSTREAM_BENCHDATA")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "npystream-bench"


DATA = data_dir()
