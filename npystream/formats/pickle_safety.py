"""The safety layer of the object reader: policy, allow-listed globals, checked callables, placeholders.

``np.save`` of an object array writes a pickle that calls only a handful of
callables.  In safe mode (the default) :class:`SafeUnpickler` resolves
globals from an allow-list sufficient for everything ``np.save`` writes and
never hands numpy's dangerous entry points to the pickle directly:

* ``numpy.(_)core.multiarray._reconstruct`` -> :func:`_reconstruct_checked`:
  only as numpy writes it, ``_reconstruct(ndarray, (0,), b'b')``; it returns
  an :class:`ArrayProto` placeholder whose ``__setstate__`` only *records*
  the state.  After each ``load()`` the placeholders are finalised
  (:func:`finalize`): the state is validated (version, shape of non-negative
  ints, a dtype that passes :func:`check_dtype`, a 0/1 Fortran flag, a list
  whose length equals the element count for object dtypes, raw data whose
  size equals the array's bytes otherwise -- numpy segfaults on the last
  two) and the real array is built with numpy's own ``ndarray.__setstate__``
  on the validated state, or, for zero-copy, as a read-only ``np.frombuffer``
  view of the mapped file.  One placeholder gives one array (memo aliasing
  survives).
* ``numpy.ndarray`` -> a token that ``_reconstruct`` accepts and that raises
  when called (``ndarray(shape)`` from a pickle could allocate without bound).
* ``numpy.dtype`` -> a checked constructor (a type-code string, 0/1 flags).
  ``BUILD`` then runs numpy's ``dtype.__setstate__``; every dtype made during
  a load is checked afterwards by :func:`check_dtype` (rebuilt through numpy's
  validating constructor and compared, flags included), before any array is
  made from it.  Callables that use a dtype *during* the load (``scalar``,
  ``_frombuffer``) check it first.
* ``scalar``, ``_frombuffer`` (protocol 5), ``_codecs.encode`` (protocol 2
  bytes), ``bytearray``, ``bytes``: checked wrappers (sizes, types, no
  integer-size allocations).
* ``slice``: checked too -- array and dtype placeholders among its
  arguments are built (their states checked) first, so a slice never holds a
  placeholder.
* ``numpy.record`` -> a token that ``dtype(numpy.record, 0, 1)`` (a record
  dtype, as numpy pickles np.recarray's and np.record's) accepts and that
  raises when called.
* ``set``, ``frozenset`` (protocol 2/3 sets), ``range`` (Python 2 ``xrange``
  after ``fix_imports``): checked wrappers whose output size their arguments
  cannot choose beyond ``MAX_CALL_ITEMS`` and whose items may not collide in
  one hash beyond ``MAX_EQUAL_HASHES`` (:func:`check_item_count`,
  :func:`check_hash_spread`).
* harmless builtins are returned as themselves: ``complex``.
* dtype metadata (``np.dtype(..., metadata={...})``) is kept, as np.load
  keeps it; arrays and dtypes inside it are built and checked.

Anything else raises :class:`~npystream.errors.UnsafePickleError` naming the
global before anything is called; ``allowed_globals`` extends the list
(resolved with the normal ``find_class``), ``trusted=True`` resolves every
global like ``np.load(allow_pickle=True)`` except numpy's ``_reconstruct`` and
``dtype``, which stay checked, and hands ``scalar``/``_frombuffer`` the
real dtype.  A placeholder handed to other code (pandas objects, np.matrix,
np.recarray, np.ma.MaskedArray build themselves from arrays while they are
unpickled) makes the load run again with numpy's real ``_reconstruct`` and
dtypes once every state recorded so far was checked, as
``np.load(allow_pickle=True)`` runs it (``_trusted_rerun`` and
``_rerun_failed`` in pickle_walk, :func:`load_one` for a single pickle).
Safe mode cannot do that without handing unchecked arrays to code: ndarray
subclasses and numpy.ma's reconstructor are refused even when named in
``allowed_globals`` (:func:`refusal` says to pass ``trusted=True``), and an
allowed class whose code fails on a placeholder is refused with the same
advice.  Persistent ids and extension codes are refused by the scanner in
both modes.

A wrapper returned for a global that is itself a value (an object array
holding the class ``bytearray``, say) is mapped back to the real object, as a
whole element and inside lists, dicts (keys too), tuples and sets; so are
array and dtype placeholders.  With ``allowed_globals``, an allowed class's
instance that received a placeholder makes the load run once more with real
objects after every state was checked (``_trusted_rerun`` in pickle_walk).
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import functools
import importlib
import pickle
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from npystream.errors import FormatError, UnsafePickleError
from npystream.formats import pickle_ops

__all__ = [
    "SafetyPolicy",
    "SafeUnpickler",
    "ArrayProto",
    "DtypeProto",
    "check_dtype_state",
    "PickleDecodeError",
    "check_dtype",
    "finalize",
    "MAX_NESTING",
]

MAX_NESTING = pickle_ops.MAX_NESTING  # the scan's limit, read from pickle_ops when a walk checks it
_MISSING = object()
_INT64_MAX = 2**63 - 1
_SWAPPED = ">" if sys.byteorder == "little" else "<"


class PickleDecodeError(FormatError, UnicodeError):
    """A Python-2 string in the pickle cannot be decoded with the chosen ``encoding``."""


def _core_module(name: str) -> Any:
    for base in ("numpy._core", "numpy.core"):
        try:
            return importlib.import_module(f"{base}.{name}")
        except ImportError:
            continue
    raise ImportError(f"numpy has neither numpy._core.{name} nor numpy.core.{name}")  # pragma: no cover


_multiarray = _core_module("multiarray")
_numeric = _core_module("numeric")
_real_reconstruct = _multiarray._reconstruct
_real_scalar = _multiarray.scalar
_real_frombuffer = getattr(_numeric, "_frombuffer", None)


# ---------------------------------------------------------------------------
# policy


def _norm_global(item: Any) -> str:
    if isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, str) for x in item):
        return f"{item[0]}:{item[1]}"
    if isinstance(item, str) and item:
        if ":" in item:
            return item
        module, dot, name = item.rpartition(".")
        if dot and module and name:
            return f"{module}:{name}"
    raise ValueError(
        f"allowed_globals entries must be 'module.name', 'module:qualname' or (module, qualname) "
        f"pairs, got {item!r}"
    )


@dataclass(frozen=True)
class SafetyPolicy:
    """How much of a pickle to trust: the arguments ``iter_objects``/``open`` take, validated."""

    trusted: bool = False
    allowed_globals: frozenset[str] = field(default_factory=frozenset)
    encoding: str = "ASCII"
    fix_imports: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.trusted, bool):
            raise TypeError(f"trusted must be True or False, got {self.trusted!r}")
        if not isinstance(self.fix_imports, bool):
            raise TypeError(f"fix_imports must be True or False, got {self.fix_imports!r}")
        if not isinstance(self.encoding, str):
            raise TypeError(f"encoding must be a str such as 'ASCII', 'latin1' or 'bytes', got {self.encoding!r}")
        if self.encoding != "bytes":
            try:
                codecs.lookup(self.encoding)
            except LookupError:
                raise ValueError(
                    f"encoding {self.encoding!r} is not a known codec; use 'ASCII' (default), "
                    "'latin1' or 'bytes' like np.load"
                ) from None
        if not isinstance(self.allowed_globals, frozenset) or not all(
            isinstance(x, str) and ":" in x for x in self.allowed_globals
        ):
            raise TypeError("allowed_globals must be built with SafetyPolicy.make()")

    @classmethod
    def make(
        cls,
        *,
        trusted: bool = False,
        allowed_globals: Any = (),
        encoding: str = "ASCII",
        fix_imports: bool = True,
    ) -> SafetyPolicy:
        """Validate user arguments (eagerly) and build a policy."""
        if isinstance(allowed_globals, (str, bytes)):
            raise TypeError(
                "allowed_globals must be an iterable of names such as ['collections.OrderedDict'], "
                f"not a single string {allowed_globals!r}"
            )
        try:
            items = list(allowed_globals or ())
        except TypeError:
            raise TypeError(f"allowed_globals must be an iterable of names, got {allowed_globals!r}") from None
        return cls(
            trusted=trusted,
            allowed_globals=frozenset(_norm_global(x) for x in items),
            encoding=encoding,
            fix_imports=fix_imports,
        )


# ---------------------------------------------------------------------------
# dtype checks


def _shape_count(shape: Any, what: str) -> int:
    if not isinstance(shape, tuple) or not all(type(x) is int for x in shape):
        raise FormatError(f"{what} shape is {shape!r}, expected a tuple of ints")
    n = 1
    for dim in shape:
        if dim < 0:
            raise FormatError(f"{what} shape {shape!r} has a negative dimension")
        n *= dim
    if n > _INT64_MAX:
        raise FormatError(f"{what} shape {shape!r} overflows 64 bits")
    return n


def _rebuild_dtype(d: np.dtype, depth: int = 0) -> np.dtype:
    """Rebuild ``d`` through numpy's validating constructors (which refuse overlapping objects)."""
    if depth > 64:
        raise UnsafePickleError("dtype nested more than 64 levels deep")
    canon = _rebuild_plain(d, depth)
    if d.type is np.record and canon.type is not np.record:  # np.recarray's dtype: keep its scalar type
        canon = np.dtype((np.record, canon))
    if d.metadata is not None:  # np.load keeps user metadata (np.dtype(..., metadata={...}))
        canon = np.dtype(canon, metadata=dict(d.metadata))
    return canon


