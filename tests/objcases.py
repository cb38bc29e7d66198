"""A catalogue of object-dtype arrays written by this numpy: the oracle corpus for issue 3.

Every :class:`Case` builds an object array (or a structured array with object
fields); :func:`write_case` saves it -- with ``np.save`` (numpy 2.x writes
protocol 4) or, for the other pickle protocols and the numpy-1.x module path,
by hand: the ``.npy`` header numpy would write followed by ``pickle.dump`` of
the array -- and returns ``np.load(path, allow_pickle=True)``, the expected
value.  :func:`expected_elements` lists what a reader must yield, in C order
(``loaded.flat``); :func:`assert_same_element` compares one yielded element
with the expected one exactly and recursively: type, value, dtype (byte order
included), shape, memory order, and aliasing inside the element.

Used by ``tests/test_object_array.py`` and available to any test of
``iter_objects`` / ``ObjectArray``::

    from objcases import CASES, write_case, expected_elements, assert_same_element
"""

from __future__ import annotations

import io
import math
import os
import pickle
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from npystream.verification import equal

__all__ = [
    "Case",
    "CASES",
    "CASE_NAMES",
    "case",
    "write_case",
    "case_bytes",
    "expected_elements",
    "assert_same_element",
    "assert_same_elements",
    "obj_array",
    "npy_preamble",
]


def obj_array(items: Iterable[Any], shape: tuple[int, ...] | None = None, order: str = "C") -> np.ndarray:
    """A 1-D (or reshaped) object array holding exactly ``items`` (no numpy broadcasting of lists)."""
    items = list(items)
    arr = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        arr[i] = item
    if shape is not None:
        arr = arr.reshape(shape)
        if order == "F":
            arr = np.asfortranarray(arr)
    return arr


@dataclass(frozen=True)
class Case:
    """One object array to save and read back.

    ``protocol=None`` saves with ``np.save``; an int writes the pickle by hand
    with that protocol.  ``numpy1=True`` rewrites the global module path
    ``numpy._core`` to ``numpy.core`` as numpy 1.x writers did (protocols 2/3,
    whose GLOBAL opcode is newline-terminated text, so the rewrite is exact).
    ``tags`` group cases for tests (``"arrays"``: has ndarray elements,
    ``"big"``: > 1000 elements or payloads > 64 KiB, ``"nd"``, ``"empty"``,
    ``"zero_d"``, ``"structured"``, ``"memo"``, ``"protocol"``).
    """

    name: str
    make: Callable[[], np.ndarray]
    protocol: int | None = None
    numpy1: bool = False
    tags: frozenset[str] = field(default_factory=frozenset)

    def __repr__(self) -> str:
        return f"Case({self.name!r})"


# ---------------------------------------------------------------------------
# element makers


def save_float32_arrays(path: str | Path, n: int, longest: int, seed: int) -> np.ndarray:
    """Save (np.save) an object array of ``n`` seeded float32 arrays of 0..longest-1 items; return it."""
    rng = np.random.default_rng(seed)
    arr = np.empty(n, dtype=object)
    arr[:] = [rng.standard_normal(int(k)).astype("<f4") for k in rng.integers(0, longest, n)]
    np.save(path, arr, allow_pickle=True)
    return arr


