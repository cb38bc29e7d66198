"""npystream: stream, memory-map and convert NumPy files that ``np.load`` cannot open.

Public names are resolved lazily (``npystream.open`` imports only what it needs).
"""

from __future__ import annotations

import importlib
from typing import Any

from npystream.errors import (
    CastError,
    FormatError,
    NotSeekableError,
    NpyStreamError,
    ShapeError,
    StateMismatchError,
    StoreNotFoundError,
    TruncatedError,
    UnsafePickleError,
    UnsupportedError,
)

__version__ = "0.1.0"

# name -> module that defines it; imported on first attribute access.
_EXPORTS: dict[str, str] = {
    "open": "npystream.api",
    "read_header": "npystream.formats.npy",
    "NpyHeader": "npystream.formats.npy",
    "iter_batches": "npystream.formats.fixed",
    "NpzArchive": "npystream.archive",
    "iter_objects": "npystream.objects",
    "ObjectArray": "npystream.object_array",
    "RaggedArray": "npystream.formats.ragged",
    "RaggedWriter": "npystream.formats.ragged",
    "save_ragged": "npystream.formats.ragged",
    "save_objects": "npystream.formats.objwriter",
    "convert": "npystream.conversion",
    "verify": "npystream.verification",
    "lazy": "npystream.deferred",
    "LazyArray": "npystream.deferred",
    "save_npy": "npystream.deferred",
    "create_npy": "npystream.formats.fixed",
    "append_npy": "npystream.formats.fixed",
    "concat": "npystream.concatenation",
    "ConcatArray": "npystream.concatenation",
    "batches": "npystream.loader",
    "BatchLoader": "npystream.loader",
    "to_dask": "npystream.dask",
}

__all__ = [
    "CastError",
    "FormatError",
    "NotSeekableError",
    "NpyStreamError",
    "ShapeError",
    "StateMismatchError",
    "StoreNotFoundError",
    "TruncatedError",
    "UnsafePickleError",
    "UnsupportedError",
    "__version__",
    *_EXPORTS,
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'npystream' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