def _rebuild_plain(d: np.dtype, depth: int) -> np.dtype:
    if d.subdtype is not None:
        base, shape = d.subdtype
        return np.dtype((_rebuild_dtype(base, depth + 1), shape))
    if d.fields is not None and d.names is not None:
        names = list(d.names)
        formats, offsets, titles = [], [], []
        for name in names:
            entry = d.fields[name]
            formats.append(_rebuild_dtype(entry[0], depth + 1))
            offsets.append(entry[1])
            titles.append(entry[2] if len(entry) > 2 else None)
        spec: dict[str, Any] = {"names": names, "formats": formats, "offsets": offsets, "itemsize": d.itemsize}
        if any(t is not None for t in titles):
            spec["titles"] = titles
        return np.dtype(spec, align=d.isalignedstruct)
    return np.dtype(d.str)


def check_dtype(d: Any) -> np.dtype:
    """Refuse a dtype whose state was forged (flags, sizes, overlapping object fields); return a private equal copy.

    Arrays are built with the returned copy, never with the unpickled object:
    a later BUILD in the same pickle could otherwise change a dtype that an
    array already handed out still uses.
    """
    if type(d) is DtypeProto:
        d = d.dtype
    if not isinstance(d, np.dtype):
        raise UnsafePickleError(f"expected a numpy dtype, got {_type_name(d)}")
    try:
        canon = _rebuild_dtype(d)
    except UnsafePickleError:
        raise
    except Exception as exc:
        raise UnsafePickleError(
            f"dtype {d!r} does not pass numpy's own constructor ({type(exc).__name__}: {exc}); "
            "its pickled state was forged"
        ) from None
    if (
        canon != d
        or canon.itemsize != d.itemsize
        or canon.flags != d.flags
        or canon.hasobject != d.hasobject
        or canon.alignment > max(d.alignment, 1) * 64
    ):
        raise UnsafePickleError(
            f"dtype state was forged: got {d!r} (itemsize {d.itemsize}, flags {d.flags}), numpy builds "
            f"{canon!r} (itemsize {canon.itemsize}, flags {canon.flags}) from the same description"
        )
    return canon


# ---------------------------------------------------------------------------
# placeholders and checked callables


_INT32 = 1 << 31


def _dtype_like(x: Any) -> bool:
    return type(x) is DtypeProto or isinstance(x, np.dtype)


def _real_dtype(x: Any) -> Any:
    return x.dtype if type(x) is DtypeProto else x


def _state_error(state: Any, why: str) -> UnsafePickleError:
    return UnsafePickleError(f"dtype state {state!r:.200} refused before numpy sees it: {why}")


def check_dtype_state(state: Any) -> tuple[Any, ...]:
    """Validate the state a pickle's BUILD hands to a dtype; return it with nested placeholders replaced.

    numpy's ``dtype.__setstate__`` trusts the types of what it is given (a
    ``fields`` entry that is not a dict, a field that is not a dtype, ...) and
    can crash the interpreter on a forged state, so the shape numpy writes is
    checked here first: ``(version, byteorder, subarray, names, fields,
    elsize, alignment, flags[, metadata])`` with versions 0-4 and their older
    shorter forms; the dtype is then checked again by :func:`check_dtype`.
    """
    if type(state) is not tuple or not 5 <= len(state) <= 9:
        raise _state_error(state, "expected a tuple of 5 to 9 items")
    n = len(state)
    version = state[0] if n > 5 else 0
    if type(version) is not int or not 0 <= version <= 4:
        raise _state_error(state, "version must be an int from 0 to 4")
    rest = list(state[1:] if n > 5 else state)
    endian = rest[0]
    if endian not in ("<", ">", "|", "=", b"<", b">", b"|", b"=") or type(endian) not in (str, bytes):
        raise _state_error(state, "byte order must be one of < > | =")
    subarray = rest[1]
    if subarray is not None:
        if (
            type(subarray) is not tuple
            or len(subarray) != 2
            or not _dtype_like(subarray[0])
            or type(subarray[1]) is not tuple
            or not all(type(x) is int and 0 <= x < _INT32 for x in subarray[1])
        ):
            raise _state_error(state, "subarray must be (dtype, tuple of ints)")
        rest[1] = (_real_dtype(subarray[0]), subarray[1])
    has_names = n >= 7
    names = rest[2] if has_names else None
    fields = rest[3] if has_names else rest[2]
    if has_names and (names is None) != (fields is None):
        raise _state_error(state, "names and fields must both be given or both be None")
    if names is not None and (
        type(names) is not tuple
        or not all(type(x) in (str, bytes) for x in names)
        or len(set(names)) != len(names)
        or not all(x in fields for x in names)
    ):
        raise _state_error(state, "names must be a tuple of distinct strings, each a key of fields")
    if fields is not None:
        if type(fields) is not dict:
            raise _state_error(state, "fields must be a dict")
        real_fields: dict[Any, Any] = {}
        for key, entry in fields.items():
            if type(entry) is not tuple:
                raise _state_error(state, f"field {key!r:.40} must map to a tuple")
            if type(key) is int:  # versions 0 and 1 keep the names under key -1
                if key != -1 or version > 1 or not all(type(x) in (str, bytes) for x in entry):
                    raise _state_error(state, "only versions 0 and 1 keep a tuple of names under field -1")
                real_fields[key] = entry
                continue
            if (
                type(key) not in (str, bytes)
                or not 2 <= len(entry) <= 3
                or not _dtype_like(entry[0])
                or type(entry[1]) is not int
                or not 0 <= entry[1] < _INT32
                or (len(entry) == 3 and type(entry[2]) not in (str, bytes, type(None)))
            ):
                raise _state_error(state, f"field {key!r:.40} must map to (dtype, offset[, title])")
            real_fields[key] = (_real_dtype(entry[0]), *entry[1:])
        if version <= 1 and -1 not in real_fields:
            raise _state_error(state, "versions 0 and 1 need the names under field -1")
        if has_names:
            rest[3] = real_fields
        else:
            rest[2] = real_fields
    ints = rest[4:] if has_names else rest[3:]
    if n == 9:
        meta = ints.pop()
        if not (
            meta is None
            or type(meta) is dict
            or (
                type(meta) is tuple
                and len(meta) == 2
                and (meta[0] is None or type(meta[0]) is dict)
                and type(meta[1]) is tuple
                and 2 <= len(meta[1]) <= 4
                and type(meta[1][0]) in (str, bytes)
                and all(type(x) is int and -_INT32 <= x < _INT32 for x in meta[1][1:])
            )
        ):
            raise _state_error(state, "metadata must be None, a dict or numpy's datetime tuple")
        user = meta if type(meta) is dict else (meta[0] if type(meta) is tuple else None)
        if user and any(type(x) in _WALK for item in user.items() for x in item):
            # arrays and dtypes in user metadata (np.load keeps them): built and checked now, in place
            _walk(user, LoadContext(False), {}, 0)
    if not all(type(x) is int and -_INT32 <= x < _INT32 for x in ints):
        raise _state_error(state, "element size, alignment and flags must be 32-bit ints")
    return (version, *rest) if n > 5 else tuple(rest)