def _ndarrays_every_dtype() -> list[np.ndarray]:
    """One small ndarray per dtype family numpy can put inside an object array."""
    rng = np.random.default_rng(3)
    out: list[np.ndarray] = [np.array([True, False, True])]
    for code in ("i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8"):
        info = np.iinfo(code)
        out.append(np.array([info.min, 0, 1, info.max], dtype="<" + code if code[1] != "1" else code))
    for code in ("<f2", "<f4", "<f8", "<c8", "<c16"):
        out.append(np.array([0.0, -0.0, 1.5, np.inf, -np.inf, np.nan], dtype=code))
    out.append(np.array([1.0, 2.5, np.nan], dtype=np.longdouble))
    out.append(np.array([1 + 2j, np.nan], dtype=np.clongdouble))
    out.append(np.array(["2020-01-01T12:00", "NaT", "1969-12-31"], dtype="M8[ns]"))
    out.append(np.array(["2020-01-01", "NaT"], dtype="M8[D]"))
    out.append(np.array([5, -3, "NaT"], dtype="m8[s]"))
    out.append(np.array(["", "a", "h\u00e9llo", "\U0001f600x"], dtype="<U5"))
    out.append(np.array(["ab", "\u00e9"], dtype=">U2"))
    out.append(np.array([b"", b"ab\x00c", b"\xff\xfe\xfd"], dtype="S4"))
    out.append(np.frombuffer(b"\x00\x01\x02\x03\xff\xfe\xfd\xfc", dtype="V4").copy())
    # big-endian numbers
    for code in (">i2", ">i4", ">i8", ">u4", ">f4", ">f8", ">c16"):
        out.append(np.arange(5).astype(code))
    # structured (aligned and packed), nested structured, subarray fields, big-endian fields
    out.append(np.array([(1, 2.5), (-3, np.nan)], dtype=[("a", "<i4"), ("b", ">f8")]))
    out.append(np.zeros(2, dtype=np.dtype([("a", "u1"), ("b", "<i8")], align=True)))
    nested = np.dtype([("p", [("x", "<f4"), ("y", "<f4")]), ("tag", "S3"), ("v", "<i2", (2, 3))])
    rec = np.zeros(3, dtype=nested)
    rec["p"]["x"] = [1, 2, 3]
    rec["tag"] = [b"a", b"bb", b"ccc"]
    rec["v"] = np.arange(18).reshape(3, 2, 3)
    out.append(rec)
    out.append(np.array([(b"x", "2020-01-01")], dtype=[("k", "S1"), ("t", "M8[s]")]))
    # memory orders and shapes
    out.append(np.asfortranarray(rng.standard_normal((3, 4))))
    out.append(np.asfortranarray(np.arange(24, dtype="<i4").reshape(2, 3, 4)))
    out.append(np.arange(24, dtype=">i2").reshape(2, 3, 4))
    out.append(np.array(7.5))  # 0-d
    out.append(np.array("x", dtype="U1"))  # 0-d unicode
    out.append(np.zeros(0, dtype="<f8"))  # empty
    out.append(np.zeros((0, 3), dtype="<i4"))
    out.append(np.zeros((2, 0), dtype=">f4", order="F"))
    out.append(np.ones((1, 1), dtype="<f4"))  # both C and F contiguous
    # a non-contiguous view: pickling copies it into a contiguous array
    out.append(np.arange(20, dtype="<i8")[::3])
    return out


def _nested_object_arrays() -> list[np.ndarray]:
    inner = obj_array([1, "two", None, [3]])
    return [
        inner,
        obj_array([obj_array([np.arange(3), {"k": obj_array([])}]), 5]),
        obj_array(["a", 1, 2.0, None, b"b", (1,)], shape=(2, 3), order="F"),
        np.array(None, dtype=object),  # 0-d object array as an element
        obj_array([]),
    ]


def _numpy_scalars() -> list[Any]:
    rec_dtype = np.dtype([("a", "<i4"), ("b", "S2")])
    return [
        np.bool_(True),
        np.int8(-5),
        np.int16(300),
        np.int32(-70000),
        np.int64(2**62),
        np.uint8(255),
        np.uint64(2**64 - 1),
        np.float16(0.5),
        np.float32(-0.0),
        np.float64(np.nan),
        np.longdouble("1.5"),
        np.complex64(1 - 2j),
        np.complex128(complex(np.inf, -1)),
        np.str_("np str \u00e9"),
        np.bytes_(b"np\x00bytes"),
        np.datetime64("2021-03-04T05:06:07", "s"),
        np.datetime64("NaT"),
        np.timedelta64(90, "m"),
        np.void(b"\x01\x02\x03"),
        np.zeros(1, dtype=rec_dtype)[0],
        np.array([(5, b"hi")], dtype=[("a", ">i4"), ("b", "S2")])[0],
    ]


