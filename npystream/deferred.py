"""Deferred elementwise arithmetic over memory-mapped (or any) arrays: :func:`lazy` -> :class:`LazyArray`.

``npystream.lazy(np.load("a.npy", mmap_mode="r")) * 2 + b`` records the
expression and reads nothing.  Work happens only when a value is asked for:

* **indexing** (``b[1]``, ``b[10:20]``, ``b[:, 3]``, ``b[[5, 9]]``, masks) is
  pushed down to the leaves: every leaf is indexed first (a view of a memmap,
  or the selected elements only), then the expression runs on the selection.
  A result with no dimensions left comes back as a numpy scalar, like numpy;
  anything else is again a :class:`LazyArray`;
* **reductions** (``sum mean min max std var prod any all argmin argmax``,
  ``axis=None`` or any single axis, also as ``np.sum(b)``...) and
  **materialising** (``np.asarray(b)``, ``b.compute()``, ``np.add(x, y,
  out=memmap)``, :func:`save_npy`) evaluate the whole expression one block at
  a time (:data:`BLOCK_ELEMENTS` elements, sized for the CPU cache) into a few
  reused scratch buffers, with ``out=`` on numpy's ufunc loops -- never one
  full-size temporary per operation.  Memory stays at a few blocks.

Dtypes follow numpy exactly (NEP 50): every node's dtype is what numpy returns
when the same call is made on zero-size stand-ins of the operands (Python
scalars stay Python scalars, so they stay "weak"), never a guess.

Summation order: a float ``sum``/``mean`` over ``axis=None`` adds each block
pairwise (numpy's own loop), then adds the per-block partial sums pairwise, so
its rounding error is of the order of numpy's (not bit-identical: numpy's
pairwise tree spans the whole array).  Along an axis the blocks are combined
sequentially (numpy also adds sequentially along an outer axis).  ``var`` and
``std`` combine per-block (count, mean, M2) with Chan et al.'s parallel
formula in float64 (complex128), which is at least as accurate as numpy's two
passes.

The expression tree (public, so other back ends can walk it)
-------------------------------------------------------------
``LazyArray.node`` is the root.  Every node has ``shape`` and ``dtype`` (of its
result) and is one of:

* :class:`Leaf` -- ``array``: the wrapped array-like (``np.memmap``,
  ``np.ndarray``, :class:`~npystream.concatenation.ConcatArray`, ...);
* :class:`Call` -- ``func(*args, **kwargs)`` broadcast elementwise, where
  ``func`` is a numpy ufunc, ``np.where`` or ``np.clip``; ``args`` mixes
  nodes and constants (Python/numpy scalars, 0-d arrays); ``which`` is
  ``None``, or the output to keep for ufuncs with several outputs
  (``np.modf``, ``np.divmod``);
* :class:`Cast` -- ``child.astype(dtype, casting=casting)``.

:meth:`LazyArray.evaluate_with` rebuilds the expression over other array types
(``leaf_fn(leaf.array)`` for every leaf, then the recorded calls): with
``dask.array.from_array`` it yields a Dask graph.  :meth:`LazyArray.to_dask`
does that through :mod:`npystream.dask` (the ``dask`` extra).

Bad input raises clearly: operands without a numeric dtype (strings, Python
objects) raise :class:`~npystream.errors.UnsupportedError`; shapes that do not
broadcast raise :class:`~npystream.errors.ShapeError` (a ``ValueError``);
indexing errors are numpy's own ``IndexError``.

>>> import numpy as np, npystream
>>> a = np.arange(6.0)
>>> b = npystream.lazy(a) * 2 + 1
>>> b
LazyArray(shape=(6,), dtype=float64, expr=add(multiply(<ndarray (6,) float64>, 2), 1))
>>> b[2], float(b.sum()), b[1:3].compute().tolist()
(np.float64(5.0), 36.0, [3.0, 5.0])
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import sys
from collections.abc import Callable, Iterator
from mmap import ALLOCATIONGRANULARITY as mmap_granularity
from typing import Any

import numpy as np

from npystream.errors import ShapeError, UnsupportedError

__all__ = ["lazy", "LazyArray", "Leaf", "Call", "Cast", "Node", "save_npy", "BLOCK_ELEMENTS"]

# Elements per block of the fused evaluator.  Measured with
# `python benchmarks/bench_lazy.py --block-sweep --repeat 4` ((a*2+b).sum() over two 1 GiB
# float64 memmaps, 2-core VM, load average 7-9, best of 4): 8Ki 0.97 s, 16Ki 0.96, 32Ki 0.86,
# 64Ki 0.71, 128Ki 0.56, 256Ki 0.62, 1Mi 0.58, 4Mi 0.69; the hand-written 64Ki loop 0.83 s.
# Small blocks pay Python overhead per block, 4Mi ones fall out of the cache.
# 128Ki float64 = 1 MiB per scratch buffer.
BLOCK_ELEMENTS = 1 << 17
# A broadcast operand that is not an ndarray (a concat view, say) is read whole if it
# is at most this large (a row vector or so); larger ones are refused, not loaded.
_SMALL_OPERAND_BYTES = 64 << 20
_REFUSED_KINDS = {"O": "Python objects", "U": "strings", "S": "bytes", "V": "structured or void"}


# --------------------------------------------------------------------------- #
# the expression tree
# --------------------------------------------------------------------------- #


class Node:
    """A node of the expression tree: the result's ``shape`` and ``dtype``."""

    __slots__ = ("shape", "dtype")
    shape: tuple[int, ...]
    dtype: np.dtype


