"""Atomic output: write under a temporary name beside the destination, rename into place at the end.

Every writer in npystream that creates a user-visible file or directory goes
through :func:`atomic_output`:

* the temporary name lives in the destination's directory (same filesystem,
  so the final ``os.replace``/``os.rename`` is atomic) and starts with a dot
  and ends with ``.npystream-tmp`` plus a random part, so it is recognisably
  ours and never collides with a concurrent writer;
* on success the temporary is renamed over the destination (for directories,
  an existing destination is first moved aside, then removed);
* on *any* exception -- including ``KeyboardInterrupt`` (Ctrl-C) and the
  :class:`Terminated` that :func:`signals_as_exceptions` raises on SIGTERM --
  the temporary is removed and nothing appears at the destination;
* an existing destination is refused unless ``overwrite=True``.

A SIGKILL cannot be caught: then the temporary stays behind (the destination
is still untouched), under a name that says what it is.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import uuid
from collections.abc import Iterator

__all__ = ["atomic_output", "temp_name", "remove_path", "refuse_existing", "Terminated",
           "signals_as_exceptions"]

TMP_SUFFIX = ".npystream-tmp"


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when SIGTERM arrives (a ``KeyboardInterrupt`` so cleanup runs)."""


def temp_name(dst: str, tag: str | None = None) -> str:
    """A hidden name beside ``dst``: ``dir/.NAME.<tag>.npystream-tmp`` (random tag by default)."""
    head, tail = os.path.split(os.path.abspath(dst))
    tag = tag if tag is not None else uuid.uuid4().hex[:12]
    return os.path.join(head, f".{tail}.{tag}{TMP_SUFFIX}")


def remove_path(path: str) -> None:
    """Remove a file or directory tree if it exists (no error when it does not)."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def refuse_existing(dst: str, overwrite: bool) -> None:
    """Raise ``FileExistsError`` when ``dst`` exists and ``overwrite`` is false."""
    if not overwrite and os.path.lexists(dst):
        raise FileExistsError(
            f"{dst}: already exists; pass overwrite=True (CLI: --overwrite) to replace it"
        )


def commit(tmp: str, dst: str, *, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``dst`` (atomic for files; directories moved aside first)."""
    if os.path.isdir(tmp) and os.path.lexists(dst):
        if not overwrite:
            raise FileExistsError(f"{dst}: appeared while converting; not replaced")
        old = temp_name(dst, "old")
        remove_path(old)
        os.rename(dst, old)
        os.rename(tmp, dst)
        remove_path(old)
        return
    if not overwrite and os.path.lexists(dst):
        raise FileExistsError(f"{dst}: appeared while converting; not replaced")
    os.replace(tmp, dst)


@contextlib.contextmanager
def atomic_output(dst: str, *, overwrite: bool = False, tmp: str | None = None) -> Iterator[str]:
    """Yield a temporary path beside ``dst``; rename it to ``dst`` on success, remove it on any error.

    The caller creates the file or directory at the yielded path.  ``tmp``
    names the temporary explicitly (resumable conversions keep a fixed name).
    """
    dst = os.fspath(dst)
    refuse_existing(dst, overwrite)
    tmp = tmp if tmp is not None else temp_name(dst)
    try:
        yield tmp
        commit(tmp, dst, overwrite=overwrite)
    except BaseException:
        remove_path(tmp)
        raise


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(f"terminated by signal {signum}")


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (and SIGINT ``KeyboardInterrupt``).

    Only in the main thread (signal handlers cannot be set elsewhere); the
    previous handlers are restored on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old_term = signal.signal(signal.SIGTERM, _raise_terminated)
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