def _python_objects() -> list[Any]:
    return [
        None,
        True,
        False,
        0,
        -1,
        255,
        256,
        65535,
        65536,
        2**31 - 1,
        -(2**31),
        2**31,
        2**63,
        -(2**64) - 1,
        2**1000 + 1,
        -(3**400),
        0.0,
        -0.0,
        1.5,
        float("inf"),
        float("-inf"),
        float("nan"),
        1e-310,  # subnormal
        complex(1, -2),
        complex(float("nan"), 0.0),
        "",
        "ascii",
        "h\u00e9llo w\u00f6rld",
        "\U0001f600 astral",
        "nul\x00inside",
        "x" * 300,  # BINUNICODE rather than SHORT_BINUNICODE
        b"",
        b"\x00\xff",
        b"y" * 300,
        bytearray(b"mutable\x00"),
        bytearray(),
        [],
        [1, "a", None],
        [[[]]],
        (),
        (1,),
        (1, 2),
        (1, 2, 3),
        (1, 2, 3, 4),
        ((), ((),)),
        {},
        {"a": 1, 2: "b", (3, 4): [5], None: None, 1.5: b"x", frozenset({1}): True},
        {"nested": {"deeper": {"deepest": [1, {2: 3}]}}},
        set(),
        {1, 2, "three", (4,)},
        frozenset(),
        frozenset({"a", b"b", 3}),
        range(0),
        range(5),
        range(-3, 100, 7),
        range(2**70, 2**71, 2**65),
        slice(None),
        slice(1, 10, 2),
        slice("a", None, [1]),
    ]


def _memo_elements() -> list[Any]:
    """The same objects appearing several times: pickle writes them once and refers back (GET)."""
    shared_list = [1, 2, 3]
    shared_arr = np.arange(4, dtype="<f4")
    shared_str = "shared string " * 3
    shared_dict = {"k": shared_list}
    shared_tuple = (shared_list, "t")
    return [
        shared_list,
        shared_list,
        shared_arr,
        [shared_arr, shared_arr],
        shared_str,
        shared_str,
        shared_dict,
        [shared_dict, shared_list],
        shared_tuple,
        shared_tuple,
        {"again": shared_tuple, "arr": shared_arr},
        shared_arr,
        np.float64(2.5),
        np.float64(2.5),
        np.dtype("<i4").type(7),
    ]


def _mixed(n: int) -> list[Any]:
    """``n`` elements cycling through many kinds (crosses APPENDS batches of 1000)."""
    kinds: list[Callable[[int], Any]] = [
        lambda i: i,
        lambda i: f"s{i}",
        lambda i: np.arange(i % 7, dtype="<i4"),
        lambda i: None,
        lambda i: [i, str(i)],
        lambda i: {"i": i},
        lambda i: float(i) / 3,
        lambda i: bytes([i % 256]) * (i % 5),
        lambda i: np.float32(i),
        lambda i: (i,),
    ]
    return [kinds[i % len(kinds)](i) for i in range(n)]


def _large_payloads() -> list[Any]:
    rng = np.random.default_rng(64)
    return [
        rng.standard_normal(20_000),  # 160,000 bytes: outside any 64 KiB frame
        b"\xab" * 70_000,
        "\u00e9" * 40_000,  # 80,000 UTF-8 bytes
        np.arange(70_000, dtype="<u1"),
        (small := np.arange(3, dtype="<i2")),
        rng.integers(0, 1000, size=(300, 100), dtype="<i8").T,  # Fortran, 240 KB
        bytearray(b"z" * 100_000),
        small,
        list(range(20_000)),  # one element whose opcodes span several frames
    ]


def _structured_object_fields() -> np.ndarray:
    dt = np.dtype([("name", "O"), ("n", "<i4"), ("vals", "O"), ("w", ">f8")])
    arr = np.empty(4, dtype=dt)
    arr[0] = ("alpha", 1, np.arange(3, dtype="<f4"), 0.5)
    arr[1] = (None, -2, {"k": [1, 2]}, np.nan)
    arr[2] = ("gamma", 3, "text", -0.0)
    arr[3] = (b"delta", 4, (1, 2), 1e300)
    return arr


