"""Training batches from a ragged store, an object ``.npy`` or fixed rows: shuffle, shard, pad/pack, resume.

:func:`batches` returns a :class:`BatchLoader`; ``for batch in loader`` yields
dicts of numpy arrays.  What each part does, and the promises it keeps:

Order (a pure function of ``seed``, ``epoch``, ``rank``, ``world_size``)
------------------------------------------------------------------------
1. *Global order.*  ``shuffle=False``: 0, 1, ..., N-1.  ``shuffle=True`` (or
   ``"full"``): one permutation of the N element ids per ``(seed, epoch)``,
   drawn by ``np.random.Generator(PCG64([seed, epoch]))``, kept as one int32
   (N < 2**31) or int64 array: 4-8 bytes per element, no Python objects.
   ``shuffle="block"`` (the default of ``shuffle=True`` above
   ``FULL_SHUFFLE_LIMIT`` = 2**30 elements): the ids are cut into blocks of
   ``block_size`` consecutive elements (65,536); the block order is permuted,
   consecutive runs of ``WINDOW_BLOCKS`` (16) blocks form a window, and each
   window is shuffled on its own when first read.  State is O(N / block_size)
   plus one or two windows (16 x 65,536 ids).  Trade-off: reads stay within
   16 regions of the store at a time (page-cache and readahead friendly),
   but an element's neighbours in the order come from only those 16 blocks,
   and two elements of one block are never more than a window (~10^6
   positions) apart.
2. *Shards* (exactly ``torch.utils.data.DistributedSampler``'s rule): every
   rank computes the same global order; rank r takes positions r, r + W,
   r + 2W, ... (W = ``world_size``).  ``drop_last=False``: the order is first
   extended to a multiple of W by repeating its head, so every rank gets
   ceil(N / W) samples and a few elements are seen twice per epoch;
   the last batch may be short.  ``drop_last=True``: the tail is dropped, every
   rank gets floor(N / W) samples, then only full batches.  Either way every
   rank has the same number of batches (``len(loader)``), so collective
   operations in distributed training never wait on a rank that ran out.
3. *Batches*: consecutive runs of ``batch_size`` of the rank's samples.  With
   ``bucket=k``, the samples are taken k batches at a time, sorted by length
   (stable), cut into batches, and those k batches shuffled: batches hold
   elements of similar length (less padding), the batch order stays random.
   The length is the element's first-axis length in the first field that has
   one.
4. ``set_epoch(e)`` picks the epoch (0 by default).  A ``for`` loop continues
   where the last one stopped; once an epoch is finished, the next loop starts
   it again from batch 0 (call ``set_epoch`` for a new order).

Gather
------
For a ragged store of arrays, a batch is read with index math over the
offsets: the B start/end offsets are one fancy-index each, then one C call
(``npystream._speedups.gather_pad``; a numpy twin when the accelerator is
off) copies the B runs from the memory map into the output buffer and fills
the padding, without the GIL.  No Python-level work per element.  Object
``.npy`` files are decoded through their offset index, one batched call
(:meth:`npystream.ObjectArray.get`); fixed rows are one ``np.take``.

Collate
-------
``"pad"``: ``{"values": (B, L, ...), "lengths": (B,), "index": (B,)}``, L the
longest first axis in the batch, or ``max_len`` (a fixed shape; longer
elements raise unless ``truncate=True`` cuts them).  N-D elements pad along
their first axis (their trailing shapes must agree).  Fixed rows are stacked
as they are (``values`` only).  ``"list"``: ``{"values": [arrays], "index"}``.
A callable gets the list of elements (dicts of elements for dict sources) and
returns the batch.  A dict source gives ``{"index": ..., name: {...}, ...}``.

``"pack"`` (LLM sequence packing; 1-D ragged stores): the rank's samples, in
order, are one token stream; batch b is tokens ``[b*T, (b+1)*T)``, T =
``batch_size * max_len``, laid out as ``values (batch_size, max_len)``.  An
element that does not fit is split: its first part ends this row (or batch),
the rest *carries over* to the start of the next.  ``segment_ids`` (int32,
per row 1, 2, ...; 0 = padding), ``positions`` (int32, the token's position
in its element, continuing across a split), ``cu_seqlens`` (int32, the
segments' cumulative lengths over the flattened batch, for varlen
attention), ``index`` (each segment's element id).  Only the last batch has
padding; ``drop_last=True`` drops it.  ``truncate=True`` first cuts each element
to ``max_len`` tokens.  No token is lost or repeated (beyond the sharding
rule above).  Pack mode keeps the rank's ids and cumulative token counts per
epoch: 12 bytes per sample (16 from 2**31 elements).

Resume
------
``state_dict()`` is a small JSON-serialisable dict: options that fix the
order, the epoch, the number of batches already yielded, and a fingerprint of
the source (element count, and a hash of the offsets' head and tail).
``load_state_dict(state)`` continues with exactly the next batch; a state from
another source, batch size, seed, shuffle, world size or collate raises
:class:`~npystream.errors.StateMismatchError` naming the difference.  The rank may differ (all
ranks are at the same batch), so rank 0's state resumes every rank.

Prefetch
--------
``prefetch=k`` (0 by default) builds the next k batches in a background
thread (bounded queue of k); the gathers release the GIL.  Breaking out of
the loop stops the thread.
"""

from __future__ import annotations

import hashlib
import math
import operator
import os
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from npystream._accel import speedups
from npystream.errors import CastError, StateMismatchError, UnsupportedError

