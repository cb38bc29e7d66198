"""One ragged store assembled from part stores written independently (by parallel writers).

A parallel writer (:func:`npystream.dask.to_ragged`, ``npystream convert
--workers N``) has each partition append its elements, in order, to a part
store of its own (a plain :class:`~npystream.formats.ragged.RaggedWriter`
store, written by any process on any machine that shares the filesystem).
Then:

1. :func:`describe_part` (client) reads each part's ``meta.json`` and part
   headers; :func:`find_mismatch` names the first part whose kind, dtype or
   ndim differs from the first non-empty part's (the caller raises
   :class:`~npystream.errors.CastError` at that part's first element, where a
   sequential writer would have failed, or writes it again with the first
   part's dtype when a ``cast`` allows it).
2. :func:`plan_assembly` computes where each part's values, offsets and
   shapes go; :func:`create_target` (client) creates the final parts in a
   hidden temporary directory beside the destination -- headers exactly as
   one sequential writer leaves them (:func:`~npystream.formats.ragged.part_header`),
   files sized to their final length (``offsets[0]`` is the zero the sizing
   leaves).
3. :func:`copy_part` (one task per part, in parallel) copies the part's value
   bytes (``copy_file_range``: no copy through user space where the kernel
   allows), its offsets shifted by the items before it, and its shapes, each
   at its final byte offset.  Tasks write disjoint byte ranges.
4. :func:`finish_assembly` (client) writes ``meta.json`` and renames the
   directory into place: the store appears whole or not at all.

``values.npy``, ``offsets.npy``, ``shapes.npy`` and ``meta.json`` are then
byte-identical to what one ``RaggedWriter`` appending every element in order
writes.  Memory: a part's offsets are shifted in chunks of 1 Mi elements.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from npystream._atomic import commit
from npystream.errors import CastError
from npystream.formats.npy import read_header
from npystream.formats.ragged import (
    _NO_COPY_RANGE,
    META,
    OFFSETS,
    SHAPES,
    VALUES,
    RaggedArray,
    RaggedWriter,
    meta_bytes,
    part_header,
)

__all__ = ["PartInfo", "Assembly", "write_part", "describe_part", "find_mismatch", "plan_assembly", "create_target",
           "copy_part", "finish_assembly"]

_I8 = np.dtype("<i8")
_CHUNK_ELEMENTS = 1 << 20
_COPY_STEP = 1 << 30


@dataclass(frozen=True)
class PartInfo:
    """What one part store holds, and where its parts' data start."""

    path: str
    count: int
    nitems: int
    kind: str
    dtype: np.dtype
    ndim: int
    data_offsets: tuple[int, int, int]  # values.npy, offsets.npy, shapes.npy (0 when absent)


@dataclass(frozen=True)
class Assembly:
    """Where every part goes in the final store."""

    kind: str
    dtype: np.dtype
    ndim: int
    count: int
    nitems: int
    parts: tuple[PartInfo, ...]
    item_starts: tuple[int, ...]
    count_starts: tuple[int, ...]
    header_lens: tuple[int, int, int]


def write_part(elements: Iterable[Any] | Callable[[int], Iterable[Any]], path: str, *, where: str,
               first: int | None = None, mode: str = "w", **writer_options: Any) -> int:
    """Append ``elements`` to the part store at ``path``; return how many the part holds.

    ``elements`` may be a function of the number of elements the part
    already holds (``mode='a'`` resumes a part: it returns the rest).
    ``writer_options`` are :class:`RaggedWriter`'s.  A :class:`CastError`
    names ``where`` (e.g. ``"partition 3"``) and, when ``first`` (the global
    index of the part's first element) is known, the element's global index.
    """
    writer = RaggedWriter(path, mode=mode, **writer_options)
    try:
        writer.extend(elements(len(writer)) if callable(elements) else elements)
    except CastError as exc:
        writer.abort()
        local = exc.index
        if first is not None and local is not None:
            raise type(exc)(f"{where}: {exc.message}", path=exc.path, index=first + local) from None
        at = f", element {local} of the partition" if local is not None else ""
        raise type(exc)(f"{where}{at}: {exc.message}", path=exc.path) from None
    except BaseException:
        writer.salvage()
        raise
    count = len(writer)
    writer.close()
    return count


def describe_part(path: str) -> PartInfo:
    """Read (and check, as every reader does) the part store at ``path``."""
    store = RaggedArray(path)
    offsets = [read_header(os.path.join(path, VALUES)).data_offset,
               read_header(os.path.join(path, OFFSETS)).data_offset, 0]
    if store.kind == "array" and store.ndim >= 2:
        offsets[2] = read_header(os.path.join(path, SHAPES)).data_offset
    return PartInfo(path, len(store), int(store.offsets[-1]) if len(store) else 0, store.kind,
                    store.dtype, store.ndim if store.kind == "array" else 1, tuple(offsets))


def _describe(info: PartInfo) -> str:
    if info.kind != "array":
        return f"kind {info.kind!r}"
    return f"dtype {info.dtype.str!r} with ndim {info.ndim}"