def _latin1(x: Any) -> Any:
    return x.decode("latin1") if type(x) is bytes else x


def _normal_state(st: tuple[Any, ...]) -> tuple[Any, ...]:
    """A state with the differences of Python 2 and numpy 1.x evened out (byte order as str, datetime unit as bytes, flags).

    What numpy >= 1.23 and 2.x write for the same dtype normalises to the same state.
    """
    out = list(st)
    out[1] = _latin1(out[1])
    if len(out) >= 8 and type(out[7]) is int:
        out[7] &= 0xFF  # numpy 1.x writes the flags byte signed (-112), numpy 2 unsigned (144)
    if len(out) == 9 and type(out[8]) is tuple and len(out[8]) == 2 and type(out[8][1]) is tuple and out[8][1]:
        unit = out[8][1][0]
        # numpy 1.x writes {} where numpy 2 writes None for a datetime dtype without user metadata
        out[8] = (out[8][0] or None, (unit.encode("latin1") if type(unit) is str else unit, *out[8][1][1:]))
    elif len(out) == 9 and out[8] == {}:
        out[8] = None
    return tuple(out)


def _dtype_from_state(base: np.dtype, st: tuple[Any, ...]) -> np.dtype | None:
    """The dtype numpy's constructors build from an 8/9-item state, or None if numpy would not write ``st`` for it.

    ``base`` is ``np.dtype(code)`` from the pickle's ``dtype(code, 0, 1)``.
    The pickle's state is never handed to numpy's ``__setstate__`` this way:
    the dtype is built from its description (byte order, unit, subarray,
    fields, metadata) through numpy's validating constructors, and its own
    state must then equal the pickle's.
    """
    given_meta = st[8] if len(st) == 9 else None  # before _normal_state: numpy 2 keeps numpy 1.x's {}
    st = _normal_state(st)
    _version, endian, subarray, names, fields, elsize, _alignment, flags = st[:8]
    meta = st[8] if len(st) == 9 else None
    try:
        if subarray is not None:
            d = np.dtype((subarray[0], subarray[1]))
        elif names is not None:
            entries = [fields[n] for n in names]
            spec: dict[str, Any] = {
                "names": list(names),
                "formats": [e[0] for e in entries],
                "offsets": [e[1] for e in entries],
                "itemsize": elsize,
            }
            if any(len(e) == 3 and e[2] is not None for e in entries):
                spec["titles"] = [e[2] if len(e) == 3 else None for e in entries]
            d = np.dtype(spec, align=bool(flags & 0x80))  # NPY_ALIGNED_STRUCT
        else:
            text = base.str[1:]
            if base.kind in "mM":
                unit, num = meta[1][0].decode("ascii"), meta[1][1]
                if unit != "generic":
                    text += f"[{num}{unit}]"
            d = np.dtype(text if endian == "|" else endian + text)
        if base.type is np.record:  # dtype(numpy.record, 0, 1): a record dtype (np.recarray, np.record)
            d = np.dtype((np.record, d))
        user_meta = given_meta if type(given_meta) is dict else (given_meta[0] if type(given_meta) is tuple else None)
        if user_meta is not None:  # {} too: numpy 2 keeps numpy 1.x's empty datetime metadata
            d = np.dtype(d, metadata=user_meta)
        mine = _normal_state(d.__reduce__()[2])
        return d if mine == st else None
    except Exception:  # any description numpy's constructors refuse: not a state numpy writes
        return None


class DtypeProto:
    """Placeholder for a dtype made by the pickle: its BUILD state never reaches numpy's ``__setstate__`` unchecked.

    numpy 2.4's ``dtype.__setstate__`` trusts its argument and segfaults on
    several forged states (found by mutating valid files).  Safe mode
    therefore builds the dtype from the state's description with numpy's
    validating constructors and refuses a state that differs from the one
    numpy writes for that dtype (:func:`_dtype_from_state`).  Trusted mode
    falls back to numpy's ``__setstate__`` on a structurally checked state
    for states numpy would not write (as ``np.load`` would run them).
    Consumers unwrap it (``.dtype``); one BUILD only, as numpy writes.
    """

    __slots__ = ("dtype", "built", "trusted")

    def __init__(self, d: np.dtype, trusted: bool = False) -> None:
        self.dtype = d
        self.built = False
        self.trusted = trusted

    def __setstate__(self, state: Any) -> None:
        if self.built:
            raise UnsafePickleError("dtype received a second state (BUILD applied twice); numpy writes one")
        self.built = True
        checked = check_dtype_state(state)
        if len(checked) >= 8:
            canon = _dtype_from_state(self.dtype, checked)
            if canon is not None:
                self.dtype = canon
                return
        if not self.trusted:
            raise _state_error(
                state,
                f"numpy writes a different state for any {self.dtype.str[1:]!r} dtype it builds from this "
                "description (pass trusted=True for a file you wrote)",
            )
        if (self.dtype.kind in "mM") != (len(checked) == 9 and type(checked[8]) is tuple):
            # numpy 2.4 segfaults on a datetime dtype given a state without its unit
            raise _state_error(state, "datetime dtypes need numpy's datetime tuple as metadata, others must not have one")
        endian = checked[1] if len(checked) > 5 else checked[0]
        if (self.dtype.byteorder == "|") != (endian in ("|", b"|")):
            # numpy 2.4 segfaults comparing an object dtype marked big-endian
            raise _state_error(
                state, f"byte order {endian!r} for type code {self.dtype.str[1:]!r}; numpy writes "
                + ("'|'" if self.dtype.byteorder == "|" else "'<' or '>'")
            )
        self.dtype.__setstate__(checked)

    def __reduce__(self) -> Any:  # pragma: no cover - never pickled
        raise TypeError("placeholder")

    def __repr__(self) -> str:  # as messages show it (they never name the placeholder class)
        return repr(self.dtype)


class ArrayProto(list):
    """Placeholder for an ndarray under construction: ``[state]`` after BUILD, ``[DONE, array]`` once built.

    A list subclass whose ``__setstate__`` is ``list.append``, so the C
    unpickler creates and fills it without running any Python code (it is
    made once per array element).  Unhashable, like an ndarray.
    """

    __slots__ = ()
    __setstate__ = list.append

    def __reduce__(self) -> Any:  # pragma: no cover - never pickled
        raise TypeError("placeholder")

    def __repr__(self) -> str:  # as messages show it (they never name the placeholder class)
        return "<ndarray being unpickled>"


DONE = object()  # marks a built placeholder: [DONE, array]