__all__ = ["batches", "BatchLoader", "FULL_SHUFFLE_LIMIT", "WINDOW_BLOCKS"]

FULL_SHUFFLE_LIMIT = 1 << 30  # above this many elements shuffle=True means shuffle="block"
WINDOW_BLOCKS = 16  # blocks shuffled together in block-shuffle mode
_STATE_VERSION = 1
_COLLATES = ("pad", "pack", "list")


# --------------------------------------------------------------------------- #
# gathers: C twins in _speedups_gather.c
# --------------------------------------------------------------------------- #


def _gather_pad_py(src: np.ndarray, dst: np.ndarray, starts: np.ndarray, counts: np.ndarray,
                   row_items: int, pad: np.ndarray) -> None:
    """Row j of ``dst`` (``row_items`` items) = ``src[starts[j]:starts[j]+counts[j]]`` then padding."""
    rows = dst.reshape(len(starts), row_items)
    rows[...] = pad
    total = int(counts.sum())
    if total:
        first = np.cumsum(counts) - counts
        within = np.arange(total, dtype=np.int64) - np.repeat(first, counts)
        rows[np.repeat(np.arange(len(starts)), counts), within] = src[np.repeat(starts, counts) + within]


def _gather_runs_py(src: np.ndarray, dst: np.ndarray, starts: np.ndarray, counts: np.ndarray,
                    dst_starts: np.ndarray) -> None:
    """``dst[dst_starts[j]:][:counts[j]] = src[starts[j]:][:counts[j]]`` for every run j."""
    total = int(counts.sum())
    if total:
        first = np.cumsum(counts) - counts
        within = np.arange(total, dtype=np.int64) - np.repeat(first, counts)
        dst.reshape(-1)[np.repeat(dst_starts, counts) + within] = src[np.repeat(starts, counts) + within]


def _gather_pad(sp: Any, src: np.ndarray, dst: np.ndarray, starts: np.ndarray, counts: np.ndarray,
                row_items: int, pad: np.ndarray) -> None:
    """C gather when ``sp`` (the accelerator) is given and the buffers allow it, else the numpy twin."""
    if sp is not None and src.flags.c_contiguous and dst.dtype == src.dtype and src.dtype.itemsize:
        if starts.dtype != np.int64 or not starts.flags.c_contiguous:
            starts = np.ascontiguousarray(starts, dtype=np.int64)
        if counts.dtype != np.int64 or not counts.flags.c_contiguous:
            counts = np.ascontiguousarray(counts, dtype=np.int64)
        sp.gather_pad(src, dst, starts, counts, row_items, src.dtype.itemsize, pad.tobytes())
    else:
        _gather_pad_py(src, dst, starts, counts, row_items, pad)


def _gather_runs(sp: Any, src: np.ndarray, dst: np.ndarray, starts: np.ndarray, counts: np.ndarray,
                 dst_starts: np.ndarray) -> None:
    if sp is not None and src.flags.c_contiguous and dst.dtype == src.dtype and src.dtype.itemsize:
        sp.gather_runs(src, dst, np.ascontiguousarray(starts, dtype=np.int64),
                       np.ascontiguousarray(counts, dtype=np.int64),
                       np.ascontiguousarray(dst_starts, dtype=np.int64), src.dtype.itemsize)
    else:
        _gather_runs_py(src, dst, starts, counts, dst_starts)


# --------------------------------------------------------------------------- #
# fields: one source of elements behind a small interface
# --------------------------------------------------------------------------- #