class Leaf(Node):
    """An input array (never read until a value is needed)."""

    __slots__ = ("array",)

    def __init__(self, array: Any) -> None:
        self.array = array
        self.shape = tuple(int(d) for d in np.shape(array)) if isinstance(array, np.generic) \
            else tuple(int(d) for d in array.shape)
        self.dtype = np.dtype(array.dtype)

    def __repr__(self) -> str:
        arr = self.array
        name = getattr(arr, "filename", None)
        label = type(arr).__name__ + (f" {os.path.basename(name)}" if isinstance(name, str) else "")
        return f"<{label} {self.shape} {self.dtype}>"


class Call(Node):
    """``func(*args, **kwargs)`` applied elementwise with broadcasting (``[which]`` if given)."""

    __slots__ = ("func", "args", "kwargs", "which")

    def __init__(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], which: int | None,
                 shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.func = func
        self.args = args
        self.kwargs = kwargs
        self.which = which
        self.shape = shape
        self.dtype = dtype

    def __repr__(self) -> str:
        name = getattr(self.func, "__name__", repr(self.func))
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        tail = f"[{self.which}]" if self.which is not None else ""
        return f"{name}({', '.join(parts)}){tail}"


class Cast(Node):
    """``child.astype(dtype, casting=casting)``."""

    __slots__ = ("child", "casting")

    def __init__(self, child: Node, dtype: np.dtype, casting: str) -> None:
        self.child = child
        self.dtype = dtype
        self.casting = casting
        self.shape = child.shape

    def __repr__(self) -> str:
        return f"astype({self.child!r}, {self.dtype})"


# --------------------------------------------------------------------------- #
# building nodes
# --------------------------------------------------------------------------- #


def _check_dtype(dtype: np.dtype, what: str) -> None:
    kind = _REFUSED_KINDS.get(dtype.kind)
    if kind is not None:
        raise UnsupportedError(
            f"{what} has dtype {dtype} ({kind}); lazy expressions need numeric, bool or "
            "datetime data: convert it first (e.g. np.asarray(x, dtype=float))"
        )


def _operand(x: Any) -> Any:
    """A node for array operands, the value itself for constants (scalars, 0-d arrays)."""
    if isinstance(x, LazyArray):
        return x.node
    if isinstance(x, Node):
        return x
    if isinstance(x, (bool, int, float, complex)):
        return x
    if isinstance(x, np.generic):
        _check_dtype(x.dtype, f"operand {x!r}")
        return x
    if isinstance(x, np.ndarray):
        _check_dtype(x.dtype, f"an array of shape {x.shape}")
        return x if x.ndim == 0 else Leaf(x)
    if isinstance(x, (list, tuple)):
        try:
            arr = np.asarray(x)
        except ValueError as exc:
            raise UnsupportedError(f"cannot make an array from the {type(x).__name__} operand: {exc}") from None
        _check_dtype(arr.dtype, f"a {type(x).__name__} operand")
        return arr if arr.ndim == 0 else Leaf(arr)
    if hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "__getitem__"):
        try:
            dtype = np.dtype(x.dtype)
        except TypeError:
            dtype = None
        if dtype is not None:
            _check_dtype(dtype, f"a {type(x).__name__} of shape {tuple(x.shape)}")
            return Leaf(x)
    raise UnsupportedError(
        f"cannot use a {type(x).__name__} as a lazy operand: expected an array-like with shape, "
        "dtype and slicing (np.memmap, np.ndarray, npystream.concat(...)), a LazyArray or a scalar"
    )


def _standin(x: Any) -> Any:
    return np.empty((0,), x.dtype) if isinstance(x, Node) else x


def _broadcast(args: tuple[Any, ...], what: str) -> tuple[int, ...]:
    shapes = [a.shape if isinstance(a, Node) else np.shape(a) for a in args if a is not None]
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        raise ShapeError(
            f"{what}: operands with shapes {' '.join(str(tuple(s)) for s in shapes)} do not "
            "broadcast together (numpy's rule: trailing dimensions must be equal or 1)"
        ) from None