class _Refusing:
    """Base of the wrapper objects handed to the pickle: no state, no attributes to overwrite."""

    __slots__ = ()
    real: Any = None
    label = "?"

    def __setstate__(self, state: Any) -> None:
        raise UnsafePickleError(f"BUILD on the global {self.label} is not something numpy writes")

    def __reduce__(self) -> Any:  # pragma: no cover
        raise TypeError("not picklable")

    def __repr__(self) -> str:
        return f"<npystream safe {self.label}>"


class _NdarrayToken(_Refusing):
    __slots__ = ()
    real = np.ndarray
    label = "numpy.ndarray"

    def __call__(self, *args: Any, **kw: Any) -> Any:
        raise UnsafePickleError("numpy.ndarray called directly (allocates from pickled sizes); numpy never writes that")


NDARRAY_TOKEN = _NdarrayToken()


class _RecordToken(_Refusing):
    """``numpy.record`` in safe mode: what ``dtype(numpy.record, 0, 1)`` needs, refusing to be called.

    numpy pickles a record dtype (np.recarray's, np.record scalars') that way;
    ``numpy.record(n)`` itself would allocate ``n`` bytes, so it is not handed
    to the pickle.
    """

    __slots__ = ()
    real = np.record
    label = "numpy.record"

    def __call__(self, *args: Any, **kw: Any) -> Any:
        raise UnsafePickleError("numpy.record called directly (allocates from pickled sizes); numpy never writes that")


RECORD_TOKEN = _RecordToken()


class _Checked(_Refusing):
    """A checked stand-in for a numpy/builtin callable, bound to one unpickler's load context."""

    __slots__ = ("_fn", "_ctx", "_real", "_label")

    def __init__(self, fn: Any, ctx: LoadContext, real: Any, label: str) -> None:
        self._fn = fn
        self._ctx = ctx
        self._real = real
        self._label = label

    @property
    def real(self) -> Any:  # type: ignore[override]
        return self._real

    @property
    def label(self) -> str:  # type: ignore[override]
        return self._label

    def __call__(self, *args: Any) -> Any:
        return self._fn(self._ctx, *args)


def _type_name(x: Any) -> str:
    """The type of ``x`` as messages name it (placeholders as what they stand for, never by class)."""
    t = type(x)
    if t is ArrayProto:
        return "ndarray"
    if t is DtypeProto:
        return "dtype"
    if isinstance(x, _Refusing):
        return x.label
    return t.__name__


def _flag01(x: Any) -> bool:
    return type(x) in (bool, int) and x in (0, 1)


def _as_text(x: Any) -> str | None:
    if isinstance(x, str):
        return x
    if isinstance(x, bytes):
        try:
            return x.decode("ascii")
        except UnicodeDecodeError:
            return None
    return None


class _ReconstructChecked(_Refusing):
    """The checked ``_reconstruct`` (its own class: it is called once per array, keep it one frame)."""

    __slots__ = ("_ctx",)
    real = _real_reconstruct
    label = "numpy._core.multiarray._reconstruct"

    def __init__(self, ctx: LoadContext) -> None:
        self._ctx = ctx

    def __call__(self, subtype: Any, shape: Any, typecode: Any) -> Any:
        ctx = self._ctx
        if (
            ctx.made is None
            and (subtype is NDARRAY_TOKEN or subtype is np.ndarray)
            and shape == (0,)
            and (typecode == b"b" or typecode == "b")
        ):
            ctx.protos = 1
            return ArrayProto()
        return _reconstruct_checked(self._ctx, subtype, shape, typecode)


def _reconstruct_checked(ctx: LoadContext, subtype: Any, shape: Any, typecode: Any) -> Any:
    if subtype is NDARRAY_TOKEN or subtype is np.ndarray:
        if shape != (0,) or typecode not in (b"b", "b"):
            raise UnsafePickleError(
                f"_reconstruct called with ({shape!r}, {typecode!r}); numpy writes ((0,), b'b')"
            )
        if ctx.real:  # trusted mode's second pass, after every array state of the first was checked
            return _real_reconstruct(np.ndarray, shape, typecode)
        ctx.protos += 1
        proto = ArrayProto()
        if ctx.made is not None:
            ctx.made.append(proto)
        return proto
    if ctx.trusted:
        return _real_reconstruct(subtype, shape, typecode)
    raise UnsafePickleError(
        f"_reconstruct of {getattr(subtype, '__name__', subtype)!r}: only plain numpy.ndarray is allowed "
        "in safe mode; pass trusted=True for ndarray subclasses"
    )


def _dtype_checked(ctx: LoadContext, obj: Any, align: Any = False, copy: Any = False) -> np.dtype:
    # numpy pickles a record dtype (np.recarray, np.record) as dtype(numpy.record, 0, 1): the real
    # class (trusted=True, or named in allowed_globals) or safe mode's token for it
    if obj is RECORD_TOKEN:
        obj = np.record
    text = obj if obj is np.record else _as_text(obj)
    if text is None or (text is not np.record and len(text) > 64) or not _flag01(align) or not _flag01(copy):
        raise UnsafePickleError(
            f"numpy.dtype called with ({obj!r:.80}, {align!r}, {copy!r}); numpy writes (type-code string "
            "or numpy.record, 0|1, 0|1)"
        )
    try:
        # copy=True always: never hand the pickle numpy's shared builtin descriptors to BUILD on
        d = np.dtype(text, align=bool(align), copy=True)
    except Exception as exc:
        raise FormatError(f"bad dtype code {text!r} in pickle ({type(exc).__name__}: {exc})") from None
    if ctx.trusted or ctx.real:
        # numpy's own __setstate__ may build this one (trusted fallback, second pass): check_load checks it
        ctx.dtypes.append(d)
    if ctx.real:  # the second pass: the same states were checked by the first
        return d
    ctx.protos += 1
    proto = DtypeProto(d, ctx.trusted)
    if ctx.made is not None:
        ctx.made.append(proto)
    return proto


def _scalar_checked(ctx: LoadContext, dtype: Any, obj: Any = None) -> Any:
    d = check_dtype(dtype)
    if d.hasobject:
        if d.fields is not None:
            raise UnsafePickleError("numpy scalar of a structured dtype with objects; numpy never writes that")
        return _real_scalar(d, obj)
    if isinstance(obj, str):  # Python-2 string decoded with latin1
        size = len(obj)
    elif isinstance(obj, bytes):
        size = len(obj)
    else:
        raise UnsafePickleError(f"numpy scalar from {_type_name(obj)}; numpy writes bytes")
    if size != d.itemsize:
        raise FormatError(f"numpy scalar of dtype {d} needs {d.itemsize} bytes, pickle gives {size}")
    return _real_scalar(d, obj)


def _scalar_trusted(ctx: LoadContext, dtype: Any, *args: Any) -> Any:
    """trusted=True: numpy's ``scalar`` itself, given the real dtype (the pickle's dtype is a checked placeholder)."""
    return _real_scalar(_real_dtype(dtype), *args)


def _frombuffer_trusted(ctx: LoadContext, buf: Any, dtype: Any, *args: Any) -> Any:
    """trusted=True: numpy's ``_frombuffer`` itself, given the real dtype."""
    return _real_frombuffer(buf, _real_dtype(dtype), *args)


def _slice_checked(ctx: LoadContext, *args: Any) -> slice:
    """``slice(...)`` with real arrays and dtypes: placeholders are built (their states checked) first.

    numpy writes the arguments completely before calling ``slice``, so an array
    placeholder has its state here; one without raises FormatError.
    """
    if any(type(a) in _WALK for a in args):
        seen: dict[int, Any] = {}
        args = tuple((finalize(a, ctx, seen) if type(a) in _WALK else a) for a in args)
    return slice(*args)


