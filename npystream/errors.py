"""The exception hierarchy shared by every layer of npystream.

One root, :class:`NpyStreamError`; every concrete error also subclasses the
built-in exception users already catch (``ValueError``, ``EOFError``,
``FileNotFoundError``...).  Messages say what, where (file, byte offset,
element index), what was found versus expected, and how to fix it.
"""

from __future__ import annotations

import os
import pickle

__all__ = [
    "NpyStreamError",
    "FormatError",
    "TruncatedError",
    "UnsafePickleError",
    "NotSeekableError",
    "UnsupportedError",
    "StoreNotFoundError",
    "CastError",
    "ShapeError",
    "StateMismatchError",
]


def _where(path: object, offset: int | None, index: int | None) -> str:
    parts = []
    if path is not None:
        parts.append(str(os.fspath(path)) if isinstance(path, os.PathLike) else str(path))
    if offset is not None:
        parts.append(f"at byte {offset}")
    if index is not None:
        parts.append(f"element {index}")
    return ", ".join(parts)


class NpyStreamError(Exception):
    """Root of every error npystream raises on purpose.

    Carries ``path``, ``offset`` (byte offset in the file) and ``index``
    (element index) when known; ``str(err)`` renders them before the message.
    """

    def __init__(
        self,
        message: str,
        *,
        path: object = None,
        offset: int | None = None,
        index: int | None = None,
    ) -> None:
        self.message = message
        self.path = path
        self.offset = offset
        self.index = index
        where = _where(path, offset, index)
        super().__init__(f"{where}: {message}" if where else message)

    def __reduce__(self) -> tuple[object, ...]:
        """Pickle with ``path``/``offset``/``index`` (errors cross process boundaries: Dask workers, pools)."""
        return (_rebuild, (type(self), self.message, self.path, self.offset, self.index), self.__dict__)


def _rebuild(cls: type, message: str, path: object, offset: int | None, index: int | None) -> NpyStreamError:
    """Unpickling target of :meth:`NpyStreamError.__reduce__`."""
    return cls(message, path=path, offset=offset, index=index)


class FormatError(NpyStreamError, ValueError):
    """The bytes do not follow the format they claim (bad header, bad pickle, bad store)."""


class TruncatedError(FormatError, EOFError):
    """The data ends before the format says it should."""


class UnsafePickleError(NpyStreamError, pickle.UnpicklingError):
    """Safe mode refused a pickle global or opcode; nothing was called."""


class NotSeekableError(NpyStreamError, OSError):
    """Random access (index, mmap, zero-copy) asked of a stream that can only be read forward."""


class UnsupportedError(NpyStreamError, NotImplementedError):
    """A valid input that this version of npystream cannot handle yet (or in this way)."""


class StoreNotFoundError(NpyStreamError, FileNotFoundError):
    """A file or store that was asked for does not exist (nothing is created)."""


class CastError(NpyStreamError, TypeError):
    """An element does not fit a writer's dtype/kind and no casting rule allows it."""


class ShapeError(NpyStreamError, ValueError):
    """Arrays whose shapes (or dtypes) do not fit together: they do not broadcast or concatenate."""


class StateMismatchError(NpyStreamError, ValueError):
    """A saved loader state does not belong to this loader (another source, batch size, seed...)."""
