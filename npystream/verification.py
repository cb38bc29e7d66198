"""Compare two sources element by element, streaming, and report the first difference.

The public function is ``npystream.verify`` (module named ``verification`` so that importing
it never rebinds ``npystream.verify`` to a module).

Sources are anything npystream reads as a sequence of elements: an object
``.npy`` (path, ``.npy.gz``, ``ARCHIVE.npz:MEMBER``), a ragged store
directory, or a fixed-dtype ``.npy`` (its rows along axis 0; a 0-d array
is one element).  Memory: one element of each side at a time (fixed-dtype
files are read in blocks of about 8 MiB).

Equality is strict and has one definition, :func:`equal` (the test suite
checks conversions with it too): the same type (ndarray subclasses and
numpy scalar types included); ndarrays have the same dtype (byte order
included), shape and values (NaN equals NaN; an ``np.memmap`` counts as an
ndarray); numpy scalars the same dtype
and bytes; containers compare recursively (dicts in key order).  A ragged
store gives every element back as it was (``npystream.convert`` keeps
types), so nothing else is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from npystream.elements import close_iter, closing_iter
from npystream.errors import UnsupportedError

__all__ = ["verify", "VerifyResult", "iter_elements", "describe", "equal"]


@dataclass(frozen=True)
class VerifyResult:
    """The outcome: ``equal``, elements compared, and where/how they first differ."""

    equal: bool
    count: int
    index: int | None = None
    message: str = ""

    def __bool__(self) -> bool:
        return self.equal


def describe(x: Any) -> str:
    """A short description of a value for difference reports: type, shape, dtype."""
    if isinstance(x, np.ndarray):
        return f"ndarray shape={x.shape} dtype={x.dtype.str}"
    if isinstance(x, np.generic):
        return f"{type(x).__name__} {x}"
    r = repr(x)
    if len(r) > 60:
        r = r[:57] + "..."
    size = f" len={len(x)}" if isinstance(x, (list, tuple, dict, set, frozenset, str, bytes)) else ""
    return f"{type(x).__name__}{size} {r}"


def equal(a: Any, b: Any) -> bool:
    """Strict element equality: the same type, dtype, shape and value, recursively (NaN == NaN).

    >>> import numpy as np
    >>> equal([1, np.float32(2)], [1, np.float32(2)]), equal([1, 2], (1, 2)), equal(np.float32(2), np.array(2, "f4"))
    (True, False, False)
    """
    return _equal(a, b, set())


def _equal(a: Any, b: Any, active: set[tuple[int, int]]) -> bool:
    """:func:`equal`; ``active`` holds the container pairs being compared (a structure that contains itself)."""
    if type(a) is not type(b) and _storage_type(a) is not _storage_type(b):
        return False
    if isinstance(a, (np.ndarray, np.generic)) and a.dtype != b.dtype:
        return False
    if isinstance(a, (list, tuple, dict, np.ndarray, np.void)):
        pair = (id(a), id(b))
        if pair in active:
            return True  # already being compared further up: equal unless something else differs
        active.add(pair)
        try:
            return _equal_items(a, b, active)
        finally:
            active.discard(pair)
    if isinstance(a, np.generic):
        return a.tobytes() == b.tobytes()
    if isinstance(a, slice):  # its parts may be arrays, whose == is elementwise
        return all(_equal(x, y, active) for x, y in ((a.start, b.start), (a.stop, b.stop), (a.step, b.step)))
    if isinstance(a, float):
        return bool(a == b or (math.isnan(a) and math.isnan(b)))
    if isinstance(a, complex):
        return _equal(a.real, b.real, active) and _equal(a.imag, b.imag, active)
    try:
        return bool(a == b)
    except (ValueError, TypeError):
        return False


def _equal_items(a: Any, b: Any, active: set[tuple[int, int]]) -> bool:
    if isinstance(a, (np.ndarray, np.void)):
        names = a.dtype.names
        if isinstance(a, np.ndarray) and a.shape != b.shape:
            return False
        if names is not None and a.dtype.hasobject:  # records with object fields: field by field
            return all(_equal(a[k], b[k], active) for k in names)
        if isinstance(a, np.void) or a.dtype.kind in "VmM":
            return np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
        if a.dtype.hasobject:
            return all(_equal(x, y, active) for x, y in zip(a.flat, b.flat))
        if a.dtype.kind in "fc":
            return bool(np.array_equal(a, b, equal_nan=True))
        return bool(np.array_equal(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_equal(x, y, active) for x, y in zip(a, b)) and \
            all(_equal(a[k], b[k], active) for k in a)
    return len(a) == len(b) and all(_equal(x, y, active) for x, y in zip(a, b))


def _storage_type(x: Any) -> type:
    """``type(x)``, except that an ``np.memmap`` counts as the ``np.ndarray`` it maps (where it lives, not what it is)."""
    t = type(x)
    return np.ndarray if t is np.memmap else t


def _fixed_rows(source: Any, header: Any) -> Iterator[Any]:
    from npystream.formats.fixed import iter_batches

    batches = iter_batches(source)
    try:
        if header.shape == ():
            yield from batches  # a 0-d array yields itself once
            return
        for block in batches:
            yield from block
    finally:  # closed early (verify stops at a difference): close the file iter_batches opened
        close_iter(batches)


def iter_elements(spec: Any, *, trusted: bool = False, allowed_globals: Any = (), encoding: str = "ASCII",
                  fix_imports: bool = True) -> Iterator[Any]:
    """Elements of a source, one at a time (see the module docstring for what counts as one).

    The safety options are those of :func:`npystream.iter_objects`.
    """
    from npystream.elements import describe_source, open_elements

    info = describe_source(spec)
    if info.kind in ("object", "ragged"):
        return open_elements(info, trusted=trusted, allowed_globals=allowed_globals, encoding=encoding,
                             fix_imports=fix_imports, views=True)
    if info.kind == "fixed":
        if info.member is not None:
            stream = info.open_stream()
            return closing_iter(_fixed_rows(stream, info.header), stream)
        return _fixed_rows(info.spec if info.stream is None else info.stream, info.header)
    raise UnsupportedError(
        "a whole .npz has no single element sequence; name a member as ARCHIVE.npz:MEMBER",
        path=info.label,
    )


_END = object()


def verify(
    a: Any, b: Any, *, trusted: bool = False, allowed_globals: Any = (), encoding: str = "ASCII",
    fix_imports: bool = True,
) -> VerifyResult:
    """Compare sources ``a`` and ``b`` element by element with :func:`equal`; stop at the first difference.

    ``trusted``, ``allowed_globals``, ``encoding`` and ``fix_imports`` are the
    safety policy of :func:`npystream.iter_objects`, for both sources
    (``encoding='latin1'`` reads Python 2 files, like ``np.load``).

    >>> import numpy as np, tempfile, os
    >>> d = tempfile.mkdtemp(); x, y = os.path.join(d, "x.npy"), os.path.join(d, "y.npy")
    >>> np.save(x, np.arange(4)); np.save(y, np.array([0, 1, 5, 3]))
    >>> verify(x, y).message
    'element 2 differs: A int64 2 vs B int64 5'
    """
    from npystream.formats.pickle_safety import SafetyPolicy

    SafetyPolicy.make(trusted=trusted, allowed_globals=allowed_globals, encoding=encoding,
                      fix_imports=fix_imports)  # checks the arguments before anything is opened
    opts = {"trusted": trusted, "allowed_globals": tuple(allowed_globals), "encoding": encoding,
            "fix_imports": fix_imports}
    ia = iter_elements(a, **opts)
    try:
        ib = iter_elements(b, **opts)
    except BaseException:
        close_iter(ia)
        raise
    try:
        return _compare(ia, ib)
    finally:  # a difference stops early: release both sources now, not when collected
        close_iter(ia)
        close_iter(ib)


def _compare(ia: Iterator[Any], ib: Iterator[Any]) -> VerifyResult:
    i = 0
    while True:
        x = next(ia, _END)
        y = next(ib, _END)
        if x is _END and y is _END:
            return VerifyResult(True, i, None, f"{i} elements equal")
        if x is _END or y is _END:
            short, other = ("A", "B") if x is _END else ("B", "A")
            return VerifyResult(
                False, i, i, f"{short} ends after {i} elements, {other} has more (element {i}: "
                f"{describe(y if x is _END else x)})",
            )
        if not equal(x, y):
            return VerifyResult(False, i, i, f"element {i} differs: A {describe(x)} vs B {describe(y)}")
        i += 1