def _frombuffer_checked(ctx: LoadContext, buf: Any, dtype: Any, shape: Any, order: Any) -> Any:
    d = check_dtype(dtype)
    if d.hasobject:
        raise UnsafePickleError("_frombuffer with an object dtype")
    n = _shape_count(shape, "_frombuffer")
    try:
        size = memoryview(buf).nbytes
    except TypeError:
        raise UnsafePickleError(f"_frombuffer of {_type_name(buf)}") from None
    if size != n * d.itemsize or order not in ("C", "F", "A", "K"):
        raise FormatError(f"_frombuffer: {size} bytes for shape {shape!r} of {d} ({n * d.itemsize} bytes expected)")
    return _real_frombuffer(buf, d, shape, order)


def _encode_checked(ctx: LoadContext, obj: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "iso-8859-1") or errors != "strict":
        raise UnsafePickleError(f"_codecs.encode({_type_name(obj)}, {encoding!r}); numpy writes (str, 'latin1')")
    return obj.encode("latin1")


def _bytearray_checked(ctx: LoadContext, *args: Any) -> bytearray:
    if not args:
        return bytearray()
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytearray(args[0])
    if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
        return bytearray(args[0], "latin1")
    raise UnsafePickleError(f"bytearray called with {tuple(_type_name(a) for a in args)}; pickle writes bytes")


def _bytes_checked(ctx: LoadContext, *args: Any) -> bytes:
    if not args:
        return b""
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytes(args[0])
    if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
        return args[0].encode("latin1")
    raise UnsafePickleError(f"bytes called with {tuple(_type_name(a) for a in args)}")


# ---------------------------------------------------------------------------
# size checks for allow-listed callables whose output size their arguments choose
#
# ``set(range(2**62))`` is 40 bytes of pickle and both globals are harmless by
# themselves; what they build is not.  Each check below is one small function
# (the C and the pure-Python paths both call them: the callables are resolved
# by ``SafeUnpickler.find_class`` and called by the unpickler).  Raise the
# limits (module attributes, read at each call) or pass ``trusted=True`` for a
# file you wrote.  See docs/limits.md.

MAX_CALL_ITEMS = 1 << 16  # items set()/frozenset() may build from a range (pickle never writes that: sets come as lists)
MAX_EQUAL_HASHES = 1000  # items of one set/frozenset sharing one hash value (insertion is quadratic in it)
_HASH_CHECK_FROM = 64  # smaller collections cannot cost much, whatever their hashes


def _limit_error(what: str, got: int, limit: int, name: str) -> UnsafePickleError:
    return UnsafePickleError(
        f"{what}: {got} items, over the safe-mode limit of {limit}; a file you trust can be read with "
        f"trusted=True, or raise npystream.formats.pickle_safety.{name}"
    )