def _structured_nested_object() -> np.ndarray:
    dt = np.dtype([("id", "<i8"), ("meta", [("label", "O"), ("score", "<f4")]), ("pair", "O", (2,))])
    arr = np.zeros((2, 2), dtype=dt)
    for i, idx in enumerate(np.ndindex(2, 2)):
        arr[idx] = (i, (f"l{i}", i / 2), (i, [i]))
    return arr


def _zero_d_dict() -> np.ndarray:
    return np.array({"weights": np.arange(5.0), "names": ["a", "b"], "n": 3}, dtype=object)


def _numpy_scalars_array() -> np.ndarray:
    return obj_array(_numpy_scalars())


CASES: list[Case] = [
    Case("ndarrays_every_dtype", lambda: obj_array(_ndarrays_every_dtype()), tags=frozenset({"arrays"})),
    Case("nested_object_arrays", lambda: obj_array(_nested_object_arrays()), tags=frozenset({"arrays"})),
    Case("numpy_scalars", _numpy_scalars_array),
    Case("python_objects", lambda: obj_array(_python_objects())),
    Case("memo_backrefs", lambda: obj_array(_memo_elements()), tags=frozenset({"memo", "arrays"})),
    Case("zero_d_dict", _zero_d_dict, tags=frozenset({"zero_d"})),
    Case("zero_d_none", lambda: np.array(None, dtype=object), tags=frozenset({"zero_d"})),
    Case("zero_d_array", lambda: obj_array([np.arange(4.0)]).reshape(()), tags=frozenset({"zero_d", "arrays"})),
    Case("empty_1d", lambda: obj_array([]), tags=frozenset({"empty"})),
    Case("empty_2d", lambda: np.empty((0, 3), dtype=object), tags=frozenset({"empty", "nd"})),
    Case("empty_2d_trailing", lambda: np.empty((3, 0), dtype=object), tags=frozenset({"empty", "nd"})),
    Case("one_element", lambda: obj_array(["only"])),
    Case("nd_c", lambda: obj_array(_mixed(24), shape=(2, 3, 4)), tags=frozenset({"nd", "arrays"})),
    Case("nd_fortran", lambda: obj_array(_mixed(12), shape=(3, 4), order="F"), tags=frozenset({"nd", "arrays"})),
    Case(
        "nd_fortran_3d",
        lambda: obj_array(_mixed(30), shape=(2, 3, 5), order="F"),
        tags=frozenset({"nd", "arrays"}),
    ),
    Case("structured_object_fields", _structured_object_fields, tags=frozenset({"structured"})),
    Case("structured_nested_object", _structured_nested_object, tags=frozenset({"structured", "nd"})),
    Case("exactly_1000", lambda: obj_array(_mixed(1000)), tags=frozenset({"arrays"})),
    Case("exactly_1001", lambda: obj_array(_mixed(1001)), tags=frozenset({"arrays"})),
    Case("many_2500", lambda: obj_array(_mixed(2500)), tags=frozenset({"big", "arrays"})),
    Case("large_payloads", lambda: obj_array(_large_payloads()), tags=frozenset({"big", "arrays"})),
    Case(
        "float32_arrays",
        lambda: obj_array(
            np.random.default_rng(1).random(n, dtype=np.float32)
            for n in np.random.default_rng(2).integers(1, 400, 50)
        ),
        tags=frozenset({"arrays"}),
    ),
    Case("strings_3000", lambda: obj_array(f"str-{i}" for i in range(3000)), tags=frozenset({"big"})),
    # numpy appends a lone element with APPEND, no MARK: one that starts with its own MARK (a tuple of
    # 4+ items, a frozenset in protocol 4) used to be taken for an APPENDS batch and refused
    Case("zero_d_long_tuple", lambda: obj_array([(1, "two", 3.0, None)]).reshape(()), tags=frozenset({"zero_d"})),
    Case("one_element_frozenset", lambda: obj_array([frozenset({1, "a"})])),
    Case("one_element_empty_frozenset", lambda: obj_array([frozenset()])),
    Case("batch_of_one_long_tuple", lambda: obj_array(_mixed(1000) + [(1, 2, (3, 4), 5, np.arange(3))]),
         tags=frozenset({"arrays"})),
]