def find_mismatch(parts: Sequence[PartInfo]) -> tuple[int, str, bool] | None:
    """``(k, message, dtype_only)`` for the first non-empty part unlike the first non-empty one, or None.

    ``dtype_only`` is True when kind and ndim agree and only the dtype differs
    (a writer with a ``cast`` rule can write that part again with the first
    part's dtype).
    """
    ref = next((p for p in parts if p.count), None)
    if ref is None:
        return None
    for k, p in enumerate(parts):
        if not p.count or (p.kind, p.dtype, p.ndim) == (ref.kind, ref.dtype, ref.ndim):
            continue
        dtype_only = p.kind == ref.kind == "array" and p.ndim == ref.ndim
        return k, f"holds {_describe(p)}, but the elements before it set the store to {_describe(ref)}", dtype_only
    return None


def plan_assembly(parts: Sequence[PartInfo]) -> Assembly:
    """Where each part's data go; the parts must agree (check :func:`find_mismatch` first)."""
    if not parts:
        raise ValueError("no parts to assemble")
    if find_mismatch(parts) is not None:
        raise ValueError("the parts disagree in kind, dtype or ndim; check find_mismatch() first")
    ref = next((p for p in parts if p.count), parts[0])
    item_starts, count_starts = [], []
    items = count = 0
    for p in parts:
        item_starts.append(items)
        count_starts.append(count)
        items += p.nitems
        count += p.count
    lens = (len(part_header(ref.dtype, (items,))), len(part_header(_I8, (count + 1,))),
            len(part_header(_I8, (count, ref.ndim))) if ref.kind == "array" and ref.ndim >= 2 else 0)
    return Assembly(ref.kind, ref.dtype, ref.ndim, count, items, tuple(parts), tuple(item_starts),
                    tuple(count_starts), lens)


def create_target(plan: Assembly, tmp: str) -> None:
    """Create the final store's parts in the new directory ``tmp``: headers, final sizes, no meta.json."""
    os.mkdir(tmp)
    files = [(VALUES, part_header(plan.dtype, (plan.nitems,)), plan.nitems * plan.dtype.itemsize),
             (OFFSETS, part_header(_I8, (plan.count + 1,)), (plan.count + 1) * 8)]
    if plan.header_lens[2]:
        files.append((SHAPES, part_header(_I8, (plan.count, plan.ndim)), plan.count * plan.ndim * 8))
    for name, header, nbytes in files:
        with open(os.path.join(tmp, name), "wb") as fh:
            fh.write(header)
            fh.truncate(len(header) + nbytes)


def _copy_bytes(src_fd: int, src_pos: int, dst_fd: int, dst_pos: int, nbytes: int) -> None:
    """Copy ``nbytes`` between files at the given offsets (in the kernel when it can)."""
    copy_range = getattr(os, "copy_file_range", None)
    while nbytes > 0:
        done = 0
        if copy_range is not None:
            try:
                done = copy_range(src_fd, dst_fd, min(nbytes, _COPY_STEP), src_pos, dst_pos)
            except OSError as exc:
                if exc.errno not in _NO_COPY_RANGE:
                    raise
                copy_range = None
                continue
        else:
            data = os.pread(src_fd, min(nbytes, 8 << 20), src_pos)
            done = os.pwrite(dst_fd, data, dst_pos) if data else 0
        if done <= 0:
            raise OSError(f"copying a part ended early: {nbytes} bytes left at byte {src_pos}")
        src_pos += done
        dst_pos += done
        nbytes -= done


def copy_part(plan: Assembly, k: int, tmp: str) -> None:
    """Write part ``k`` of ``plan`` into the store being assembled in ``tmp`` (a task of its own)."""
    part = plan.parts[k]
    if not part.count:
        return
    isz = plan.dtype.itemsize
    vhdr, ohdr, shdr = plan.header_lens
    jobs = [(VALUES, part.data_offsets[0], vhdr + plan.item_starts[k] * isz, part.nitems * isz)]
    if shdr:
        jobs.append((SHAPES, part.data_offsets[2], shdr + plan.count_starts[k] * plan.ndim * 8,
                     part.count * plan.ndim * 8))
    for name, src_pos, dst_pos, nbytes in jobs:
        src_fd = os.open(os.path.join(part.path, name), os.O_RDONLY)
        try:
            dst_fd = os.open(os.path.join(tmp, name), os.O_WRONLY)
            try:
                _copy_bytes(src_fd, src_pos, dst_fd, dst_pos, nbytes)
            finally:
                os.close(dst_fd)
        finally:
            os.close(src_fd)
    # offsets[1:] of the part, shifted by the items of the parts before it
    shift = plan.item_starts[k]
    with open(os.path.join(part.path, OFFSETS), "rb") as src, open(os.path.join(tmp, OFFSETS), "r+b") as dst:
        dst.seek(ohdr + (plan.count_starts[k] + 1) * 8)
        for i in range(1, part.count + 1, _CHUNK_ELEMENTS):
            n = min(_CHUNK_ELEMENTS, part.count + 1 - i)
            src.seek(part.data_offsets[1] + i * 8)
            chunk = np.fromfile(src, dtype=_I8, count=n)
            if len(chunk) != n:
                raise OSError(f"{part.path}: offsets.npy ended early")
            chunk += shift
            dst.write(chunk.tobytes())


def finish_assembly(plan: Assembly, tmp: str, dst: str, *, overwrite: bool, durable: bool) -> None:
    """Publish ``meta.json`` and rename the assembled directory ``tmp`` to ``dst``."""
    with open(os.path.join(tmp, META), "wb") as fh:
        fh.write(meta_bytes(plan.kind, plan.dtype, plan.ndim, plan.count, plan.nitems))
    if durable:
        for name in os.listdir(tmp):
            fd = os.open(os.path.join(tmp, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    commit(tmp, dst, overwrite=overwrite)