def range_length(r: range) -> int:
    """The number of items of ``r`` as a Python int (``len()`` overflows past ``sys.maxsize``)."""
    if r.step > 0:
        return max(0, (r.stop - r.start + r.step - 1) // r.step)
    return max(0, (r.start - r.stop - r.step - 1) // -r.step)


def check_item_count(n: int, what: str) -> None:
    """Refuse building more than ``MAX_CALL_ITEMS`` items from one pickled argument."""
    if n > MAX_CALL_ITEMS:
        raise _limit_error(what, n, MAX_CALL_ITEMS, "MAX_CALL_ITEMS")


def check_hash_spread(items: Any, what: str) -> None:
    """Refuse a collection in which more than ``MAX_EQUAL_HASHES`` items share one hash value.

    Inserting k items of one hash into a set or dict costs k*k/2 comparisons
    (100,000 crafted ints: minutes).  Counting the hash values first is linear:
    distinct hash values never collide with each other in the counter.
    """
    if len(items) < _HASH_CHECK_FROM:
        return
    try:
        counts = collections.Counter(map(hash, items))
    except TypeError:
        return  # an unhashable item: set() raises its own TypeError at once
    value, worst = counts.most_common(1)[0]
    if worst <= MAX_EQUAL_HASHES:
        return
    # equal items (one object read back many times, [1] * n) cost nothing to insert: count distinct ones
    distinct = {_identity(x) for x in items if hash(x) == value}
    if len(distinct) > MAX_EQUAL_HASHES:
        raise _limit_error(f"{what} has distinct items that all hash alike (a hash-collision attack)",
                           len(distinct), MAX_EQUAL_HASHES, "MAX_EQUAL_HASHES")


def _identity(x: Any) -> Any:
    """A linear-time stand-in for equality among items of one hash: type and repr (or the object itself)."""
    try:
        return (type(x), repr(x))
    except Exception:  # e.g. an int of more than 4300 digits
        return (type(x), id(x))


_SIZED = (list, tuple, set, frozenset, dict, str, bytes, bytearray)


def _collection_arg(args: Any, what: str) -> Any:
    """The one iterable argument of ``set()``/``frozenset()``, checked for size and hash spread."""
    if not args:
        return ()
    if len(args) != 1:
        raise UnsafePickleError(f"{what} called with {len(args)} arguments; pickle writes one")
    arg = args[0]
    if type(arg) is range:
        check_item_count(range_length(arg), f"{what}({arg!r})")
        items: Any = arg
    elif isinstance(arg, _SIZED):
        items = arg  # already built by the pickle: its size is bounded by the file's bytes
    else:
        raise UnsafePickleError(
            f"{what} of a {_type_name(arg)}; pickle writes a list (safe mode builds sets from "
            "lists, tuples, sets, dicts, strings, bytes and ranges only)"
        )
    check_hash_spread(items, what)
    return items


def _set_checked(ctx: LoadContext, *args: Any) -> set[Any]:
    return set(_collection_arg(args, "set"))


def _frozenset_checked(ctx: LoadContext, *args: Any) -> frozenset[Any]:
    return frozenset(_collection_arg(args, "frozenset"))


def _range_checked(ctx: LoadContext, *args: Any) -> range:
    # a range is lazy (three ints); what consumes it is checked (set, frozenset)
    if not 1 <= len(args) <= 3 or not all(type(a) is int for a in args):
        raise UnsafePickleError(f"range called with {tuple(_type_name(a) for a in args)}; pickle writes ints")
    return range(*args)


_CHECKED: dict[tuple[str, str], tuple[Any, Any]] = {}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core._internal", "numpy._core._internal"):
    _CHECKED[(_mod, "_reconstruct")] = (_reconstruct_checked, _real_reconstruct)
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _CHECKED[(_mod, "scalar")] = (_scalar_checked, _real_scalar)
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _CHECKED[(_mod, "_frombuffer")] = (_frombuffer_checked, _real_frombuffer)
_CHECKED[("numpy", "dtype")] = (_dtype_checked, np.dtype)
_CHECKED[("_codecs", "encode")] = (_encode_checked, codecs.encode)
_CHECKED[("builtins", "bytearray")] = (_bytearray_checked, bytearray)
_CHECKED[("builtins", "bytes")] = (_bytes_checked, bytes)
_CHECKED[("builtins", "slice")] = (_slice_checked, slice)
_CHECKED[("builtins", "set")] = (_set_checked, set)
_CHECKED[("builtins", "frozenset")] = (_frozenset_checked, frozenset)
_CHECKED[("builtins", "range")] = (_range_checked, range)
# trusted=True resolves every global to itself except these (and _reconstruct, dtype):
_TRUSTED: dict[Any, Any] = {
    _scalar_checked: _scalar_trusted,
    _frombuffer_checked: _frombuffer_trusted,
    _slice_checked: _slice_checked,
}

_HARMLESS: dict[tuple[str, str], Any] = {
    ("builtins", "complex"): complex,
    ("numpy", "ndarray"): NDARRAY_TOKEN,
    ("numpy", "record"): RECORD_TOKEN,
}


def _numpy_alias(module: str) -> str:
    """Map numpy.core.* <-> numpy._core.* to whichever the installed numpy has."""
    if module.startswith("numpy.core") and _multiarray.__name__.startswith("numpy._core"):
        return "numpy._core" + module[len("numpy.core") :]
    if module.startswith("numpy._core") and _multiarray.__name__.startswith("numpy.core"):
        return "numpy.core" + module[len("numpy._core") :]
    return module


# ---------------------------------------------------------------------------
# the unpickler


class LoadContext:
    """Per-unpickler bookkeeping for one ``load()``: dtypes to check, placeholders made."""

    __slots__ = ("trusted", "dtypes", "protos", "view", "checked", "made", "real", "copy_unaligned")

    def __init__(self, trusted: bool, track: bool = False) -> None:
        self.trusted = trusted
        # trusted mode, and safe mode with allowed_globals (objects of other classes may hold
        # placeholders): the placeholders made by the current load (see pickle_walk's _run_program)
        self.made: list[Any] | None = [] if trusted or track else None
        self.real = False  # trusted mode's second pass: _reconstruct returns real arrays
        self.dtypes: list[np.dtype] = []
        self.protos = 0  # set once any array placeholder was made (then containers are walked)
        self.view: Any = None
        self.copy_unaligned = False  # zero_copy=True (not "always"): a view of an unaligned payload becomes a copy
        self.checked: dict[int, tuple[Any, ...]] = {}  # id(dtype) -> (dtype, str, names, checked private copy)


class SafeUnpickler(pickle.Unpickler):
    """The C unpickler with the policy's ``find_class`` and our zero-copy ``persistent_load``."""

    def __init__(self, feed: Any, policy: SafetyPolicy, *, zero_copy_view: Any = None) -> None:
        super().__init__(feed, fix_imports=policy.fix_imports, encoding=policy.encoding, errors="strict")
        self.policy = policy
        self.ctx = LoadContext(policy.trusted, track=bool(policy.allowed_globals))
        self.ctx.view = zero_copy_view
        # trusted mode too: numpy's _reconstruct and dtype go through the checked versions
        self.use_protos = True
        self._cache: dict[tuple[str, str], Any] = {}

    @classmethod
    def with_context(cls, feed: Any, policy: SafetyPolicy, ctx: LoadContext) -> SafeUnpickler:
        """An unpickler sharing ``ctx`` (a second run of the same pickle with ``ctx.real`` set)."""
        new = cls(feed, policy)
        new.ctx = ctx
        return new

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401 - pickle API
        key = (module, name)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        value = self._resolve(module, name)
        self._cache[key] = value
        return value

    def _resolve(self, module: str, name: str) -> Any:
        policy = self.policy
        mmod, mname = module, name
        if policy.fix_imports:
            if (module, name) in _compat_pickle.NAME_MAPPING:
                mmod, mname = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                mmod = _compat_pickle.IMPORT_MAPPING[module]
        elif module in ("__builtin__", "copy_reg"):
            raise ModuleNotFoundError(
                f"No module named {module!r} (a Python 2 pickle: pass fix_imports=True, as np.load does by default)"
            )
        key = (mmod, mname)
        if self.use_protos and key in _CHECKED and (
            not policy.trusted or key[1] in ("_reconstruct", "dtype") or _CHECKED[key][0] in _TRUSTED
        ):
            # a stand-in may end up inside a container element: the finaliser walks containers from now on
            self.ctx.protos = self.ctx.protos or 1
            fn, real = _CHECKED[key]
            if policy.trusted:
                fn = _TRUSTED.get(fn, fn)
            if fn is _reconstruct_checked:
                if _FastReconstruct is not None and self.ctx.made is None:
                    ctx = self.ctx
                    return _FastReconstruct(
                        ArrayProto, NDARRAY_TOKEN, np.ndarray, lambda *a: _reconstruct_checked(ctx, *a), ctx
                    )
                return _ReconstructChecked(self.ctx)
            return _Checked(fn, self.ctx, real, f"{mmod}.{mname}")
        if policy.trusted:
            return self._find_real(module, name)
        if key in _HARMLESS:
            return _HARMLESS[key]
        if not _trusted_only(mmod, mname) and (
            f"{mmod}:{mname}" in policy.allowed_globals or f"{module}:{name}" in policy.allowed_globals
        ):
            return self._find_real(module, name)
        raise UnsafePickleError(refusal(mmod, mname))

    def _find_real(self, module: str, name: str) -> Any:
        alias = _numpy_alias(module)
        if alias != module:
            try:
                return super().find_class(alias, name)
            except (ImportError, AttributeError):
                pass
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        view = self.ctx.view
        if view is not None and type(pid) is tuple and len(pid) == 2:
            off, n = pid
            if self.ctx.real:
                return bytes(view[off : off + n])
            return view[off : off + n]
        raise UnsafePickleError("persistent id in the pickle; numpy never writes one")


# ---------------------------------------------------------------------------
# finalisation


def _checked_dtype(ctx: LoadContext, d: Any) -> np.dtype:
    """check_dtype(d), cached per dtype object while its description stays the same."""
    if type(d) is DtypeProto:
        d = d.dtype
    hit = ctx.checked.get(id(d))
    if hit is not None and hit[0] is d and hit[1] == d.str and hit[2] == d.names:
        return hit[3]
    canon = check_dtype(d)
    if len(ctx.checked) > 4096:
        ctx.checked.clear()
    ctx.checked[id(d)] = (d, d.str, d.names, canon)  # holds d: its id cannot be reused meanwhile
    return canon


def _build_array(proto: ArrayProto, ctx: LoadContext, seen: dict[int, Any], depth: int) -> Any:
    if len(proto) != 1:
        if len(proto) == 2 and proto[0] is DONE:
            return proto[1]
        raise FormatError(
            "array placeholder received no state (no BUILD after _reconstruct)"
            if not proto
            else "array placeholder received more than one state (BUILD/APPEND applied twice)"
        )
    state = proto[0]
    # fast path: a 1-d numeric array exactly as numpy writes it
    if type(state) is tuple and len(state) == 5:
        version, shape, d, fortran, raw = state
        if type(d) is DtypeProto:
            d = d.dtype
        if (
            version == 1
            and type(version) is int
            and type(shape) is tuple
            and len(shape) == 1
            and type(shape[0]) is int
            and shape[0] >= 0
            and (fortran is False or fortran is True)
            and isinstance(d, np.dtype)
        ):
            tr = type(raw)
            if tr is bytes:
                dc = _checked_dtype(ctx, d)
                if not dc.hasobject and len(raw) == shape[0] * dc.itemsize:
                    arr = _real_reconstruct(np.ndarray, (0,), b"b")
                    arr.__setstate__((1, shape, dc, fortran, raw))
                    proto[:] = (DONE, arr)
                    return arr
            elif tr is memoryview:  # zero-copy: a read-only view of the mapped file
                dc = _checked_dtype(ctx, d)
                if (
                    not dc.hasobject
                    and dc.itemsize
                    and dc.byteorder != _SWAPPED
                    and raw.nbytes == shape[0] * dc.itemsize
                ):
                    arr = np.frombuffer(raw, dtype=dc)
                    if ctx.copy_unaligned and not arr.flags.aligned:
                        arr = aligned_copy(raw, dc)
                    proto[:] = (DONE, arr)
                    return arr
    if type(state) is not tuple or len(state) not in (4, 5):
        raise FormatError(f"ndarray state is {_type_name(state)} of length {len(state) if isinstance(state, tuple) else '?'}, expected a 5-tuple")
    if len(state) == 5:
        version, shape, dtype, fortran, raw = state
        if type(version) is not int or version != 1:
            raise FormatError(f"ndarray state version {version!r}, expected 1")
    else:
        shape, dtype, fortran, raw = state
    n = _shape_count(shape, "ndarray")
    d = _checked_dtype(ctx, dtype)
    if not _flag01(fortran):
        raise FormatError(f"ndarray Fortran flag is {fortran!r}, expected True or False")
    if d.hasobject:
        if type(raw) is not list:
            raise FormatError(f"object ndarray state holds {_type_name(raw)}, expected a list")
        if len(raw) != n:
            raise FormatError(f"object ndarray of shape {shape} needs {n} items, state list has {len(raw)}")
        for i, item in enumerate(raw):
            if type(item) in _WALK:
                raw[i] = _walk(item, ctx, seen, depth + 1)
        arr = _real_reconstruct(np.ndarray, (0,), b"b")
        arr.__setstate__((1, shape, d, bool(fortran), raw))
    else:
        if isinstance(raw, memoryview):
            size = raw.nbytes
        elif isinstance(raw, (bytes, str)):
            size = len(raw)
        else:
            raise FormatError(f"ndarray raw data is {_type_name(raw)}, expected bytes")
        if size != n * d.itemsize:
            raise FormatError(
                f"ndarray of shape {shape} and dtype {d} needs {n * d.itemsize} bytes, state has {size}"
            )
        if isinstance(raw, memoryview):
            # numpy's __setstate__ byte-swaps non-native data into a native-order copy:
            # a view would differ from np.load, so those arrays are copied like numpy does
            # (an empty array goes through __setstate__ too: numpy's reshape refuses shapes like
            # (2**62, 0) that __setstate__ builds, and every path must give what np.load gives)
            if d.itemsize and n and d.byteorder != _SWAPPED:
                arr = np.frombuffer(raw, dtype=d, count=n)
                if ctx.copy_unaligned and not arr.flags.aligned:
                    arr = aligned_copy(raw, d)
                arr = arr.reshape(shape, order="F" if fortran else "C")
            else:
                raw = bytes(raw)
        if not isinstance(raw, memoryview):
            arr = _real_reconstruct(np.ndarray, (0,), b"b")
            arr.__setstate__((1, shape, d, bool(fortran), raw))
    proto[:] = (DONE, arr)
    return arr


def aligned_copy(raw: Any, dtype: np.dtype) -> np.ndarray:
    """The bytes of ``raw`` as a fresh, aligned 1-D array of ``dtype`` (what ``np.load`` gives for an unaligned payload).

    Copied byte for byte: ``ndarray.copy`` would copy a structured dtype
    field by field and leave its padding bytes unset.
    """
    out = np.empty(len(raw) // dtype.itemsize, dtype=dtype)
    out.view(np.uint8)[:] = np.frombuffer(raw, dtype=np.uint8)
    return out


def _walk(obj: Any, ctx: LoadContext, seen: dict[int, Any], depth: int) -> Any:
    """Replace placeholders inside ``obj`` (lists and dicts in place, tuples rebuilt)."""
    t = type(obj)
    if t is ArrayProto:
        return _build_array(obj, ctx, seen, depth)
    if t is DtypeProto:
        got = seen.get(id(obj))
        if got is None:
            got = seen[id(obj)] = check_dtype(obj.dtype)
        return got
    if t in _TOKENS:  # a checked global kept as a value (np.save of [bytearray, np.ndarray]): the real one
        return obj.real
    if depth > pickle_ops.MAX_NESTING:
        raise FormatError(
            f"containers nested more than {pickle_ops.MAX_NESTING} deep around arrays "
            "(npystream.formats.pickle_ops.MAX_NESTING; raise it, and sys.setrecursionlimit, for deeper data)"
        )
    key = id(obj)
    if key in seen:
        return seen[key]
    if t is list:
        seen[key] = obj
        for i, item in enumerate(obj):
            if type(item) in _WALK:
                obj[i] = _walk(item, ctx, seen, depth + 1)
        return obj
    if t is dict:
        seen[key] = obj
        rekey = False
        for k, v in obj.items():
            if type(v) in _WALK:
                obj[k] = _walk(v, ctx, seen, depth + 1)
            if type(k) in _WALK:  # a dtype placeholder, or a tuple/frozenset that may hold one
                rekey = True
        if rekey:
            items = [((_walk(k, ctx, seen, depth + 1) if type(k) in _WALK else k), v) for k, v in obj.items()]
            if any(a is not b for (a, _), b in zip(items, obj)):
                obj.clear()  # in place: other references to this dict see the same object
                obj.update(items)
        return obj
    if t is set or t is frozenset:
        seen[key] = obj
        items = [(_walk(x, ctx, seen, depth + 1) if type(x) in _WALK else x) for x in obj]
        if any(a is not b for a, b in zip(items, obj)):
            if t is set:
                obj.clear()
                obj.update(items)
            else:
                obj = seen[key] = frozenset(items)
        return obj
    if t is tuple:
        seen[key] = obj
        items = [(_walk(x, ctx, seen, depth + 1) if type(x) in _WALK else x) for x in obj]
        if any(a is not b for a, b in zip(items, obj)):
            new = tuple(items)
            seen[key] = new
            return new
        return obj
    return obj


_CONTAINERS = (list, dict, tuple, set, frozenset)  # the exact types the finaliser looks inside
_WALK = {ArrayProto, DtypeProto, *_CONTAINERS}  # + the wrapper types, below


def _speedups_module() -> Any:
    from npystream._accel import speedups

    module = speedups()
    return module if hasattr(module, "Reconstructor") else None


_SPEEDUPS = _speedups_module()
if _SPEEDUPS is not None:

    class _FastReconstruct(_SPEEDUPS.Reconstructor, _Refusing):  # type: ignore[misc,name-defined]
        """The checked ``_reconstruct`` in C (same checks as :class:`_ReconstructChecked`)."""

        __slots__ = ()
        real = _real_reconstruct
        label = "numpy._core.multiarray._reconstruct"

    build_arrays_c = _SPEEDUPS.build_arrays
    _has_special = getattr(_SPEEDUPS, "has_special", None)
else:
    _FastReconstruct = None  # type: ignore[assignment,misc]
    build_arrays_c = None
    _has_special = None

TOKEN_TYPES = tuple(
    t for t in (_Checked, _NdarrayToken, _RecordToken, _ReconstructChecked, _FastReconstruct) if t is not None
)
_TOKENS = frozenset(TOKEN_TYPES)
_WALK.update(TOKEN_TYPES)
_SPECIAL_TYPES = (ArrayProto, DtypeProto, *TOKEN_TYPES)


def finalize(obj: Any, ctx: LoadContext, seen: dict[int, Any]) -> Any:
    """One element after a load: build placeholders, map wrapper tokens back to the real globals."""
    t = type(obj)
    if t is ArrayProto:
        return _build_array(obj, ctx, seen, 0)
    if isinstance(obj, _Refusing):
        return obj.real
    if t is DtypeProto or isinstance(obj, np.dtype):
        return check_dtype(obj)
    if ctx.protos and t in _WALK:
        # a container: walked in Python only when the C check finds a placeholder or wrapper inside
        # (list-of-dicts files: the walk was a third of the time)
        if _has_special is not None and not _has_special(obj, _SPECIAL_TYPES):
            return obj
        return _walk(obj, ctx, seen, 0)
    return obj


def check_load(ctx: LoadContext) -> None:
    """After a load: check every dtype it made (before any array is built from one).

    The list is emptied even when a check fails: a retry of part of the same
    run (one element at a time, to find the damaged one) must not be blamed
    for a dtype the failed run made.
    """
    if ctx.dtypes:
        try:
            for d in ctx.dtypes:
                check_dtype(d)
        finally:
            ctx.dtypes.clear()


# objects that hold no placeholder: values, and what numpy's scalar and _frombuffer made (they got
# real dtypes)
_LEAVES = frozenset(
    {str, bytes, bytearray, memoryview, int, float, complex, bool, type(None), range, np.ndarray}
)  # (memoryview: a zero-copy payload)
_SEQUENCES = frozenset({ArrayProto, list, tuple, set, frozenset})


def placeholders_escaped(result: Any, made: list[Any]) -> bool:
    """Whether a load that made placeholders also made objects the finaliser cannot look inside.

    The finaliser walks lists, dicts, tuples, sets and object arrays; an
    object of any other class (a constructor's result, an object whose
    ``__setstate__`` ran) may hold a placeholder -- reachable through it or
    not, it may share one with a container -- so then the load must run again
    with real objects after every state was checked.
    """
    if not made:
        return False
    seen: set[int] = set()
    stack = [result]
    while stack:
        obj = stack.pop()
        t = type(obj)
        if t in _LEAVES or t is DtypeProto or t in _TOKENS:
            continue
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if t is dict:
            stack.extend(obj.values())
            stack.extend(obj.keys())
        elif t in _SEQUENCES:
            stack.extend(obj)
        elif t is slice:  # its arrays and dtypes are real (the checked slice); other objects may not be
            stack.extend((obj.start, obj.stop, obj.step))
        elif isinstance(obj, np.dtype):
            continue
        elif isinstance(obj, np.generic) and not (isinstance(obj, np.void) and obj.dtype.hasobject):
            continue
        else:
            return True
    return False


def check_made(ctx: LoadContext, made: list[Any], failed: bool = False) -> None:
    """Check every dtype and array state a load recorded (FormatError/UnsafePickleError for a forged one); empties ``made``.

    Before a second run with numpy's real ``_reconstruct`` and dtypes.  After a
    failed load an array placeholder may not have received its state yet.
    """
    check_load(ctx)
    seen: dict[int, Any] = {}
    try:
        for p in made:
            if type(p) is ArrayProto and (p or not failed):
                _build_array(p, ctx, seen, 0)
    finally:
        made.clear()


def load_one(data: Any, policy: SafetyPolicy) -> Any:
    """Unpickle one self-contained pickle (a ragged store's element) under ``policy``, finalised.

    Same rules as the element reader: placeholders are built by the
    finaliser; trusted=True (or a class named in allowed_globals) that hands a
    placeholder to other code runs the pickle again with real arrays once
    every recorded state was checked; safe mode refuses code that fails on a
    placeholder, naming trusted=True.
    """
    import io

    unpickler = SafeUnpickler(io.BytesIO(data), policy)
    ctx = unpickler.ctx
    made = ctx.made
    try:
        obj = unpickler.load()
    except Exception as exc:
        if not made or isinstance(exc, (FormatError, UnsafePickleError)) or not policy.trusted:
            if made and not isinstance(exc, (FormatError, UnsafePickleError)):
                raise UnsafePickleError(
                    f"this element cannot be built in safe mode ({type(exc).__name__}): an object of a class "
                    "named in allowed_globals that builds itself from arrays or dtypes while it is unpickled "
                    "(pandas objects do) would need them before safe mode has checked them; pass trusted=True "
                    "for a file you trust"
                ) from None
            raise
        obj = None
        check_made(ctx, made, failed=True)
    else:
        check_load(ctx)
        if not made or not placeholders_escaped(obj, made):
            return finalize(obj, ctx, {})
        check_made(ctx, made)
    ctx.real = True
    return SafeUnpickler.with_context(io.BytesIO(data), policy, ctx).load()


def is_allowed(module: str, name: str, policy: SafetyPolicy) -> bool:
    """Whether safe mode resolves ``module.name`` (after the ``fix_imports`` mapping)."""
    if policy.trusted:
        return True
    mmod, mname = module, name
    if policy.fix_imports:
        if (module, name) in _compat_pickle.NAME_MAPPING:
            mmod, mname = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            mmod = _compat_pickle.IMPORT_MAPPING[module]
    key = (mmod, mname)
    return (
        key in _CHECKED
        or key in _HARMLESS
        or (
            (f"{mmod}:{mname}" in policy.allowed_globals or f"{module}:{name}" in policy.allowed_globals)
            and not _trusted_only(mmod, mname)
        )
        or (not policy.fix_imports and module in ("__builtin__", "copy_reg"))  # ImportError later, like np.load
    )


# numpy's ndarray subclasses and the reconstructors numpy pickles them with (numpy 1.x and 2.x paths)
_SUBCLASS_GLOBALS = frozenset(
    f"{m}:{n}"
    for m, n in (
        ("numpy", "matrix"), ("numpy.matrixlib.defmatrix", "matrix"), ("numpy", "recarray"),
        ("numpy.rec", "recarray"), ("numpy.core.records", "recarray"), ("numpy._core.records", "recarray"),
        ("numpy", "memmap"), ("numpy.core.memmap", "memmap"), ("numpy._core.memmap", "memmap"),
        ("numpy.ma.core", "MaskedArray"), ("numpy.ma.core", "_mareconstruct"), ("numpy.ma.core", "mvoid"),
        ("numpy.ma.core", "MaskedConstant"), ("numpy.ma.mrecords", "MaskedRecords"),
        ("numpy.ma.mrecords", "_mrreconstruct"),
    )
)


def _trusted_only(module: str, name: str) -> bool:
    """Whether numpy global ``module.name`` is an ndarray subclass (or numpy.ma's reconstructor): trusted=True only.

    np.matrix, np.recarray, np.ma.MaskedArray (and other ndarray subclasses)
    run their own code on the array state while they are unpickled; safe mode
    checks every array state before any code sees it, so it cannot read them,
    even when named in ``allowed_globals``.  Known names, or a class of a numpy
    module already imported (nothing is imported to find out).
    """
    if f"{module}:{name}" in _SUBCLASS_GLOBALS:
        return True
    if module != "numpy" and not module.startswith("numpy."):
        return False
    obj = sys.modules.get(_numpy_alias(module))
    for part in name.split("."):
        obj = getattr(obj, part, None)
    return isinstance(obj, type) and issubclass(obj, np.ndarray) and obj is not np.ndarray


def refusal(module: str, name: str) -> str:
    """The message refusing global ``module.name`` in safe mode: how to read it (allowed_globals or trusted=True)."""
    if _trusted_only(module, name):
        return (
            f"refused global {module}.{name}: ndarray subclasses run their own code on the arrays while they "
            "are unpickled, which safe mode cannot check first (allowed_globals does not change that); "
            "np.matrix, np.recarray and np.ma.MaskedArray elements are read only with trusted=True, for a "
            "file you trust"
        )
    return (
        f"refused global {module}.{name}: not on the allow-list of what np.save writes; pass "
        f"allowed_globals=['{module}.{name}'] if you trust it, or trusted=True for a file you wrote"
    )


@functools.lru_cache(maxsize=64)
def make_global_check(policy: SafetyPolicy) -> Any:
    """A checker for text GLOBAL/INST arguments (``b"module\\nname\\n"``) used by the scanner; None if trusted.

    One per policy (policies are frozen), its answers remembered per argument
    (a ragged store scans numpy's envelope globals once per element).
    """
    if policy.trusted:
        return None
    seen: dict[bytes, str | None] = {}

    def check(raw: bytes) -> str | None:
        hit = seen.get(raw, _MISSING)
        if hit is _MISSING:
            hit = _check_global(raw)
            if len(seen) < 1024:
                seen[raw] = hit
        return hit  # type: ignore[return-value]

    def _check_global(raw: bytes) -> str | None:
        parts = raw.split(b"\n")
        if len(parts) < 2:
            return "GLOBAL without module and name lines"
        try:
            module, name = parts[0].decode("utf-8"), parts[1].decode("utf-8")
        except UnicodeDecodeError:
            return f"GLOBAL with undecodable names {raw[:80]!r}"
        if is_allowed(module, name, policy):
            return None
        return refusal(module, name)

    return check
