"""Whether to use the C accelerator: ``npystream._speedups`` if built, unless ``NPYSTREAM_PURE_PYTHON`` is set."""

from __future__ import annotations

import os
from typing import Any


def speedups() -> Any:
    """The ``npystream._speedups`` module, or None (not built, or the pure-Python fallback asked for)."""
    if os.environ.get("NPYSTREAM_PURE_PYTHON", "").strip() not in ("", "0"):
        return None
    try:
        from npystream import _speedups  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _speedups