def _digest(*parts: Any) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(p.tobytes() if isinstance(p, np.ndarray) else repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _pad_scalar(pad_value: Any, dtype: np.dtype, name: str) -> np.ndarray:
    try:
        with np.errstate(all="raise"):
            pad = np.array(pad_value, dtype=dtype)
    except (ValueError, TypeError, OverflowError, FloatingPointError) as exc:
        raise ValueError(f"pad_value={pad_value!r} does not fit the dtype {dtype} of {name} ({exc}); "
                         "pass a pad_value that does") from None
    if pad.shape != ():
        raise ValueError(f"pad_value must be a scalar, got {pad_value!r}")
    return pad


class _Field:
    """One element source: ``n`` elements, batched reads by element id."""

    n: int
    label: str
    has_lengths: bool = False

    def lengths(self, ids: np.ndarray) -> np.ndarray:  # pragma: no cover - overridden where True
        raise NotImplementedError

    def elements(self, ids: np.ndarray) -> list[Any]:
        raise NotImplementedError

    def pad(self, ids: np.ndarray, opts: _Options) -> dict[str, Any]:
        return _pad_elements(self.elements(ids), ids, opts, self.label)

    def fingerprint(self) -> str:
        raise NotImplementedError


class _RaggedField(_Field):
    """A ragged store of arrays (step-1 view): gathers straight from the mapped values."""

    has_lengths = True

    def __init__(self, store: Any, label: str) -> None:
        self.store = store
        self.label = label
        self._setup()

    def _setup(self) -> None:
        r = self.store
        self.n = len(r)
        self.values = r.values
        self.offsets = np.asarray(r.offsets)
        self.ndim = r.ndim
        self.shapes = np.asarray(r.shapes) if r.ndim >= 2 else None

    def __getstate__(self) -> dict[str, Any]:
        return {"store": self.store, "label": self.label}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup()

    def lengths(self, ids: np.ndarray) -> np.ndarray:
        if self.shapes is not None:
            return self.shapes[ids, 0]
        if self.ndim == 0:
            return np.ones(len(ids), dtype=np.int64)
        return self.offsets[ids + 1] - self.offsets[ids]

    def spans(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        starts = self.offsets[ids]
        return starts, self.offsets[ids + 1] - starts

    def elements(self, ids: np.ndarray) -> list[Any]:
        starts, counts = self.spans(ids)
        vals = self.values
        if self.shapes is None:
            if self.ndim == 0:
                return [vals[s:s + 1].reshape(()) for s in starts.tolist()]
            return [vals[s:s + c] for s, c in zip(starts.tolist(), counts.tolist())]
        shp = self.shapes[ids]
        return [vals[s:s + c].reshape(tuple(sh)) for s, c, sh in zip(starts.tolist(), counts.tolist(),
                                                                     shp.tolist())]

    def pad(self, ids: np.ndarray, opts: _Options) -> dict[str, Any]:
        starts, counts = self.spans(ids)
        b = len(ids)
        if self.ndim == 0:
            out = self.values[starts] if b else np.empty(0, self.values.dtype)
            return {"values": np.ascontiguousarray(out), "lengths": np.ones(b, dtype=np.int64)}
        if self.shapes is not None:
            shp = self.shapes[ids]
            first = shp if b else self.shapes
            trailing = tuple(first[0, 1:].tolist()) if len(first) else ()
            if b and (shp[:, 1:] != shp[0, 1:]).any():
                bad = int(np.flatnonzero((shp[:, 1:] != shp[0, 1:]).any(axis=1))[0])
                raise CastError(
                    f"collate='pad' pads along the first axis, so the other axes must agree: element "
                    f"{int(ids[0])} has shape {tuple(shp[0].tolist())}, element {int(ids[bad])} "
                    f"{tuple(shp[bad].tolist())}; use collate='list' or a callable",
                    path=self.label)
            lengths = shp[:, 0].copy()
        else:
            trailing = ()
            lengths = counts
        inner = math.prod(trailing)
        width = _width(lengths, ids, opts, self.label)
        if opts.truncate and opts.max_len is not None:
            np.minimum(lengths, opts.max_len, out=lengths)
            counts = lengths * inner
        out = np.empty((b, width, *trailing), dtype=self.values.dtype)
        _gather_pad(opts.sp, self.values, out, starts, counts, width * inner,
                    opts.pad_for(self.values.dtype, self.label))
        return {"values": out, "lengths": lengths}

    def fingerprint(self) -> str:
        offs = self.offsets
        return _digest("ragged", self.n, self.values.dtype.str, self.ndim, offs[:1025], offs[-1025:])


class _ElementsField(_Field):
    """Elements fetched one batch at a time through the source's own index (object .npy, etc.)."""

    def __init__(self, source: Any, label: str, fetch: Callable[[np.ndarray], list[Any]],
                 lengths: Callable[[np.ndarray], np.ndarray] | None, fingerprint: str) -> None:
        self.source = source
        self.label = label
        self.n = len(source)
        self._fetch = fetch
        self._lengths = lengths
        self.has_lengths = lengths is not None
        self._fingerprint = fingerprint

    def lengths(self, ids: np.ndarray) -> np.ndarray:
        if self._lengths is None:  # pragma: no cover - callers check has_lengths
            raise UnsupportedError("element lengths are not known without decoding", path=self.label)
        return self._lengths(ids)

    def elements(self, ids: np.ndarray) -> list[Any]:
        return self._fetch(ids)

    def fingerprint(self) -> str:
        return self._fingerprint


class _RowsField(_Field):
    """Fixed-shape rows (a .npy memmap, an ndarray, any len/shape/dtype source indexable by int arrays)."""

    def __init__(self, source: Any, label: str) -> None:
        self.source = source
        self.label = label
        self.n = len(source)

    def __getstate__(self) -> dict[str, Any]:
        return {"label": self.label, "source": portable(self.source)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.n = len(self.source)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        src = self.source
        if isinstance(src, np.ndarray):
            return np.take(src, ids, axis=0)
        return np.asarray(src[ids])

    def elements(self, ids: np.ndarray) -> list[Any]:
        return list(self.rows(ids))

    def pad(self, ids: np.ndarray, opts: _Options) -> dict[str, Any]:
        return {"values": self.rows(ids)}

    def fingerprint(self) -> str:
        src = self.source
        ends = self.rows(np.array([0, self.n - 1])) if self.n else np.empty(0)
        return _digest("rows", tuple(getattr(src, "shape", (self.n,))), str(getattr(src, "dtype", "")),
                       np.ascontiguousarray(ends).view(np.uint8)[:8192])


def portable(source: Any) -> Any:
    """``source`` ready for pickling: a file-backed np.memmap becomes "map this file again"
    (pickling a memmap copies its data); everything else is returned as it is (RaggedArray
    and ObjectArray already pickle as "open this path again")."""
    if isinstance(source, np.memmap):
        root = source
        while isinstance(root.base, np.ndarray):
            root = root.base
        filename = getattr(root, "filename", None)
        if filename and isinstance(root, np.memmap) and \
                (source.flags.c_contiguous or source.flags.f_contiguous):
            offset = int(getattr(root, "offset", 0)) + (source.ctypes.data - root.ctypes.data)
            descr = source.dtype.descr if source.dtype.fields else source.dtype.str
            return _MappedAgain((filename, offset, descr, source.shape,
                                 "C" if source.flags.c_contiguous else "F"))
    if isinstance(source, Mapping):
        return {k: portable(v) for k, v in source.items()}
    return source


class _MappedAgain:
    """Pickles as the spec of a memmap; unpickles as that memmap, mapped again."""

    def __init__(self, spec: tuple[Any, ...]) -> None:
        self.spec = spec

    def __reduce__(self) -> Any:
        return (_map_again, self.spec)


def _map_again(filename: str, offset: int, descr: Any, shape: Any, order: str) -> np.memmap:
    dtype = np.dtype([tuple(f) for f in descr]) if isinstance(descr, list) else np.dtype(descr)
    return np.memmap(filename, dtype=dtype, mode="r", offset=offset, shape=tuple(shape), order=order)


def _width(lengths: np.ndarray, ids: np.ndarray, opts: _Options, label: str) -> int:
    longest = int(lengths.max()) if len(lengths) else 0
    if opts.max_len is None:
        return longest
    if longest > opts.max_len and not opts.truncate:
        j = int(np.argmax(lengths))
        raise ValueError(
            f"element {int(ids[j])} of {label} has length {longest}, more than max_len={opts.max_len}; "
            "pass truncate=True to cut long elements, or a larger max_len")
    return opts.max_len


def _as_padded_array(x: Any, eid: int, label: str) -> np.ndarray:
    if isinstance(x, (str, bytes, bytearray, memoryview)):
        raise CastError(
            f"collate='pad' needs array elements, element {eid} is a {type(x).__name__}: strings are "
            "not padded (pad characters or bytes would change them); use collate='list' or a callable, "
            "or store them as integer arrays (e.g. np.frombuffer(s.encode(), np.uint8))",
            path=label, index=eid)
    a = x if isinstance(x, np.ndarray) else np.asarray(x)
    if a.dtype == object or a.ndim == 0:
        what = "a 0-d value" if a.ndim == 0 else "an object array"
        raise CastError(
            f"collate='pad' needs arrays of at least one dimension and a numeric dtype, element {eid} is "
            f"{what} ({type(x).__name__}); use collate='list' or a callable",
            path=label, index=eid)
    return a


def _pad_elements(elems: list[Any], ids: np.ndarray, opts: _Options, label: str) -> dict[str, Any]:
    arrs = [_as_padded_array(x, int(e), label) for x, e in zip(elems, ids.tolist())]
    b = len(arrs)
    if not b:
        return {"values": np.empty((0, 0)), "lengths": np.empty(0, dtype=np.int64)}
    trailing = arrs[0].shape[1:]
    for a, e in zip(arrs, ids.tolist()):
        if a.shape[1:] != trailing:
            raise CastError(
                f"collate='pad' pads along the first axis, so the other axes must agree: element "
                f"{int(ids[0])} has shape {arrs[0].shape}, element {e} {a.shape}; use collate='list' "
                "or a callable", path=label, index=e)
    dtype = np.result_type(*arrs)
    lengths = np.fromiter((a.shape[0] for a in arrs), dtype=np.int64, count=b)
    width = _width(lengths, ids, opts, label)
    if opts.truncate and opts.max_len is not None:
        np.minimum(lengths, opts.max_len, out=lengths)
    out = np.empty((b, width, *trailing), dtype=dtype)
    out[...] = opts.pad_for(dtype, label)
    for j, (a, n) in enumerate(zip(arrs, lengths.tolist())):
        out[j, :n] = a[:n]
    return {"values": out, "lengths": lengths}


# --------------------------------------------------------------------------- #
# opening sources
# --------------------------------------------------------------------------- #


def _open_path(path: str) -> Any:
    """A path -> the reader npystream would give: ragged store, ObjectArray, or a memmap of rows."""
    from npystream.errors import StoreNotFoundError

    if os.path.isdir(path):
        from npystream.formats.ragged import RaggedArray

        return RaggedArray(path)
    if not os.path.exists(path):
        raise StoreNotFoundError("no such file or ragged store (source=)", path=path)
    from npystream.formats.npy import read_header
    from npystream.sources import open_source

    src = open_source(path)
    try:
        header = read_header(src)
        if header.pickled:
            from npystream.object_array import ObjectArray

            return ObjectArray(src, header=header)
        from npystream.formats.fixed import open_npy

        arr = open_npy(src, header)
    except BaseException:
        src.close()
        raise
    src.close()
    return arr


class _Take:
    """``obj[ids]`` (as a list if ``as_list``): a picklable fetch, so loaders travel to spawned workers."""

    def __init__(self, obj: Any, as_list: bool) -> None:
        self.obj = obj
        self.as_list = as_list

    def __call__(self, ids: np.ndarray) -> Any:
        got = self.obj[ids]
        return list(got) if self.as_list else got


def make_field(source: Any, label: str) -> _Field:
    """One source (path, reader, array, row source) behind the loader's field interface."""
    if isinstance(source, (str, os.PathLike)):
        source = _open_path(os.fspath(source))
    from npystream.formats.ragged import RaggedArray
    from npystream.object_array import ObjectArray

    if isinstance(source, RaggedArray):
        if source.kind == "array" and _contiguous_view(source):
            return _RaggedField(source, label)
        # stepped views and str/bytes/object stores: elements through the store's own indexing
        lens = source.shapes[:, 0].copy() if source.kind == "array" and source.ndim >= 1 \
            else source.lengths
        return _ElementsField(
            source, label, _Take(source, False),
            _Take(lens, False) if source.kind != "object" and source.ndim >= 1 else None,
            _digest("ragged-elements", len(source), source.kind, lens[:1025], lens[-1025:]))
    if isinstance(source, ObjectArray):
        if len(source.shape) != 1:
            raise ValueError(f"{label}: an object array of shape {source.shape}; batches() reads 1-D "
                             "arrays of elements (reshape it on save, or pass arr[i] rows)")
        size = os.stat(source.name).st_size if os.path.isfile(source.name) else None
        return _ElementsField(source, label, source.get, None,
                              _digest("object", source.shape, str(source.dtype),
                                      source.header.data_offset, size))
    if isinstance(source, np.ndarray):
        if source.ndim == 0:
            raise ValueError(f"{label}: a 0-d array has no rows to batch")
        if source.dtype == object:
            return _ElementsField(source, label, _Take(source, True), None,
                                  _digest("ndarray-object", source.shape))
        return _RowsField(source, label)
    if hasattr(source, "__len__") and hasattr(source, "__getitem__"):
        return _RowsField(source, label)
    raise TypeError(
        f"source must be a ragged store path or RaggedArray, an object .npy path or ObjectArray, a "
        f"fixed .npy path or array, a row source (len, shape, dtype, int-array indexing), or a dict "
        f"of these; got {type(source).__name__}")


def _contiguous_view(r: Any) -> bool:
    try:
        r.offsets  # noqa: B018 - raises for stepped views
    except UnsupportedError:
        return False
    return True


# --------------------------------------------------------------------------- #
# options and order
# --------------------------------------------------------------------------- #


class _Options:
    __slots__ = ("batch_size", "shuffle", "seed", "rank", "world_size", "drop_last", "collate",
                 "pad_value", "max_len", "truncate", "bucket", "block_size", "sp", "_pads")

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__ if k != "sp"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)
        self.sp = speedups()

    def pad_for(self, dtype: np.dtype, label: str) -> np.ndarray:
        key = (dtype, label)
        pad = self._pads.get(key)
        if pad is None:
            pad = self._pads[key] = _pad_scalar(self.pad_value, dtype, label)
        return pad


def _positive(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if v < low:
        raise ValueError(f"{name} must be >= {low}, got {name}={v}")
    return v


def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64([seed, epoch]))
    perm = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
    rng.shuffle(perm)
    return perm


class _Order:
    """Rank-local sample positions -> element ids, for one (seed, epoch, rank, world_size)."""

    def __init__(self, n: int, opts: _Options, epoch: int, mode: str) -> None:
        self.n = n
        self.opts = opts
        self.epoch = epoch
        self.mode = mode
        w = opts.world_size
        self.num_samples = n // w if opts.drop_last else -(-n // w)
        self._perm: np.ndarray | None = None
        self._windows: dict[int, np.ndarray] = {}
        if mode == "block":
            bs = opts.block_size
            nblocks = -(-n // bs)
            rng = np.random.Generator(np.random.PCG64([opts.seed, epoch, 1]))
            self._blocks = rng.permutation(nblocks)
            span = WINDOW_BLOCKS * bs
            nwin = -(-nblocks // WINDOW_BLOCKS)
            starts = np.arange(nwin + 1, dtype=np.int64) * span
            if nblocks:
                short = bs * nblocks - n  # the last block is this much shorter
                where = int(np.flatnonzero(self._blocks == nblocks - 1)[0]) // WINDOW_BLOCKS
                starts[where + 1:] -= short
            starts[-1] = n
            self._win_starts = starts

    def ids(self, pos: np.ndarray) -> np.ndarray:
        g = self.opts.rank + pos.astype(np.int64) * self.opts.world_size
        if self.n:
            g %= self.n  # DistributedSampler's padding repeats the head of the order
        if self.mode == "none":
            return g
        if self.mode == "full":
            if self._perm is None:
                self._perm = _permutation(self.n, self.opts.seed, self.epoch)
            return self._perm[g].astype(np.int64)
        win = np.searchsorted(self._win_starts, g, side="right") - 1
        out = np.empty(len(g), dtype=np.int64)
        for w in np.unique(win).tolist():
            sel = win == w
            out[sel] = self._window(w)[g[sel] - self._win_starts[w]]
        return out

    def _window(self, w: int) -> np.ndarray:
        ids = self._windows.get(w)
        if ids is None:
            bs = self.opts.block_size
            blocks = self._blocks[w * WINDOW_BLOCKS:(w + 1) * WINDOW_BLOCKS]
            ids = np.concatenate([np.arange(b * bs, min((b + 1) * bs, self.n), dtype=np.int64)
                                  for b in blocks.tolist()])
            np.random.Generator(np.random.PCG64([self.opts.seed, self.epoch, 2, w])).shuffle(ids)
            if len(self._windows) >= 2:
                self._windows.pop(next(iter(self._windows)))
            self._windows[w] = ids
        return ids


# --------------------------------------------------------------------------- #
# the loader
# --------------------------------------------------------------------------- #


class BatchLoader:
    """Batches of one epoch of one rank; see the module docstring.  Made by :func:`batches`."""

    def __init__(self, fields: dict[str, _Field], single: bool, opts: _Options,
                 collate_fn: Callable[[list[Any]], Any] | None, prefetch: int) -> None:
        self._fields = fields
        self._single = single
        self._opts = opts
        self._collate_fn = collate_fn
        self._prefetch = prefetch
        self._n = next(iter(fields.values())).n
        n = self._n
        if opts.shuffle is False:
            self._mode = "none"
        elif opts.shuffle == "block" or (opts.shuffle is True and n > FULL_SHUFFLE_LIMIT):
            self._mode = "block"
        else:
            self._mode = "full"
        self._epoch = 0
        self._pos = 0
        self._lock = threading.Lock()
        self._order_cache: _Order | None = None
        self._bucket_cache: tuple[int, int, list[np.ndarray]] | None = None
        self._pack_cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self._fingerprint: str | None = None
        self._len_cache: tuple[int, int] | None = None
        if opts.collate == "pack":
            self._pack_field = next(iter(fields.values()))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_lock"] = None
        state["_order_cache"] = state["_bucket_cache"] = state["_pack_cache"] = None
        state["_len_cache"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- order -----------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch whose order this loader yields."""
        return self._epoch

    @property
    def position(self) -> int:
        """Batches of this epoch already yielded (the next one is ``read_batch(position)``)."""
        return self._pos

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s order from its first batch (the same epoch again keeps the position,
        so ``load_state_dict`` followed by the usual ``set_epoch`` loop resumes)."""
        epoch = _positive("epoch", epoch, 0)
        if epoch != self._epoch:
            self._epoch = epoch
            self._pos = 0

    def _order(self) -> _Order:
        order = self._order_cache
        if order is None or order.epoch != self._epoch:
            order = _Order(self._n, self._opts, self._epoch, self._mode)
            self._order_cache = order
        return order

    @property
    def num_samples(self) -> int:
        """Samples this rank reads per epoch (DistributedSampler's rule; see the module docstring)."""
        return self._order().num_samples

    def __len__(self) -> int:
        cached = self._len_cache
        if cached is not None and cached[0] == self._epoch:
            return cached[1]
        n = self._count_batches()
        self._len_cache = (self._epoch, n)
        return n

    def _count_batches(self) -> int:
        opts = self._opts
        if opts.collate == "pack":
            total = int(self._pack_plan()[1][-1])
            per = opts.batch_size * opts.max_len
            return total // per if opts.drop_last else -(-total // per)
        m = self.num_samples
        return m // opts.batch_size if opts.drop_last else -(-m // opts.batch_size)

    def batch_ids(self, b: int) -> np.ndarray:
        """Element ids of batch ``b`` of this rank's epoch (pad/list/callable collate)."""
        opts = self._opts
        b = operator.index(b)
        nb = len(self)
        if not 0 <= b < nb:
            raise IndexError(f"batch {b} is out of range: this rank's epoch has {nb} batches")
        if opts.bucket is not None:
            return self._bucket_batches(b // opts.bucket)[b % opts.bucket]
        lo = b * opts.batch_size
        hi = min(lo + opts.batch_size, self.num_samples)
        return self._order().ids(np.arange(lo, hi, dtype=np.int64))

    def _bucket_batches(self, u: int) -> list[np.ndarray]:
        cache = self._bucket_cache
        if cache is not None and cache[0] == self._epoch and cache[1] == u:
            return cache[2]
        opts = self._opts
        bs = opts.batch_size
        used = len(self) * bs if opts.drop_last else self.num_samples
        lo = u * opts.bucket * bs
        hi = min(lo + opts.bucket * bs, used)
        ids = self._order().ids(np.arange(lo, hi, dtype=np.int64))
        field = next(f for f in self._fields.values() if f.has_lengths)
        ids = ids[np.argsort(field.lengths(ids), kind="stable")]
        groups = [ids[i:i + bs] for i in range(0, len(ids), bs)]
        rng = np.random.Generator(np.random.PCG64([opts.seed, self._epoch, 3, opts.rank, u]))
        groups = [groups[i] for i in rng.permutation(len(groups)).tolist()]
        self._bucket_cache = (self._epoch, u, groups)
        return groups

    def _pack_plan(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, cumulative token counts) of this rank's token stream for pack mode."""
        cache = self._pack_cache
        if cache is not None and cache[0] == self._epoch:
            return cache[1], cache[2]
        order = self._order()
        ids = order.ids(np.arange(order.num_samples, dtype=np.int64))
        lens = self._pack_field.lengths(ids)
        if self._n < 2**31:
            ids = ids.astype(np.int32)  # 4 + 8 bytes per sample of the rank: ids and token counts
        if self._opts.truncate:
            lens = np.minimum(lens, self._opts.max_len)
        cum = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lens, out=cum[1:])
        self._pack_cache = (self._epoch, ids, cum)
        return ids, cum

    # -- reading -------------------------------------------------------------------
    def read_batch(self, b: int) -> Any:
        """Batch ``b`` of this rank's current epoch (a pure function of the options, epoch and b)."""
        if self._opts.collate == "pack":
            return self._read_packed(operator.index(b))
        ids = self.batch_ids(b)
        opts = self._opts
        if self._collate_fn is not None:
            cols = {name: f.elements(ids) for name, f in self._fields.items()}
            if self._single:
                return self._collate_fn(next(iter(cols.values())))
            names = list(cols)
            return self._collate_fn([dict(zip(names, row)) for row in zip(*cols.values())])
        parts = {}
        for name, f in self._fields.items():
            if opts.collate == "list":
                parts[name] = {"values": f.elements(ids)}
            else:
                parts[name] = f.pad(ids, opts)
        if self._single:
            out = next(iter(parts.values()))
            out["index"] = ids
            return out
        return {"index": ids, **parts}

    def _read_packed(self, b: int) -> dict[str, np.ndarray]:
        opts = self._opts
        nb = len(self)
        if not 0 <= b < nb:
            raise IndexError(f"batch {b} is out of range: this rank's epoch has {nb} batches")
        ids, cum = self._pack_plan()
        width = opts.max_len
        per = opts.batch_size * width
        t0 = b * per
        t1 = min(t0 + per, int(cum[-1]))
        e0 = int(np.searchsorted(cum, t0, side="right")) - 1
        e1 = int(np.searchsorted(cum, t1, side="left"))
        # pieces: the part of element k (e0 <= k < e1) inside [t0, t1)
        ec = cum[e0:e1 + 1]
        skip = np.maximum(t0 - ec[:-1], 0)  # tokens of the element before t0
        stop = np.minimum(t1 - ec[:-1], ec[1:] - ec[:-1])
        counts = stop - skip
        keep = counts > 0
        pid = ids[e0:e1][keep]
        skip, counts = skip[keep], counts[keep]
        dst = (ec[:-1][keep] + skip - t0).astype(np.int64)
        f = self._pack_field
        starts, _ = f.spans(pid)
        vals = f.values
        out = np.empty(per, dtype=vals.dtype)
        real = int(counts.sum())
        _gather_runs(opts.sp, vals, out, starts + skip, counts, dst)
        out[real:] = opts.pad_for(vals.dtype, f.label)
        # split pieces at row boundaries: segments
        first_row = dst // width
        last_row = (dst + counts - 1) // width
        nsplit = last_row - first_row + 1
        rep = np.repeat(np.arange(len(dst)), nsplit)
        k = np.arange(len(rep)) - np.repeat(np.cumsum(nsplit) - nsplit, nsplit)
        row = first_row[rep] + k
        seg_lo = np.maximum(dst[rep], row * width)
        seg_hi = np.minimum(dst[rep] + counts[rep], (row + 1) * width)
        seg_len = seg_hi - seg_lo
        seg_pos0 = skip[rep] + seg_lo - dst[rep]  # position in the element of the segment's first token
        row_first = np.searchsorted(row, row, side="left")
        seg_num = (np.arange(len(row)) - row_first + 1).astype(np.int32)
        segment_ids = np.zeros(per, dtype=np.int32)
        segment_ids[:real] = np.repeat(seg_num, seg_len)
        positions = np.zeros(per, dtype=np.int32)
        positions[:real] = np.arange(real, dtype=np.int64) - np.repeat(seg_lo - seg_pos0, seg_len)
        cu = np.zeros(len(seg_len) + 1, dtype=np.int32)
        np.cumsum(seg_len, out=cu[1:])
        shape = (opts.batch_size, width)
        return {"values": out.reshape(shape), "segment_ids": segment_ids.reshape(shape),
                "positions": positions.reshape(shape), "cu_seqlens": cu,
                "index": pid[rep].astype(np.int64)}

    def __iter__(self) -> Iterator[Any]:
        n = len(self)
        start = self._pos if self._pos < n else 0
        self._pos = start
        if self._prefetch:
            return self._iter_prefetch(start, n)
        return self._iter_plain(start, n)

    def _iter_plain(self, start: int, n: int) -> Iterator[Any]:
        epoch = self._epoch
        for b in range(start, n):
            batch = self.read_batch(b)
            if self._epoch == epoch:
                self._pos = b + 1
            yield batch

    def _iter_prefetch(self, start: int, n: int) -> Iterator[Any]:
        q: queue.Queue[Any] = queue.Queue(maxsize=self._prefetch)
        stop = threading.Event()
        epoch = self._epoch

        def work() -> None:
            try:
                for b in range(start, n):
                    item = (b, self.read_batch(b), None)
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            except BaseException as exc:  # handed to the consumer
                q.put((None, None, exc))

        thread = threading.Thread(target=work, name="npystream-prefetch", daemon=True)
        thread.start()
        try:
            for _ in range(start, n):
                b, batch, exc = q.get()
                if exc is not None:
                    raise exc
                if self._epoch == epoch:
                    self._pos = b + 1
                yield batch
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(0.05)

    # -- state ---------------------------------------------------------------------
    def fingerprint(self) -> str:
        """A short hash identifying the source (element count, head and tail of the offsets)."""
        if self._fingerprint is None:
            self._fingerprint = _digest(self._n, *((name, f.fingerprint())
                                                   for name, f in self._fields.items()))
        return self._fingerprint

    def _order_options(self) -> dict[str, Any]:
        o = self._opts
        return {"batch_size": o.batch_size, "shuffle": self._mode, "seed": o.seed,
                "world_size": o.world_size, "drop_last": o.drop_last,
                "collate": o.collate if isinstance(o.collate, str) else "callable",
                "max_len": o.max_len, "truncate": o.truncate, "bucket": o.bucket,
                "block_size": o.block_size if self._mode == "block" else None}

    def state_dict(self) -> dict[str, Any]:
        """Where this loader is: JSON-serialisable; :meth:`load_state_dict` continues from it."""
        return {"version": _STATE_VERSION, "epoch": self._epoch, "batch": self._pos,
                "rank": self._opts.rank, "length": self._n, "fingerprint": self.fingerprint(),
                **self._order_options()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly after the last batch counted in ``state`` (see the module docstring)."""
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION:
            raise StateMismatchError(
                f"not a loader state of version {_STATE_VERSION}: got "
                f"{state.get('version') if isinstance(state, Mapping) else type(state).__name__!r}")
        if state.get("fingerprint") != self.fingerprint() or state.get("length") != self._n:
            raise StateMismatchError(
                f"the state was saved for another source (state: {state.get('length')} elements, "
                f"fingerprint {state.get('fingerprint')!r}; this source: {self._n} elements, "
                f"fingerprint {self.fingerprint()!r}); resume with the source it was saved from")
        for key, mine in self._order_options().items():
            if state.get(key) != mine:
                raise StateMismatchError(
                    f"the state was saved with {key}={state.get(key)!r}, this loader has "
                    f"{key}={mine!r}; build the loader with the same {key} to resume")
        epoch = _positive("epoch", state.get("epoch"), 0)
        pos = _positive("batch", state.get("batch"), 0)
        self._epoch = epoch
        self._pos = pos

    def __repr__(self) -> str:
        o = self._opts
        return (f"BatchLoader({len(self._fields)} field(s), n={self._n}, batch_size={o.batch_size}, "
                f"shuffle={self._mode!r}, rank={o.rank}/{o.world_size}, epoch={self._epoch}, "
                f"batch={self._pos})")


def batches(
    source: Any,
    batch_size: int,
    *,
    shuffle: bool | str = False,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    collate: str | Callable[[list[Any]], Any] = "pad",
    pad_value: Any = 0,
    max_len: int | None = None,
    truncate: bool = False,
    bucket: int | None = None,
    block_size: int = 1 << 16,
    prefetch: int = 0,
) -> BatchLoader:
    """Shuffled, sharded, padded or packed batches of ``source`` for a training loop.

    ``source``: a ragged store (path or :class:`~npystream.RaggedArray`), an
    object ``.npy`` (path or :class:`~npystream.ObjectArray`), a fixed ``.npy``
    (path or array: its rows), any row source with ``len``/``shape``/``dtype``
    and integer-array indexing, or a dict ``name -> source`` of equal lengths.
    See the module docstring for order, sharding, collate and resume.

    >>> import numpy as np, os, tempfile, npystream
    >>> p = os.path.join(tempfile.mkdtemp(), "t.ragged")
    >>> _ = npystream.save_ragged(p, [np.arange(n) for n in (3, 1, 2, 4)])
    >>> b = next(iter(npystream.batches(p, 2)))
    >>> b["values"].tolist(), b["lengths"].tolist(), b["index"].tolist()
    ([[0, 1, 2], [0, 0, 0]], [3, 1], [0, 1])
    """
    opts = _Options()
    opts._pads = {}
    opts.sp = speedups()  # the C gathers, unless NPYSTREAM_PURE_PYTHON is set (read once per loader)
    opts.batch_size = _positive("batch_size", batch_size)
    if shuffle not in (True, False, "full", "block") or isinstance(shuffle, (int, float)) and \
            not isinstance(shuffle, bool):
        raise ValueError(f"shuffle must be True, False, 'full' or 'block', got shuffle={shuffle!r}")
    opts.shuffle = shuffle
    opts.seed = _positive("seed", seed, 0)
    opts.world_size = _positive("world_size", world_size)
    opts.rank = _positive("rank", rank, 0)
    if opts.rank >= opts.world_size:
        raise ValueError(f"rank must be in [0, world_size) = [0, {opts.world_size}), got rank={opts.rank}")
    if not isinstance(drop_last, (bool, np.bool_)):
        raise TypeError(f"drop_last must be True or False, got {drop_last!r}")
    opts.drop_last = bool(drop_last)
    if not (callable(collate) or collate in _COLLATES):
        raise ValueError(f"collate must be 'pad', 'pack', 'list' or a callable, got collate={collate!r}")
    opts.collate = collate
    opts.pad_value = pad_value
    opts.max_len = None if max_len is None else _positive("max_len", max_len)
    if not isinstance(truncate, (bool, np.bool_)):
        raise TypeError(f"truncate must be True or False, got {truncate!r}")
    opts.truncate = bool(truncate)
    if opts.truncate and opts.max_len is None:
        raise ValueError("truncate=True cuts elements to max_len: pass max_len too")
    opts.bucket = None if bucket is None else _positive("bucket", bucket)
    opts.block_size = _positive("block_size", block_size)
    prefetch = _positive("prefetch", prefetch, 0)

    if isinstance(source, Mapping):
        if not source:
            raise ValueError("source is an empty dict: give at least one name -> source")
        fields = {}
        for name, src in source.items():
            if not isinstance(name, str) or name == "index":
                raise ValueError(f"dict source names must be strings other than 'index', got {name!r}")
            fields[name] = make_field(src, f"source[{name!r}]")
        lens = {name: f.n for name, f in fields.items()}
        if len(set(lens.values())) > 1:
            raise ValueError(f"the fields of a dict source must have equal lengths (aligned elements), "
                             f"got lengths {lens}")
        single = False
    else:
        fields = {"": make_field(source, getattr(source, "path", None) or
                                   (os.fspath(source) if isinstance(source, (str, os.PathLike))
                                    else "source"))}
        single = True
    if opts.collate == "pack":
        f = next(iter(fields.values()))
        if not single or not isinstance(f, _RaggedField) or f.ndim != 1:
            raise UnsupportedError(
                "collate='pack' packs the tokens of one ragged store of 1-D arrays (a path or "
                "RaggedArray); convert other sources with npystream.convert(src, 'x.ragged')")
        if opts.max_len is None:
            raise ValueError("collate='pack' needs max_len (the length of each packed row)")
        if opts.bucket is not None:
            raise ValueError("bucket= sorts padded batches by length; collate='pack' has no padding to "
                             "save: drop bucket=")
    if opts.bucket is not None and not any(f.has_lengths for f in fields.values()):
        raise UnsupportedError(
            "bucket= needs element lengths without decoding the elements: a ragged store "
            "(convert an object .npy with npystream.convert(src, 'x.ragged'))")
    return BatchLoader(fields, single, opts, collate if callable(collate) else None, prefetch)