# The same mixed content written with every pickle protocol numpy users meet.
for _proto in (2, 3, 4, 5):
    CASES.append(
        Case(
            f"protocol{_proto}_mixed",
            lambda: obj_array(_mixed(40) + _python_objects()[:30] + _large_payloads()[:2]),
            protocol=_proto,
            tags=frozenset({"protocol", "arrays"}),
        )
    )
    CASES.append(
        Case(
            f"protocol{_proto}_arrays",
            lambda: obj_array(_ndarrays_every_dtype()),
            protocol=_proto,
            tags=frozenset({"protocol", "arrays"}),
        )
    )
    CASES.append(
        Case(
            f"protocol{_proto}_memo",
            lambda: obj_array(_memo_elements()),
            protocol=_proto,
            tags=frozenset({"protocol", "memo", "arrays"}),
        )
    )
    CASES.append(
        Case(
            f"protocol{_proto}_structured",
            _structured_object_fields,
            protocol=_proto,
            tags=frozenset({"protocol", "structured"}),
        )
    )
for _proto in (2, 3):
    CASES.append(
        Case(f"protocol{_proto}_zero_d_long_tuple", lambda: obj_array([(1, 2, 3, 4, frozenset({5}))]).reshape(()),
             protocol=_proto, tags=frozenset({"protocol", "zero_d"}))
    )
# numpy 1.x writers: protocol 3, GLOBAL 'numpy.core.multiarray _reconstruct'.
CASES.append(
    Case(
        "numpy1_protocol3",
        lambda: obj_array(_mixed(30) + _ndarrays_every_dtype()[:10]),
        protocol=3,
        numpy1=True,
        tags=frozenset({"protocol", "arrays"}),
    )
)
CASES.append(
    Case(
        "numpy1_protocol2_fortran",
        lambda: obj_array(_mixed(12), shape=(4, 3), order="F"),
        protocol=2,
        numpy1=True,
        tags=frozenset({"protocol", "nd", "arrays"}),
    )
)

CASE_NAMES: list[str] = [c.name for c in CASES]
_BY_NAME = {c.name: c for c in CASES}
if len(_BY_NAME) != len(CASES):  # pragma: no cover - catalogue bug
    raise RuntimeError("duplicate case names in objcases.CASES")


def case(name: str) -> Case:
    """The case called ``name``."""
    return _BY_NAME[name]


# ---------------------------------------------------------------------------
# writing


