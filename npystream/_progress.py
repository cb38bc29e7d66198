"""A byte-counting progress bar on stderr (tqdm, imported only when shown) for block writers."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["ByteProgress"]


class ByteProgress:
    """``add(nbytes)`` per block; a no-op unless ``show``.  ``close()`` always."""

    def __init__(self, total: int | None, show: bool, desc: str) -> None:
        self.bar: Any = None
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                            desc=desc, dynamic_ncols=True, mininterval=0.25, leave=True)

    def add(self, nbytes: int) -> None:
        if self.bar is not None:
            self.bar.update(nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