def _call(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> LazyArray | tuple[LazyArray, ...]:
    """Record ``func(*args, **kwargs)``; dtype(s) from numpy itself on zero-size stand-ins."""
    nodes = tuple(_operand(a) if a is not None else None for a in args)
    name = getattr(func, "__name__", repr(func))
    shape = _broadcast(nodes, name)
    with np.errstate(all="ignore"):
        probe = func(*(_standin(a) for a in nodes), **kwargs)
    if isinstance(probe, tuple):
        return tuple(LazyArray(Call(func, nodes, kwargs, i, shape, np.asarray(p).dtype))
                     for i, p in enumerate(probe))
    return LazyArray(Call(func, nodes, kwargs, None, shape, np.asarray(probe).dtype))


# --------------------------------------------------------------------------- #
# evaluation
# --------------------------------------------------------------------------- #


def _rebuild(node: Node, leaf_value: Callable[[Leaf], Any]) -> Any:
    """Evaluate ``node`` with plain (allocating) calls; each leaf replaced by ``leaf_value(leaf)``."""
    memo: dict[int, Any] = {}

    def run(n: Any) -> Any:
        if not isinstance(n, Node):
            return n
        got = memo.get(id(n))
        if got is not None:
            return got
        if isinstance(n, Leaf):
            value = leaf_value(n)
        elif isinstance(n, Cast):
            value = run(n.child).astype(n.dtype, casting=n.casting)
        else:
            value = n.func(*(run(a) for a in n.args), **n.kwargs)
            if n.which is not None:
                value = value[n.which]
        memo[id(n)] = value
        return value

    return run(node)


def _check_mapping(mm: np.memmap) -> None:
    """Raise TruncatedError when the file under a memmap is now shorter than its mapping.

    Touching such a mapping past the file's end kills the process with SIGBUS.
    """
    mapping = getattr(mm, "_mmap", None)
    if mapping is None:
        return
    try:
        end = mm.offset - mm.offset % mmap_granularity + len(mapping)
        size = mapping.size()  # fstat of the mapping's own descriptor: the file as it is now
    except (OSError, ValueError, TypeError):
        return  # a closed mapping: numpy raises its own error on access
    if size < end:
        from npystream.errors import TruncatedError

        raise TruncatedError(
            f"the file is now {size} bytes but the memmap covers {end}: it was truncated after it "
            "was opened; reading the mapping would crash the process (SIGBUS): open it again",
            path=getattr(mm, "filename", None), offset=size,
        )


def _prepare(leaf: Leaf, shape: tuple[int, ...]) -> Any:
    """The leaf as something to index with keys of the result's ``shape`` (views; nothing read)."""
    arr = leaf.array
    if isinstance(arr, np.memmap):
        _check_mapping(arr)
    if isinstance(arr, np.ndarray):
        if type(arr) is not np.ndarray:
            arr = arr.view(np.ndarray)  # memmap slices pay __array_finalize__; the bytes are shared
        return arr if arr.shape == shape else np.broadcast_to(arr, shape)
    if leaf.shape == shape:
        return arr
    nbytes = math.prod(leaf.shape) * leaf.dtype.itemsize
    if nbytes > _SMALL_OPERAND_BYTES:
        raise UnsupportedError(
            f"a {type(arr).__name__} of shape {leaf.shape} would have to be broadcast to {shape}; "
            "only np.ndarray/np.memmap operands broadcast without being read: wrap it with "
            "np.asarray() if it fits in memory"
        )
    return np.broadcast_to(np.asarray(arr), shape)


def _select(arr: Any, key: Any) -> Any:
    select = getattr(arr, "select", None)
    if select is not None and not isinstance(arr, np.ndarray):
        from npystream.concatenation import ConcatArray

        if isinstance(arr, ConcatArray):
            return select(key)
    return arr[key]


class _Pool:
    """Reused flat scratch buffers, one list per dtype, each ``capacity`` elements."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.free: dict[np.dtype, list[np.ndarray]] = {}
        self.owner: dict[int, np.ndarray] = {}

    def take(self, dtype: np.dtype, shape: tuple[int, ...], count: int) -> np.ndarray:
        free = self.free.get(dtype)
        flat = free.pop() if free else np.empty(self.capacity, dtype)
        view = flat[:count].reshape(shape)
        self.owner[id(view)] = flat
        return view

    def give(self, view: np.ndarray) -> None:
        flat = self.owner.pop(id(view), None)
        if flat is not None:
            self.free.setdefault(flat.dtype, []).append(flat)


def _block_keys(shape: tuple[int, ...], block: int) -> tuple[int, int, Iterator[tuple[Any, ...]]]:
    """(axis k, elements per index of axis k, keys): C-order blocks of at most ``block`` elements.

    Every key fixes the axes before ``k`` and slices a run of axis ``k``; the
    block is then a contiguous range of the result in C order.
    """
    ndim = len(shape)
    k = ndim - 1
    inner = 1
    while k > 0 and inner * shape[k] <= block:
        inner *= shape[k]
        k -= 1
    rows = max(1, block // inner) if inner <= block else 1
    if inner * shape[k] <= block:
        rows = shape[k]

    def keys() -> Iterator[tuple[Any, ...]]:
        n = shape[k]
        for lead in np.ndindex(*shape[:k]):
            for a in range(0, n, rows):
                yield (*lead, slice(a, min(a + rows, n)))

    return k, inner, keys()


class _Evaluator:
    """Runs one expression block by block into pooled buffers (the fused loop)."""

    def __init__(self, node: Node, shape: tuple[int, ...], block: int | None = None) -> None:
        self.node = node
        self.shape = shape
        self.block = block = BLOCK_ELEMENTS if block is None else block
        self.pool = _Pool(block)
        self.prepared: dict[int, Any] = {}
        self._collect(node)

    def _collect(self, n: Any) -> None:
        if isinstance(n, Leaf):
            if id(n) not in self.prepared:
                self.prepared[id(n)] = _prepare(n, self.shape)
        elif isinstance(n, Cast):
            self._collect(n.child)
        elif isinstance(n, Call):
            for a in n.args:
                self._collect(a)

    def blocks(self) -> Iterator[tuple[tuple[Any, ...], np.ndarray]]:
        """Yield ``(key, value)``; ``value`` is valid only until the next block."""
        k, inner, keys = _block_keys(self.shape, self.block)
        tail = self.shape[k + 1:]
        run = self._run
        for key in keys:
            last = key[-1]
            rows = last.stop - last.start
            value, temp = run(self.node, key, (rows, *tail), rows * inner)
            yield key, value
            if temp:
                self.pool.give(value)

    def _run(self, n: Node, key: tuple[Any, ...], bshape: tuple[int, ...], count: int) -> tuple[Any, bool]:
        if isinstance(n, Leaf):
            return self.prepared[id(n)][key], False
        pool = self.pool
        if isinstance(n, Cast):
            value, temp = self._run(n.child, key, bshape, count)
            out = pool.take(n.dtype, bshape, count)
            np.copyto(out, value, casting=n.casting)
            if temp:
                pool.give(value)
            return out, True
        vals = []
        temps = []
        for a in n.args:
            if isinstance(a, Node):
                v, t = self._run(a, key, bshape, count)
                vals.append(v)
                if t:
                    temps.append(v)
            else:
                vals.append(a)
        func = n.func
        if n.which is None and (isinstance(func, np.ufunc) or func is np.clip):
            out = None
            for t in temps:
                if t.dtype == n.dtype:
                    out = t
                    break
            if out is None:
                out = pool.take(n.dtype, bshape, count)
            func(*vals, out=out, **n.kwargs)
            for t in temps:
                if t is not out:
                    pool.give(t)
            return out, True
        value = func(*vals, **n.kwargs)
        if n.which is not None:
            value = value[n.which]
        for t in temps:
            pool.give(t)
        return value, False


# --------------------------------------------------------------------------- #
# reductions
# --------------------------------------------------------------------------- #

_REDUCE_UFUNC = {"sum": np.add, "prod": np.multiply, "max": np.maximum, "min": np.minimum,
                 "any": np.logical_or, "all": np.logical_and}
_NUMPY_FUNC = {"sum": np.sum, "prod": np.prod, "max": np.max, "min": np.min, "any": np.any,
               "all": np.all, "mean": np.mean, "var": np.var, "std": np.std,
               "argmax": np.argmax, "argmin": np.argmin}


def _mean_acc(dtype: np.dtype, asked: Any) -> np.dtype:
    if asked is not None:
        return np.dtype(asked)
    if dtype.kind in "biu":
        return np.dtype(np.float64)
    if dtype == np.float16:
        return np.dtype(np.float32)
    return dtype


def _nan_better(val: np.ndarray, best: np.ndarray, kind: str) -> Any:
    better = val > best if kind == "argmax" else val < best
    if val.dtype.kind in "fc":
        better = better | (np.isnan(val) & ~np.isnan(best))
    return better


def _reduce(x: LazyArray, kind: str, axis: Any = None, dtype: Any = None, out: Any = None,
            keepdims: bool = False, ddof: float = 0) -> Any:
    node = x.node
    shape = node.shape
    ndim = len(shape)
    np_func = _NUMPY_FUNC[kind]
    extra: dict[str, Any] = {}
    if dtype is not None:
        if kind not in ("sum", "prod", "mean", "var", "std"):
            raise TypeError(f"{kind}() got an unexpected keyword argument 'dtype'")
        extra["dtype"] = dtype
    if kind in ("var", "std"):
        extra["ddof"] = ddof
    if isinstance(axis, tuple):
        axes = sorted({np.lib.array_utils.normalize_axis_index(a, ndim) for a in axis})
        if len(axes) == ndim and kind not in ("argmax", "argmin"):
            axis = None
        elif len(axes) == 1:
            axis = axes[0]
        else:
            raise UnsupportedError(f"{kind}() over several axes {axis!r} is not deferred; reduce one "
                                   "axis at a time (b.sum(axis=0).sum(axis=0)) or pass axis=None")
    if axis is not None:
        if ndim == 0:
            raise np.exceptions.AxisError(axis, 0)
        axis = np.lib.array_utils.normalize_axis_index(int(axis), ndim)
    if math.prod(shape) == 0 or ndim == 0:
        # nothing to stream: numpy decides the value or the error on a zero-size stand-in
        base = np.empty(shape, node.dtype) if ndim else np.asarray(_rebuild(node, lambda lf: lf.array))
        kw = dict(extra, axis=axis)
        if kind not in ("argmax", "argmin"):
            kw["keepdims"] = keepdims
        result = np_func(base, **kw)
        return _finish(result, out)
    with np.errstate(all="ignore"):
        probe = np_func(np.zeros((2,), node.dtype), **extra)
    res_dtype = np.asarray(probe).dtype
    ev = _Evaluator(node, shape)
    k, inner, _ = _block_keys(shape, ev.block)
    # var/std/mean combine partial moments: their intermediate overflow/0-division warnings
    # would not be numpy's; plain reductions keep numpy's own warnings
    with np.errstate(all="ignore") if kind in ("var", "std", "mean") else contextlib.nullcontext():
        if axis is None:
            result = _reduce_all(ev, kind, shape, k, inner, res_dtype, extra, ddof)
        else:
            result = _reduce_axis(ev, kind, shape, k, axis, res_dtype, extra, ddof)
    if keepdims:
        result = np.asarray(result).reshape(
            tuple(1 if (axis is None or i == axis) else d for i, d in enumerate(shape)))
    return _finish(result, out)


def _finish(result: Any, out: Any) -> Any:
    if out is None:
        return result
    out = out[0] if isinstance(out, tuple) else out
    if np.shape(out) != np.shape(result):
        raise ValueError(f"out= has shape {np.shape(out)}, the result has shape {np.shape(result)}")
    np.copyto(out, result, casting="unsafe")
    return out


def _reduce_all(ev: _Evaluator, kind: str, shape: tuple[int, ...], k: int, inner: int,
                res_dtype: np.dtype, extra: dict[str, Any], ddof: float) -> Any:
    n_total = math.prod(shape)
    if kind in _REDUCE_UFUNC:
        uf = _REDUCE_UFUNC[kind]
        partials = []
        kw = {"dtype": res_dtype} if kind in ("sum", "prod") else {}
        for _, blk in ev.blocks():
            part = uf.reduce(blk, axis=None, **kw)
            if kind == "any" and part:
                return np.True_
            if kind == "all" and not part:
                return np.False_
            partials.append(part)
        return uf.reduce(np.asarray(partials, dtype=res_dtype if kind not in ("max", "min") else None),
                         axis=None)
    if kind == "mean":
        acc = _mean_acc(ev.node.dtype, extra.get("dtype"))
        partials = [np.add.reduce(blk, axis=None, dtype=acc) for _, blk in ev.blocks()]
        total = np.add.reduce(np.asarray(partials, dtype=acc), axis=None)
        return np.asarray(np.true_divide(total, n_total)).astype(res_dtype)[()]
    if kind in ("var", "std"):
        n, mean, m2 = 0, 0.0, 0.0
        for _, blk in ev.blocks():
            n, mean, m2 = _chan(n, mean, m2, *_moments(blk, None))
        var = np.asarray(m2 / max(n - ddof, 0) if n - ddof > 0 else np.float64(m2) / 0.0)
        value = np.sqrt(var) if kind == "std" else var
        return np.asarray(value).astype(res_dtype)[()]
    # argmax / argmin: first occurrence; a NaN wins at once, like numpy
    best = None
    best_idx = 0
    uf = np.argmax if kind == "argmax" else np.argmin
    for key, blk in ev.blocks():
        local = int(uf(blk))
        val = blk.reshape(-1)[local] if blk.ndim else blk
        start = _flat_start(key, shape, k, inner)
        if val.dtype.kind in "fc" and np.isnan(val):
            return np.intp(start + local)
        if best is None or bool(_nan_better(np.asarray(val), np.asarray(best), kind)):
            best, best_idx = val.copy(), start + local
    return np.intp(best_idx)


def _flat_start(key: tuple[Any, ...], shape: tuple[int, ...], k: int, inner: int) -> int:
    lead = key[:k]
    pos = int(np.ravel_multi_index(lead, shape[:k])) if k else 0
    return (pos * shape[k] + key[k].start) * inner


def _moments(blk: np.ndarray, axis: int | None) -> tuple[Any, Any, Any]:
    acc = np.complex128 if blk.dtype.kind == "c" else np.float64
    x = np.asarray(blk, dtype=acc)
    n = x.size if axis is None else x.shape[axis]
    mean = x.mean(axis=axis, keepdims=axis is not None)
    dev = x - mean
    if acc is np.complex128:
        m2 = (dev.real ** 2 + dev.imag ** 2).sum(axis=axis)
    else:
        m2 = np.square(dev, out=dev).sum(axis=axis)
    if axis is not None:
        mean = np.squeeze(mean, axis=axis)
    return n, mean, m2


def _chan(na: Any, ma: Any, m2a: Any, nb: Any, mb: Any, m2b: Any) -> tuple[Any, Any, Any]:
    n = na + nb
    if not np.any(na):
        return nb, mb, m2b
    delta = mb - ma
    mean = ma + delta * (nb / n)
    mag = delta.real ** 2 + delta.imag ** 2 if np.iscomplexobj(delta) else delta ** 2
    return n, mean, m2a + m2b + mag * (na * nb / n)


def _reduce_axis(ev: _Evaluator, kind: str, shape: tuple[int, ...], k: int, axis: int,
                 res_dtype: np.dtype, extra: dict[str, Any], ddof: float) -> Any:
    out_shape = shape[:axis] + shape[axis + 1:]
    if kind in ("var", "std"):
        count = np.zeros(out_shape, np.float64)
        acc = np.complex128 if ev.node.dtype.kind == "c" else np.float64
        mean = np.zeros(out_shape, acc)
        m2 = np.zeros(out_shape, np.float64)
    elif kind in ("argmax", "argmin"):
        best = np.zeros(out_shape, ev.node.dtype)
        acc_idx = np.zeros(out_shape, np.intp)
    else:
        acc_dtype = _mean_acc(ev.node.dtype, extra.get("dtype")) if kind == "mean" else res_dtype
        total = np.zeros(out_shape, acc_dtype)
    uf = _REDUCE_UFUNC.get(kind, np.add)
    red_kw = {"dtype": total.dtype} if kind in ("sum", "prod", "mean") else {}
    for key, blk in ev.blocks():
        a = key[k].start
        if axis < k:
            slot = key[:axis] + key[axis + 1:]
            first = key[axis] == 0
            pos = key[axis]
        elif axis == k:
            slot = key[:k]
            first = a == 0
            pos = a
        else:
            slot = key
            first = True
            pos = 0
        bax = None if axis < k else axis - k
        if kind in ("var", "std"):
            if bax is None:
                mb = np.asarray(blk, dtype=mean.dtype)
                nb, m2b = 1, np.where(np.isfinite(mb), 0.0, np.nan)  # numpy: (x - x)**2, NaN for NaN and inf
            else:
                nb, mb, m2b = _moments(blk, bax)
            if first:
                count[slot], mean[slot], m2[slot] = nb, mb, m2b
            else:
                n2, m2_, mm2 = _chan(count[slot], mean[slot], m2[slot], nb, mb, m2b)
                count[slot], mean[slot], m2[slot] = n2, m2_, mm2
            continue
        if kind in ("argmax", "argmin"):
            if bax is None:
                val, idx = blk, pos
            else:
                f = np.argmax if kind == "argmax" else np.argmin
                i = f(blk, axis=bax)
                val = np.take_along_axis(blk, np.expand_dims(i, bax), bax).squeeze(bax)
                idx = i + pos
            if first:
                best[slot] = val
                acc_idx[slot] = idx
            else:
                better = _nan_better(val, best[slot], kind)
                best[slot] = np.where(better, val, best[slot])
                acc_idx[slot] = np.where(better, idx, acc_idx[slot])
            continue
        part = blk if bax is None else uf.reduce(blk, axis=bax, **red_kw)
        if first:
            total[slot] = part
        else:
            total[slot] = uf(total[slot], part)
    if kind in ("var", "std"):
        var = m2 / (count - ddof)
        value = np.sqrt(var) if kind == "std" else var
        return value.astype(res_dtype)
    if kind in ("argmax", "argmin"):
        return acc_idx
    if kind == "mean":
        return np.true_divide(total, shape[axis]).astype(res_dtype)
    return total.astype(res_dtype, copy=False)


# --------------------------------------------------------------------------- #
# the public class
# --------------------------------------------------------------------------- #

_HANDLED_KW = {"dtype", "casting", "signature"}


class LazyArray:
    """A deferred elementwise expression over array-likes; see the module docstring.

    Attributes: ``shape``, ``dtype`` (numpy's result dtype), ``ndim``,
    ``size``, ``nbytes`` (of the result), ``node`` (the expression tree's
    root), ``leaves`` (the input arrays).
    """

    __slots__ = ("node",)
    __hash__ = None  # type: ignore[assignment]  # == is elementwise, like ndarray

    def __init__(self, node: Node) -> None:
        self.node = node

    # --- description ------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self.node.shape

    @property
    def dtype(self) -> np.dtype:
        return self.node.dtype

    @property
    def ndim(self) -> int:
        return len(self.node.shape)

    @property
    def size(self) -> int:
        return math.prod(self.node.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def leaves(self) -> list[Any]:
        """The input arrays, each once, in the order they first appear."""
        found: dict[int, Any] = {}

        def walk(n: Any) -> None:
            if isinstance(n, Leaf):
                found.setdefault(id(n.array), n.array)
            elif isinstance(n, Cast):
                walk(n.child)
            elif isinstance(n, Call):
                for a in n.args:
                    walk(a)

        walk(self.node)
        return list(found.values())

    def __len__(self) -> int:
        if not self.node.shape:
            raise TypeError("len() of unsized object")
        return self.node.shape[0]

    def __repr__(self) -> str:
        return f"LazyArray(shape={self.shape}, dtype={self.dtype}, expr={self.node!r})"

    # --- recording --------------------------------------------------------
    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        out = kwargs.pop("out", None)
        if method == "reduce" and ufunc.__name__ in _UFUNC_REDUCTIONS and len(inputs) == 1:
            kind = _UFUNC_REDUCTIONS[ufunc.__name__]
            axis = kwargs.pop("axis", 0)
            return _reduce(LazyArray(_operand(inputs[0])), kind, axis=axis, out=out, **kwargs)
        if method != "__call__" or ufunc.signature is not None:
            raise UnsupportedError(
                f"np.{ufunc.__name__}.{method} is not deferred by LazyArray; materialise first "
                "with np.asarray(x) (loads it into memory) or reduce with x.sum()/x.max()..."
            )
        bad = set(kwargs) - _HANDLED_KW
        if bad:
            raise UnsupportedError(f"np.{ufunc.__name__}(..., {', '.join(sorted(bad))}=) is not "
                                   "supported on lazy arrays; use np.where(cond, x, y) for where=")
        result = _call(ufunc, inputs, kwargs)
        if out is None:
            return result
        outs = out if isinstance(out, tuple) else (out,)
        results = result if isinstance(result, tuple) else (result,)
        for o, r in zip(outs, results):
            if o is not None:
                r.compute(out=o)
        return out if len(outs) > 1 else outs[0]

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        handler = _FUNCTIONS.get(func)
        if handler is None:
            name = getattr(func, "__name__", repr(func))
            raise UnsupportedError(
                f"np.{name} is not deferred by LazyArray; call np.asarray(x) or x.compute() first "
                "(loads the result into memory), or use its lazy operators, ufuncs, np.where, "
                "np.clip, astype and reductions"
            )
        return handler(*args, **kwargs)

    def astype(self, dtype: Any, casting: str = "unsafe", copy: bool = True) -> LazyArray:
        """Record a cast (numpy's ``casting`` rule is checked now, not when evaluated)."""
        dtype = np.dtype(dtype)
        _check_dtype(dtype, "astype target")
        np.empty((0,), self.dtype).astype(dtype, casting=casting)  # numpy's own TypeError
        return LazyArray(Cast(self.node, dtype, casting))

    def clip(self, min: Any = None, max: Any = None, **kwargs: Any) -> LazyArray:  # noqa: A002
        return _clip(self, min, max, **kwargs)

    # --- values -----------------------------------------------------------
    def __getitem__(self, key: Any) -> Any:
        key = _materialise_key(key)
        shape = self.node.shape
        prepared: dict[int, Any] = {}

        def leaf_value(leaf: Leaf) -> Any:
            return _select(_prepare(leaf, shape), key)

        def rebuild(n: Any) -> Any:
            if not isinstance(n, Node):
                return n
            if id(n) in prepared:
                return prepared[id(n)]
            if isinstance(n, Leaf):
                value = leaf_value(n)
                new: Any = Leaf(value)
            elif isinstance(n, Cast):
                child = rebuild(n.child)
                new = Cast(child, n.dtype, n.casting)
            else:
                args = tuple(rebuild(a) for a in n.args)
                arr_shapes = [a.shape for a in args if isinstance(a, Node)]
                new = Call(n.func, args, n.kwargs, n.which, arr_shapes[0] if arr_shapes else (), n.dtype)
            prepared[id(n)] = new
            return new

        new_root = rebuild(self.node)
        if not new_root.shape:
            value = _rebuild(new_root, lambda lf: lf.array)
            # numpy: a[1, 2] is a scalar but a[..., 1, 2] a 0-d array; the leaves say which
            zero_d = any(isinstance(n, Leaf) and isinstance(n.array, np.ndarray) for n in prepared.values())
            return np.asarray(value) if zero_d else value
        return LazyArray(new_root)

    def __setitem__(self, key: Any, value: Any) -> None:
        raise TypeError("a LazyArray is read-only: it is an expression; write into np.asarray(x) "
                        "or into an output array with np.add(x, y, out=...)")

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self)):
            yield self[i]

    def compute(self, out: Any = None) -> np.ndarray:
        """Evaluate block by block into ``out`` (an array of the result's shape) or a new array."""
        node = self.node
        shape = node.shape
        if out is None:
            if not shape:
                return np.asarray(_rebuild(node, lambda lf: lf.array))
            out = np.empty(shape, node.dtype)
        elif tuple(np.shape(out)) != shape:
            raise ValueError(
                f"out= has shape {tuple(np.shape(out))}, the expression's result has shape {shape}; "
                "create it with npystream.create_npy(path, x.shape, x.dtype)"
            )
        if not shape:
            out[...] = _rebuild(node, lambda lf: lf.array)
            return out
        if math.prod(shape) == 0:
            return out
        for key, value in _Evaluator(node, shape).blocks():
            out[key] = value
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        if copy is False:
            raise ValueError("a LazyArray holds no data to share: np.asarray(x) computes a new array")
        arr = self.compute()
        return arr if dtype is None else arr.astype(dtype, copy=False)

    def evaluate_with(self, leaf_fn: Callable[[Any], Any]) -> Any:
        """Rebuild the expression over other arrays: ``leaf_fn(leaf_array)`` for every leaf.

        The recorded ufuncs, ``np.where``, ``np.clip`` and ``astype`` are applied to
        what ``leaf_fn`` returns (each leaf converted once), e.g.
        ``x.evaluate_with(lambda a: dask.array.from_array(a, chunks=1 << 22))``.
        """
        cache: dict[int, Any] = {}

        def leaf_value(leaf: Leaf) -> Any:
            got = cache.get(id(leaf.array))
            if got is None:
                got = cache[id(leaf.array)] = leaf_fn(leaf.array)
            return got

        return _rebuild(self.node, leaf_value)

    def to_dask(self) -> Any:
        """This expression as a ``dask.array`` (needs ``pip install 'npystream[dask]'``)."""
        try:
            import dask.array  # noqa: F401

            npy_dask = importlib.import_module("npystream.dask")  # not the package attribute: sys.modules decides
        except ImportError as exc:
            raise UnsupportedError(
                f"LazyArray.to_dask() needs Dask and npystream's Dask adapter ({exc}); "
                "install them with: pip install 'npystream[dask]'"
            ) from None
        return npy_dask.to_dask(self)

    def __bool__(self) -> bool:
        return bool(self.compute())

    def __float__(self) -> float:
        return float(self.compute())

    def __int__(self) -> int:
        return int(self.compute())

    def __complex__(self) -> complex:
        return complex(self.compute())

    # --- reductions ---------------------------------------------------------
    def sum(self, axis: Any = None, dtype: Any = None, out: Any = None, keepdims: bool = False) -> Any:
        return _reduce(self, "sum", axis, dtype, out, keepdims)

    def prod(self, axis: Any = None, dtype: Any = None, out: Any = None, keepdims: bool = False) -> Any:
        return _reduce(self, "prod", axis, dtype, out, keepdims)

    def mean(self, axis: Any = None, dtype: Any = None, out: Any = None, keepdims: bool = False) -> Any:
        return _reduce(self, "mean", axis, dtype, out, keepdims)

    def var(self, axis: Any = None, dtype: Any = None, out: Any = None, ddof: float = 0,
            keepdims: bool = False) -> Any:
        return _reduce(self, "var", axis, dtype, out, keepdims, ddof)

    def std(self, axis: Any = None, dtype: Any = None, out: Any = None, ddof: float = 0,
            keepdims: bool = False) -> Any:
        return _reduce(self, "std", axis, dtype, out, keepdims, ddof)

    def min(self, axis: Any = None, out: Any = None, keepdims: bool = False) -> Any:
        return _reduce(self, "min", axis, None, out, keepdims)

    def max(self, axis: Any = None, out: Any = None, keepdims: bool = False) -> Any:
        return _reduce(self, "max", axis, None, out, keepdims)

    def any(self, axis: Any = None, out: Any = None, keepdims: bool = False) -> Any:
        return _reduce(self, "any", axis, None, out, keepdims)

    def all(self, axis: Any = None, out: Any = None, keepdims: bool = False) -> Any:
        return _reduce(self, "all", axis, None, out, keepdims)

    def argmax(self, axis: Any = None, out: Any = None, keepdims: bool = False) -> Any:
        return _reduce(self, "argmax", axis, None, out, keepdims)

    def argmin(self, axis: Any = None, out: Any = None, keepdims: bool = False) -> Any:
        return _reduce(self, "argmin", axis, None, out, keepdims)


def _materialise_key(key: Any) -> Any:
    """LazyArrays used as index arrays or masks are computed first (numpy needs their values)."""
    if isinstance(key, LazyArray):
        return key.compute()
    if isinstance(key, tuple):
        return tuple(k.compute() if isinstance(k, LazyArray) else k for k in key)
    return key


def _ufunc_method(ufunc: np.ufunc, reflected: bool = False) -> Callable[..., Any]:
    if reflected:
        def op(self: LazyArray, other: Any) -> Any:
            return ufunc(other, self)
    else:
        def op(self: LazyArray, other: Any) -> Any:
            return ufunc(self, other)
    return op


for _name, _uf in {"add": np.add, "sub": np.subtract, "mul": np.multiply, "truediv": np.true_divide,
                   "floordiv": np.floor_divide, "mod": np.remainder, "pow": np.power,
                   "and": np.bitwise_and, "or": np.bitwise_or, "xor": np.bitwise_xor,
                   "lshift": np.left_shift, "rshift": np.right_shift}.items():
    setattr(LazyArray, f"__{_name}__", _ufunc_method(_uf))
    setattr(LazyArray, f"__r{_name}__", _ufunc_method(_uf, reflected=True))
for _name, _uf in {"eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal,
                   "gt": np.greater, "ge": np.greater_equal}.items():
    setattr(LazyArray, f"__{_name}__", _ufunc_method(_uf))
LazyArray.__neg__ = lambda self: np.negative(self)  # type: ignore[attr-defined]
LazyArray.__pos__ = lambda self: np.positive(self)  # type: ignore[attr-defined]
LazyArray.__abs__ = lambda self: np.absolute(self)  # type: ignore[attr-defined]
LazyArray.__invert__ = lambda self: np.invert(self)  # type: ignore[attr-defined]
del _name, _uf

_UFUNC_REDUCTIONS = {"add": "sum", "multiply": "prod", "maximum": "max", "minimum": "min",
                     "logical_or": "any", "logical_and": "all"}


def _where(condition: Any, x: Any = None, y: Any = None) -> Any:
    if x is None or y is None:
        raise UnsupportedError("np.where(condition) with one argument (nonzero) is not deferred; "
                               "use np.nonzero(np.asarray(condition))")
    return _call(np.where, (condition, x, y), {})


def _clip(a: Any, a_min: Any = None, a_max: Any = None, **kwargs: Any) -> Any:
    out = kwargs.pop("out", None)
    for k in ("min", "max"):
        if k in kwargs:
            if k == "min":
                a_min = kwargs.pop(k)
            else:
                a_max = kwargs.pop(k)
    if kwargs:
        raise UnsupportedError(f"np.clip(..., {', '.join(kwargs)}=) is not supported on lazy arrays")
    result = _call(np.clip, (a, a_min, a_max), {})
    return result if out is None else result.compute(out=out)


def _reduction_function(kind: str) -> Callable[..., Any]:
    def handler(a: Any, axis: Any = None, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise UnsupportedError(f"np.{kind}: pass options by keyword for lazy arrays")
        return getattr(lazy(a), kind)(axis=axis, **kwargs)
    return handler


_FUNCTIONS: dict[Any, Callable[..., Any]] = {np.where: _where, np.clip: _clip,
                                             np.shape: lambda a: lazy(a).shape,
                                             np.ndim: lambda a: lazy(a).ndim,
                                             np.size: lambda a, axis=None: lazy(a).size if axis is None else lazy(a).shape[axis]}
for _kind, _f in _NUMPY_FUNC.items():
    _FUNCTIONS[_f] = _reduction_function(_kind)
_FUNCTIONS[np.amax] = _FUNCTIONS[np.max]
_FUNCTIONS[np.amin] = _FUNCTIONS[np.min]
del _kind, _f


# --------------------------------------------------------------------------- #
# public functions
# --------------------------------------------------------------------------- #


def lazy(x: Any) -> LazyArray:
    """Wrap an array-like (memmap, ndarray, concat view...) as a :class:`LazyArray`; nothing is read.

    >>> import numpy as np
    >>> lazy(np.arange(4)) + 1
    LazyArray(shape=(4,), dtype=int64, expr=add(<ndarray (4,) int64>, 1))
    """
    if isinstance(x, LazyArray):
        return x
    node = _operand(x)
    if not isinstance(node, Node):
        node = Leaf(np.asarray(node))
    return LazyArray(node)


def save_npy(path: Any, x: Any, *, overwrite: bool = False, progress: bool | None = None,
             durable: bool = False) -> str:
    """Write ``x`` (a LazyArray or any array-like) to a standard ``.npy``, block by block, atomically.

    The file appears at ``path`` only when complete (temp file + rename); its
    header leaves room for the first axis to grow (:func:`npystream.append_npy`).
    ``progress=None`` shows a bar when stderr is a terminal.  A concat view
    along axis 0 of whole C-order files is copied file to file in the kernel
    (``copy_file_range``).  Returns ``path``.
    """
    from npystream._atomic import atomic_output
    from npystream._progress import ByteProgress
    from npystream.concatenation import ConcatArray
    from npystream.formats.npy import encode_header

    path = os.fspath(path)
    if isinstance(x, ConcatArray) and x.copyable():
        return x.save(path, overwrite=overwrite, progress=progress, durable=durable)
    lx = lazy(x)
    shape, dtype = lx.shape, lx.dtype
    header = encode_header(dtype, shape)
    show = sys.stderr.isatty() if progress is None else bool(progress)
    with atomic_output(path, overwrite=overwrite) as tmp, open(tmp, "wb") as f:
        bar = ByteProgress(lx.nbytes, show, "save_npy")
        try:
            f.write(header)
            if shape == ():
                f.write(np.asarray(lx.compute(), dtype=dtype).tobytes())
            elif math.prod(shape):
                # Plain writes of one reused, cache-hot block: measured faster here than a
                # write-behind thread (which needs several rotating buffers) on 2 busy cores.
                for _, value in _Evaluator(lx.node, shape).blocks():
                    data = value if value.flags.c_contiguous else np.ascontiguousarray(value)
                    f.write(data.reshape(-1).view(np.uint8))
                    bar.add(data.nbytes)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        finally:
            bar.close()
    return path