def npy_preamble(arr: np.ndarray) -> bytes:
    """The ``.npy`` magic + version-1.0 header numpy writes for ``arr`` (numpy's own function)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(arr))
    return buf.getvalue()


def case_bytes(c: Case) -> bytes:
    """The complete ``.npy`` file for case ``c``, as bytes."""
    arr = c.make()
    if c.protocol is None:
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=True)
        return buf.getvalue()
    body = pickle.dumps(arr, protocol=c.protocol)
    if c.numpy1:
        if c.protocol > 3:
            raise ValueError("numpy1 cases use protocol 2 or 3 (GLOBAL opcode)")
        body = body.replace(b"cnumpy._core.", b"cnumpy.core.")
    return npy_preamble(arr) + body


def write_case(c: Case, path: str | Path) -> np.ndarray:
    """Write case ``c`` to ``path`` and return ``np.load(path, allow_pickle=True)`` (the oracle)."""
    path = Path(path)
    path.write_bytes(case_bytes(c))
    import warnings

    with warnings.catch_warnings():
        # numpy 2 warns when unpickling the numpy-1.x module path numpy.core.
        warnings.simplefilter("ignore", DeprecationWarning)
        return np.load(path, allow_pickle=True)


def expected_elements(loaded: np.ndarray) -> list[Any]:
    """What a streaming reader must yield: the elements in C order (records for structured dtypes)."""
    return list(loaded.flat)


# ---------------------------------------------------------------------------
# exact comparison


def _fail(path: str, msg: str) -> AssertionError:
    return AssertionError(f"at {path or 'element'}: {msg}")


def _same_float(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


def _memory_order(arr: np.ndarray) -> tuple[bool, bool]:
    return bool(arr.flags.c_contiguous), bool(arr.flags.f_contiguous)


def _compare_dtype(got: np.dtype, exp: np.dtype, path: str, seen: dict[int, int]) -> None:
    """dtypes: equal, same byte order, same scalar type (np.record), same user metadata (np.load keeps it)."""
    if got != exp or got.str != exp.str or got.descr != exp.descr or got.type is not exp.type:
        raise _fail(path, f"dtype {got!r} (type {got.type.__name__}) != expected {exp!r} (type {exp.type.__name__})")
    got_meta, exp_meta = _metadata(got), _metadata(exp)
    if (got_meta is None) != (exp_meta is None):
        raise _fail(path, f"dtype metadata {got_meta!r} != expected {exp_meta!r}")
    if exp_meta is not None:
        _compare(dict(got_meta), dict(exp_meta), f"{path}.metadata", {})  # copies: no aliasing


def _metadata(d: np.dtype) -> Any:
    try:
        return d.metadata
    except TypeError:  # numpy 1.x unpickling numpy 2's datetime state leaves it NULL, and .metadata raises
        return None


def _compare(got: Any, exp: Any, path: str, seen: dict[int, int]) -> None:
    if type(got) is not type(exp):
        raise _fail(path, f"type {type(got).__name__} != expected {type(exp).__name__} ({got!r:.80} vs {exp!r:.80})")
    # aliasing inside one element: if the expected object was met before, the
    # got object must be the very object met at that place (pickle memo).
    if isinstance(exp, (list, dict, set, bytearray, np.ndarray)):
        prev = seen.get(id(exp))
        if prev is not None and prev != id(got):
            raise _fail(path, "expected the same object as earlier in this element (a memo back-reference), got a different one")
        seen[id(exp)] = id(got)
    if isinstance(exp, np.dtype):
        _compare_dtype(got, exp, path, seen)
        return
    if isinstance(exp, np.ndarray):
        if got.dtype != exp.dtype or got.dtype.str != exp.dtype.str or got.dtype.descr != exp.dtype.descr:
            raise _fail(path, f"dtype {got.dtype!r} != expected {exp.dtype!r}")
        _compare_dtype(got.dtype, exp.dtype, f"{path}.dtype", seen)
        if got.shape != exp.shape:
            raise _fail(path, f"shape {got.shape} != expected {exp.shape}")
        if _memory_order(got) != _memory_order(exp):
            raise _fail(path, f"memory order (C, F) {_memory_order(got)} != expected {_memory_order(exp)}")
        if exp.dtype.hasobject:
            for idx in np.ndindex(exp.shape):
                _compare(got[idx], exp[idx], f"{path}[{', '.join(map(str, idx))}]", seen)
        elif got.tobytes(order="A") != exp.tobytes(order="A"):
            raise _fail(path, f"array bytes differ: {got!r:.120} vs expected {exp!r:.120}")
        return
    if isinstance(exp, np.generic):
        if got.dtype != exp.dtype or got.dtype.str != exp.dtype.str:
            raise _fail(path, f"scalar dtype {got.dtype!r} != expected {exp.dtype!r}")
        if exp.dtype.hasobject:
            for name in exp.dtype.names or ():
                _compare(got[name], exp[name], f"{path}.{name}", seen)
        elif got.tobytes() != exp.tobytes():
            raise _fail(path, f"scalar bytes differ: {got!r} vs expected {exp!r}")
        return
    if isinstance(exp, float):
        if not _same_float(got, exp):
            raise _fail(path, f"{got!r} != expected {exp!r}")
        return
    if isinstance(exp, complex):
        if not (_same_float(got.real, exp.real) and _same_float(got.imag, exp.imag)):
            raise _fail(path, f"{got!r} != expected {exp!r}")
        return
    if isinstance(exp, (list, tuple)):
        if len(got) != len(exp):
            raise _fail(path, f"length {len(got)} != expected {len(exp)}")
        for i, (g, e) in enumerate(zip(got, exp)):
            _compare(g, e, f"{path}[{i}]", seen)
        return
    if isinstance(exp, dict):
        if list(got.keys()) != list(exp.keys()):
            raise _fail(path, f"keys {list(got)!r:.120} != expected {list(exp)!r:.120}")
        for (gk, gv), (ek, ev) in zip(got.items(), exp.items()):
            _compare(gk, ek, f"{path}<key {ek!r:.30}>", seen)
            _compare(gv, ev, f"{path}[{ek!r:.30}]", seen)
        return
    if isinstance(exp, (set, frozenset)):
        if got != exp:
            raise _fail(path, f"{got!r:.120} != expected {exp!r:.120}")
        got_types = sorted(type(x).__name__ for x in got)
        exp_types = sorted(type(x).__name__ for x in exp)
        if got_types != exp_types:
            raise _fail(path, f"member types {got_types} != expected {exp_types}")
        return
    if isinstance(exp, slice):
        for part in ("start", "stop", "step"):
            _compare(getattr(got, part), getattr(exp, part), f"{path}.{part}", seen)
        return
    if exp is None:
        return
    if got != exp:
        raise _fail(path, f"{got!r:.120} != expected {exp!r:.120}")


def assert_same_element(got: Any, expected: Any) -> None:
    """Assert ``got`` equals ``expected`` exactly: value, type, dtype, shape, memory order, recursively.

    Floats compare bit-for-bit in meaning (NaN equals NaN, ``-0.0`` differs
    from ``0.0``); arrays compare dtype (byte order included), shape,
    C/F-contiguity and raw bytes (object arrays element by element); dicts
    compare key order; objects shared inside ``expected`` must be shared the
    same way inside ``got``.  Writeability is not compared (zero-copy views
    are read-only by design).  It includes :func:`npystream.verification.equal`,
    the one type-and-value rule ``npystream verify`` applies.
    """
    _compare(got, expected, "", {})
    if not equal(got, expected):
        raise AssertionError(f"npystream.verification.equal says they differ: {got!r:.120} vs {expected!r:.120}")


def assert_same_elements(got: Iterable[Any], expected: list[Any]) -> None:
    """Assert a whole sequence of elements matches, naming the first index that differs."""
    n = 0
    for i, g in enumerate(got):
        if i >= len(expected):
            raise AssertionError(f"got more than the {len(expected)} expected elements")
        try:
            assert_same_element(g, expected[i])
        except AssertionError as exc:
            raise AssertionError(f"element {i}: {exc}") from None
        n = i + 1
    if n != len(expected):
        raise AssertionError(f"got {n} elements, expected {len(expected)}")


def through_pipe(data: bytes, **options: Any) -> tuple[list[Any], BaseException | None]:
    """Elements ``iter_objects(**options)`` reads from a real pipe fed by a writer thread; the exception that stopped them."""
    import npystream

    r, w = os.pipe()

    def write() -> None:
        with os.fdopen(w, "wb") as f:
            try:
                f.write(data)
            except BrokenPipeError:
                pass

    writer = threading.Thread(target=write)
    writer.start()
    got: list[Any] = []
    exc: BaseException | None = None
    try:
        with os.fdopen(r, "rb") as f:
            try:
                for x in npystream.iter_objects(f, **options):
                    got.append(x)
            except Exception as e:  # noqa: BLE001 - the caller inspects it
                exc = e
    finally:
        writer.join()
    return got, exc


def assert_same_store(a: Any, b: Any) -> None:
    """Two ragged stores hold the same bytes in every part (values, offsets, shapes, meta.json)."""
    for part in ("values.npy", "offsets.npy", "shapes.npy", "meta.json"):
        pa, pb = os.path.join(a, part), os.path.join(b, part)
        assert os.path.exists(pa) == os.path.exists(pb), part
        if os.path.exists(pa):
            with open(pa, "rb") as fa, open(pb, "rb") as fb:
                assert fa.read() == fb.read(), part
