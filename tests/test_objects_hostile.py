"""Hostile object .npy files, written by hand: every one must raise the right error, naming the byte offset.

Categories (issue 3, "Safe by default"): truncation at every byte, bad length
fields, memo abuse (incl. the 137-byte file that makes CPython allocate
gigabytes), deep nesting, short state lists, forged dtypes, code-execution
globals (a marker file must never appear), INST/OBJ/NEWOBJ, persistent ids,
EXT codes, bad STOP / open MARK, trailing bytes, element count != header
shape.  Elements before the damage must already have been yielded.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hostile_pickles import (
    OBJECT_FLAGS,
    array_elem,
    dtype_ops,
    envelope,
    glob,
    header_len,
    integer,
    npy_file,
    object_array_elem,
    raw_bytes,
    reconstruct_head,
    shape_ops,
    stack_glob,
    uni,
)
from objcases import assert_same_elements, obj_array

import npystream
from npystream import FormatError, TruncatedError, UnsafePickleError

GOOD = [integer(1), uni("a")]  # two benign elements before the damage
GOOD_VALUES = [1, "a"]
UNSAFE_OR_FORMAT = (UnsafePickleError, FormatError)


def _write(tmp_path, data: bytes, name: str = "hostile.npy"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _drain(path, **kw):
    """Iterate ``iter_objects(path)``; return (elements yielded, the exception raised or None)."""
    got = []
    try:
        for item in npystream.iter_objects(path, **kw):
            got.append(item)
    except Exception as exc:  # noqa: BLE001 - the test inspects the type
        return got, exc
    return got, None


def _check_error(exc, path, data_len: int, types, lo: int = 0):
    assert exc is not None, "no error raised"
    assert isinstance(exc, types), f"expected {types}, got {type(exc).__name__}: {exc}"
    assert exc.offset is not None, f"error does not carry a byte offset: {exc}"
    assert lo <= exc.offset <= data_len, f"offset {exc.offset} outside [{lo}, {data_len}]"
    assert f"at byte {exc.offset}" in str(exc)
    assert str(path) in str(exc), f"message does not name the file: {exc}"


# ---------------------------------------------------------------------------
# truncation at every byte

_SMALL = obj_array([1, "ab", np.arange(3, dtype="<i2"), {"k": (None, 2.5)}, b"xy"])


def _small_file() -> bytes:
    buf = io.BytesIO()
    np.save(buf, _SMALL)
    return buf.getvalue()


def test_truncated_at_every_byte(tmp_path):
    data = _small_file()
    expected = list(_SMALL.flat)
    path = tmp_path / "cut.npy"
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        got, exc = _drain(path)
        assert isinstance(exc, TruncatedError), f"cut at {cut}: {type(exc).__name__}: {exc}"
        assert isinstance(exc, EOFError)
        assert exc.offset is not None and f"at byte {exc.offset}" in str(exc), f"cut at {cut}: {exc}"
        assert exc.offset <= cut, f"cut at {cut}: offset {exc.offset} is past the end"
        assert len(got) < len(expected)
        assert_same_elements(got, expected[: len(got)])
    path.write_bytes(data)
    got, exc = _drain(path)
    assert exc is None
    assert_same_elements(got, expected)


def test_truncated_random_access(tmp_path):
    """Every cut inside the pickle: the index scan (random access) raises TruncatedError too."""
    data = _small_file()
    start = header_len(_SMALL.shape)
    path = tmp_path / "cut.npy"
    for cut in range(start, len(data)):
        path.write_bytes(data[:cut])
        with npystream.open(path, nsidx=False) as arr, pytest.raises(TruncatedError, match=r"at byte \d+"):
            arr[0]


def test_truncated_inside_large_payloads(tmp_path):
    """Cuts inside payloads written outside the 64 KiB frames (BINBYTES8 / BINUNICODE)."""
    items = [np.arange(20_000, dtype="<f8"), "x" * 70_000, b"y" * 70_000, 7]
    buf = io.BytesIO()
    np.save(buf, obj_array(items))
    data = buf.getvalue()
    path = tmp_path / "big.npy"
    for cut in list(range(header_len((4,)), len(data), 4_099)) + [len(data) - 1]:
        path.write_bytes(data[:cut])
        got, exc = _drain(path)
        assert isinstance(exc, TruncatedError), f"cut at {cut}: {exc!r}"
        assert exc.offset is not None and exc.offset <= cut
        assert_same_elements(got, items[: len(got)])


def test_truncated_file_object_stream(tmp_path):
    """The same from a non-seekable stream (a pipe-like reader)."""
    data = _small_file()
    cut = len(data) - 3

    class Pipe(io.RawIOBase):
        def __init__(self, payload):
            self._buf = io.BytesIO(payload)

        def readable(self):
            return True

        def readinto(self, b):
            return self._buf.readinto(b)

    got = []
    with pytest.raises(TruncatedError, match=r"at byte \d+"):
        for item in npystream.iter_objects(io.BufferedReader(Pipe(data[:cut]))):
            got.append(item)
    assert_same_elements(got, list(_SMALL.flat)[: len(got)])


# ---------------------------------------------------------------------------
# structural damage: (id, element opcodes placed after GOOD, protocol, extra envelope kwargs)

_HUGE = 2**62

BAD_LENGTHS = {
    "binunicode_2gb": b"X\xff\xff\xff\x7fabc",
    "binbytes_4gb": b"B\xff\xff\xff\xffab",
    "binbytes8_huge": b"\x8e" + struct.pack("<Q", _HUGE) + b"ab",
    "binunicode8_huge": b"\x8d" + struct.pack("<Q", _HUGE) + b"ab",
    "bytearray8_huge": b"\x96" + struct.pack("<Q", _HUGE) + b"ab",
    "long4_2gb": b"\x8b\xff\xff\xff\x7f\x01",
    "long1_past_end": b"\x8a\xff\x01\x02",
    "binstring_negative": b"T\xff\xff\xff\xffab",
    "short_binbytes_past_end": b"C\xf0ab",
}

MEMO_ABUSE = {
    "long_binput_huge": b"Nr\xff\xff\xff\x0f",
    "long_binput_max": b"Nr\xff\xff\xff\xff",
    "binput_skips_ahead": b"Nq\x07",
    "put_text_huge": b"Np99999999999\n",
    "binget_undefined": b"h\x05",
    "long_binget_huge": b"j\xff\xff\xff\x7f",
    "get_text_undefined": b"g12\n",
    "memoize_empty_stack": b"(\x94",
}

DEEP = {
    "nested_lists_100k": b"]" * 100_000 + b"a" * 99_999,
    "open_marks_100k": b"(" * 100_000 + b"N" + b"t" * 100_000,
    "nested_tuples_100k": b"N" + b"\x85" * 100_000,
    "nested_dicts_50k": b"}" + b"K\x01}" * 50_000 + b"s" * 50_000,
}

BAD_STRUCTURE = {
    "unknown_opcode": b"\xff",
    "stop_inside_element": b"N.",
    "pop_mark_without_mark": b"1",
    "append_to_non_list": b"K\x01K\x02a",
}


def _elements_case(tail: bytes, proto: int):
    return npy_file(envelope(GOOD + [tail], proto=proto), (3,))


@pytest.mark.parametrize("trusted", [False, True], ids=["safe", "trusted"])
@pytest.mark.parametrize(
    ("name", "tail"),
    list(BAD_LENGTHS.items())
    + list(MEMO_ABUSE.items())
    + list(DEEP.items())
    + list(BAD_STRUCTURE.items()),
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_structural_damage_raises_format_error(tmp_path, name, tail, trusted):
    data = _elements_case(tail, proto=5)
    path = _write(tmp_path, data)
    got, exc = _drain(path, trusted=trusted)
    _check_error(exc, path, len(data), FormatError, lo=header_len((3,)))
    assert_same_elements(got, GOOD_VALUES[: len(got)])


def test_elements_before_damage_are_yielded(tmp_path):
    data = _elements_case(b"h\x05", proto=3)
    path = _write(tmp_path, data)
    got, exc = _drain(path)
    assert isinstance(exc, FormatError)
    assert exc.index == 2, f"error should name element 2: {exc}"
    assert_same_elements(got, GOOD_VALUES)


def test_memo_bomb_137_bytes(tmp_path):
    data = npy_file(b"\x80\x04Nr\xff\xff\xff\x0f.", (1,))
    assert len(data) == 137
    path = _write(tmp_path, data)
    for trusted in (False, True):
        got, exc = _drain(path, trusted=trusted)
        _check_error(exc, path, len(data), FormatError, lo=128)
        assert got == []


def test_memory_bombs_stay_small(tmp_path):
    """Under a 1.5 GB address-space limit the bombs raise FormatError, never MemoryError or a crash."""
    cases = {"memo137": npy_file(b"\x80\x04Nr\xff\xff\xff\x0f.", (1,))}
    for name in ("long_binput_huge", "long_binput_max", "put_text_huge", "long_binget_huge"):
        cases[name] = _elements_case(MEMO_ABUSE[name], proto=4)
    for name, tail in BAD_LENGTHS.items():
        cases[name] = _elements_case(tail, proto=5)
    cases["frame_huge"] = npy_file(envelope(GOOD, proto=4, prefix=b"\x95" + struct.pack("<Q", _HUGE)), (2,))
    paths = {}
    for name, data in cases.items():
        paths[name] = str(_write(tmp_path, data, f"{name}.npy"))
    script = textwrap.dedent(
        """
        import json, resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (3 << 29, 3 << 29))
        import npystream
        out = {}
        for name, path in json.loads(sys.argv[1]).items():
            for trusted in (False, True):
                try:
                    for _ in npystream.iter_objects(path, trusted=trusted):
                        pass
                    out[f"{name}/{trusted}"] = "no error"
                except BaseException as exc:
                    out[f"{name}/{trusted}"] = [type(exc).__name__, isinstance(exc, npystream.FormatError), str(exc)]
        print(json.dumps(out))
        """
    )
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(paths)], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    bad = {k: v for k, v in results.items() if v == "no error" or not v[1] or "at byte" not in v[2]}
    assert not bad, bad


def test_frame_straddled_by_opcode(tmp_path):
    """A FRAME whose length ends inside an opcode (CPython's C unpickler silently misreads this)."""
    body = envelope(GOOD, proto=4, prefix=b"\x95" + struct.pack("<Q", 5))
    data = npy_file(body, (2,))
    path = _write(tmp_path, data)
    got, exc = _drain(path)
    _check_error(exc, path, len(data), FormatError, lo=header_len((2,)))


def test_frame_longer_than_file(tmp_path):
    body = envelope(GOOD, proto=4, prefix=b"\x95" + struct.pack("<Q", 10_000))
    data = npy_file(body, (2,))
    path = _write(tmp_path, data)
    got, exc = _drain(path)
    _check_error(exc, path, len(data), FormatError, lo=header_len((2,)))


# ---------------------------------------------------------------------------
# end of stream: STOP, open MARK, extra stack items, trailing bytes


def _top(shape_els: int, body_mid: bytes, end: bytes) -> bytes:
    """Envelope without its closing 'tb.' so the end can be damaged."""
    full = envelope(GOOD[:shape_els])
    assert full.endswith(b"tb.")
    return full[:-3] + body_mid + end


@pytest.mark.parametrize(
    ("name", "body", "kind"),
    [
        ("no_stop", envelope(GOOD)[:-1], TruncatedError),
        ("stop_with_open_mark", envelope(GOOD)[:-1] + b"(.", FormatError),
        ("stop_with_two_objects", envelope(GOOD)[:-1] + b"N.", FormatError),
        ("stop_with_no_build", envelope(GOOD)[:-3] + b".", FormatError),
        ("stop_empty_stack", b"\x80\x03.", FormatError),
    ],
)
def test_bad_stop(tmp_path, name, body, kind):
    data = npy_file(body, (2,))
    path = _write(tmp_path, data)
    got, exc = _drain(path)
    _check_error(exc, path, len(data), kind, lo=header_len((2,)))


@pytest.mark.parametrize("suffix", [b"\x00", b"N.", b"\n" * 100], ids=["nul", "second_pickle", "newlines"])
def test_trailing_bytes(tmp_path, suffix):
    body = envelope(GOOD)
    data = npy_file(body + suffix, (2,))
    path = _write(tmp_path, data)
    got, exc = _drain(path)
    _check_error(exc, path, len(data), FormatError)
    assert exc.offset == header_len((2,)) + len(body), f"trailing bytes start at {header_len((2,)) + len(body)}: {exc}"
    assert "trailing" in str(exc).lower() or "after stop" in str(exc).lower()


@pytest.mark.parametrize(
    ("header_shape", "pickle_shape", "n_items"),
    [((3,), (2,), 2), ((2,), (3,), 3), ((2, 2), (4,), 4), ((4,), (2, 2), 4), ((0,), (1,), 1), ((2,), (2,), 3), ((3,), (3,), 2)],
    ids=["header_more", "header_fewer", "header_2d", "pickle_2d", "header_empty", "list_longer", "list_shorter"],
)
def test_element_count_mismatch(tmp_path, header_shape, pickle_shape, n_items):
    els = [integer(i) for i in range(n_items)]
    data = npy_file(envelope(els, pickle_shape), header_shape)
    path = _write(tmp_path, data)
    got, exc = _drain(path)
    _check_error(exc, path, len(data), FormatError, lo=header_len(header_shape))
    assert len(got) <= min(n_items, int(np.prod(header_shape)))


def test_header_count_mismatch_detected_by_index(tmp_path):
    data = npy_file(envelope([integer(1), integer(2)]), (3,))
    path = _write(tmp_path, data)
    with npystream.open(path) as arr, pytest.raises(FormatError, match=r"at byte \d+"):
        arr.build_index()


# ---------------------------------------------------------------------------
# what allowed callables are given: short state lists, forged dtypes, misuse


MISUSE = {
    # nested object ndarray claims 5 elements, holds 2 (numpy segfaults on this)
    "object_state_list_short": object_array_elem((5,), [b"N", b"N"]),
    "object_state_list_long": object_array_elem((1,), [b"N", b"N"]),
    # numeric ndarray with 8 bytes of data for 100 float64
    "raw_data_short": array_elem("f8", "<", (100,), b"\x00" * 8),
    "raw_data_long": array_elem("f8", "<", (1,), b"\x00" * 16),
    # a float64 dtype with the object flag set: raw bytes would be read as pointers
    "dtype_flags_forged_object": array_elem("f8", "<", (1,), b"\x00" * 8, flags=OBJECT_FLAGS),
    "object_dtype_flags_cleared": reconstruct_head()
    + b"("
    + integer(1)
    + shape_ops((1,))
    + dtype_ops("O8", "|", 0)
    + b"\x89](Ne"
    + b"tb",
    "dtype_code_not_string": glob("numpy", "dtype") + integer(5) + b"\x89\x88\x87R",
    "dtype_flag_not_bool": glob("numpy", "dtype") + uni("f8") + integer(7) + b"\x88\x87R",
    "dtype_elsize_forged": reconstruct_head()
    + b"("
    + integer(1)
    + shape_ops((2,))
    + dtype_ops("V8", "|", 0, elsize=2**31)
    + b"\x89"
    + raw_bytes(b"\x00" * 16)
    + b"tb",
    "reconstruct_big_shape": reconstruct_head(shape0=integer(10**9) + b"\x85")
    + b"("
    + integer(1)
    + shape_ops((1,))
    + dtype_ops("f8", "<")
    + b"\x89"
    + raw_bytes(b"\x00" * 8)
    + b"tb",
    "state_tuple_short": reconstruct_head() + b"(" + integer(1) + shape_ops((1,)) + dtype_ops("f8", "<") + b"tb",
    "state_negative_shape": reconstruct_head()
    + b"("
    + integer(1)
    + shape_ops((-1,))
    + dtype_ops("f8", "<")
    + b"\x89"
    + raw_bytes(b"\x00" * 8)
    + b"tb",
    "newobj_ndarray": glob("numpy", "ndarray") + shape_ops((2**40,)) + b"\x85\x81",
    "reduce_ndarray_directly": glob("numpy", "ndarray") + shape_ops((2**40,)) + b"\x85R",
}


def _forged_dtype(code: str, state: bytes) -> bytes:
    """``dtype(code, False, True)`` then BUILD with the state tuple whose item opcodes are ``state``."""
    return glob("numpy", "dtype") + uni(code) + b"\x89\x88\x87R(" + state + b"tb"


def _array_of(dtype: bytes, nbytes: int = 8) -> bytes:
    return reconstruct_head() + b"(" + integer(1) + shape_ops((1,)) + dtype + b"\x89" + raw_bytes(b"\x00" * nbytes) + b"tb"


# dtype states numpy's own __setstate__ does not validate (the first crashed the interpreter, found
# by the mutation test): refused before numpy sees them, as a bare dtype element and inside an array
_I = integer
FORGED_STATES = {
    "fields_not_dict": ("O8", _I(3) + uni("|") + b"N" + _I(-1) + _I(-1) + _I(63)),
    "v1_fields_not_dict": ("f8", _I(1) + uni("<") + b"N" + _I(5) + _I(8) + _I(8)),
    "v3_names_fields_not_dict": ("f8", _I(3) + uni("<") + b"NN" + _I(-1) + _I(-1) + _I(-1) + _I(0)),
    "field_not_dtype": (
        "V8",
        _I(3) + uni("|") + b"N(" + uni("a") + b"t}" + uni("a") + _I(5) + _I(0) + b"\x86s" + _I(8) + _I(1) + _I(16),
    ),
    "name_not_in_fields": (
        "V8",
        _I(3) + uni("|") + b"N(" + uni("a") + uni("b") + b"t}" + uni("a") + dtype_ops("f8", "<") + _I(0)
        + b"\x86s" + _I(8) + _I(1) + _I(16),
    ),
    "subarray_not_dtype": ("V16", _I(3) + uni("|") + _I(5) + _I(2) + b"\x85\x86NN" + _I(16) + _I(8) + _I(0)),
    "datetime_meta_forged": ("M8", _I(4) + uni("<") + b"NNN" + _I(-1) + _I(-1) + _I(0) + b"N" + _I(5) + b"\x86"),
    "byteorder_forged": ("f8", _I(3) + uni("x") + b"NNN" + _I(-1) + _I(-1) + _I(0)),
    "version_forged": ("f8", _I(9) + uni("<") + b"NNN" + _I(-1) + _I(-1) + _I(0)),
    "state_not_tuple": ("f8", b"N"),
    # a datetime dtype given a state without its unit (numpy 2.4 segfaulted), and the converse
    "object_big_endian": ("O8", _I(3) + uni(">") + b"NNN" + _I(-1) + _I(-1) + _I(63)),  # numpy 2.4 segfaulted
    "float_no_byte_order": ("f8", _I(3) + uni("|") + b"NNN" + _I(-1) + _I(-1) + _I(0)),
    "datetime_without_meta": ("M8", _I(3) + uni("<") + b"NNN" + _I(-1) + _I(-1) + _I(0)),
    "float_with_datetime_meta": (
        "f8",
        _I(4) + uni("<") + b"NNN" + _I(-1) + _I(-1) + _I(0) + b"N(C\x01s" + _I(1) + _I(1) + _I(1) + b"t\x86",
    ),
}
for _name, (_code, _state) in FORGED_STATES.items():
    MISUSE[f"dtype_state_{_name}"] = _forged_dtype(_code, _state)
    MISUSE[f"array_dtype_state_{_name}"] = _array_of(_forged_dtype(_code, _state))
MISUSE["dtype_built_twice"] = dtype_ops("f8", "<") + b"(" + _I(3) + uni("<") + b"NNN" + _I(-1) + _I(-1) + _I(0) + b"tb"


@pytest.mark.parametrize(("name", "tail"), list(MISUSE.items()), ids=list(MISUSE))
def test_misused_allowed_callables_refused(tmp_path, name, tail):
    data = _elements_case(tail, proto=3)
    path = _write(tmp_path, data)
    got, exc = _drain(path)
    _check_error(exc, path, len(data), UNSAFE_OR_FORMAT, lo=header_len((3,)))
    assert_same_elements(got, GOOD_VALUES[: len(got)])
    for zero_copy in (True, False):  # random access refuses it too
        with npystream.open(path, zero_copy=zero_copy, nsidx=False) as arr, pytest.raises(UNSAFE_OR_FORMAT):
            arr[2]


# ---------------------------------------------------------------------------
# code execution: nothing may be called; the marker file must not appear


def _exec_payloads(marker: str) -> dict[str, tuple[bytes, str]]:
    """name -> (element opcodes, text the error must name)."""
    cmd = f"touch {marker}"
    py = f"open({marker!r}, 'w').close()"
    return {
        "os_system": (glob("os", "system") + uni(cmd) + b"\x85R", "system"),
        "posix_system": (glob("posix", "system") + uni(cmd) + b"\x85R", "system"),
        "builtins_eval": (glob("builtins", "eval") + uni(py) + b"\x85R", "eval"),
        "builtins_exec": (glob("builtins", "exec") + uni(py) + b"\x85R", "exec"),
        "py2_builtin_eval": (glob("__builtin__", "eval") + uni(py) + b"\x85R", "eval"),
        "stack_global_os_system": (stack_glob("os", "system") + uni(cmd) + b"\x85R", "system"),
        "builtins_getattr": (glob("builtins", "getattr") + glob("os", "system") + b"N\x86R", "getattr"),
        "subprocess_call": (
            glob("subprocess", "call") + b"]" + b"(" + uni("touch") + uni(marker) + b"e" + b"\x85R",
            "call",
        ),
        "copyreg_reconstructor": (
            glob("copyreg", "_reconstructor") + glob("os", "_wrap_close") + glob("builtins", "object") + b"N\x87R",
            "_reconstructor",
        ),
        "numpy_load": (glob("numpy", "load") + uni(marker) + b"\x85R", "load"),
        "inst_os_system": (b"(" + uni(cmd) + b"ios\nsystem\n", "system"),
        "obj_os_system": (b"(" + glob("os", "system") + uni(cmd) + b"o", "system"),
        "newobj_ordereddict": (glob("collections", "OrderedDict") + b")\x81", "OrderedDict"),
        "newobj_ex_os": (glob("os", "system") + b")}\x92", "system"),
        "top_level_global": (b"", ""),  # replaced below
        "persid_text": (b"P1\n", "persistent"),
        "persid_binary": (uni("x") + b"Q", "persistent"),
        "ext1": (b"\x82\x01", "ext"),
        "ext2": (b"\x83\x01\x00", "ext"),
        "ext4": (b"\x84\x01\x00\x00\x00", "ext"),
    }


_EXEC_NAMES = list(_exec_payloads("m"))


@pytest.mark.parametrize("name", _EXEC_NAMES)
def test_code_execution_refused(tmp_path, name):
    marker = tmp_path / "PWNED"
    payload, names = _exec_payloads(str(marker))[name]
    if name == "top_level_global":
        body = b"\x80\x02" + glob("os", "system") + uni(f"touch {marker}") + b"\x85R."
        data = npy_file(body, (1,))
        names = "system"
    else:
        data = _elements_case(payload, proto=4)
    path = _write(tmp_path, data)
    got, exc = _drain(path)
    assert not marker.exists(), "a refused pickle ran code"
    _check_error(exc, path, len(data), UnsafePickleError, lo=header_len((1,)))
    assert names.lower() in str(exc).lower(), f"error should name {names!r}: {exc}"
    assert_same_elements(got, GOOD_VALUES[: len(got)])
    # opening it is no more dangerous
    got, exc = [], None
    try:
        with npystream.open(path) as arr:
            got = [arr[i] for i in range(len(arr))]
    except Exception as err:  # noqa: BLE001 - inspected below
        exc = err
    assert not marker.exists(), "a refused pickle ran code through open()"
    assert isinstance(exc, (UnsafePickleError, FormatError)), exc


def test_allowed_globals_do_not_leak_to_other_names(tmp_path):
    """Extending the allow-list with one harmless name allows that name, nothing else."""
    marker = tmp_path / "PWNED"
    data = _elements_case(glob("os", "system") + uni(f"touch {marker}") + b"\x85R", proto=3)
    path = _write(tmp_path, data)
    got, exc = _drain(path, allowed_globals=[("collections", "OrderedDict")])
    assert not marker.exists()
    assert isinstance(exc, UnsafePickleError)
    ok = npy_file(envelope(GOOD + [glob("collections", "OrderedDict") + b")R"], proto=3), (3,))
    path2 = _write(tmp_path, ok, "ok.npy")
    got, exc = _drain(path2)
    assert isinstance(exc, UnsafePickleError) and "OrderedDict" in str(exc)
    got, exc = _drain(path2, allowed_globals=[("collections", "OrderedDict")])
    assert exc is None, exc
    import collections

    assert_same_elements(got, [1, "a", collections.OrderedDict()])


def test_trusted_mode_never_crashes_on_misuse(tmp_path):
    """trusted=True may accept what np.load accepts, but must not crash the interpreter (run in a subprocess)."""
    paths = {}
    for name, tail in MISUSE.items():
        paths[name] = str(_write(tmp_path, _elements_case(tail, proto=3), f"{name}.npy"))
    script = textwrap.dedent(
        """
        import json, sys
        import npystream
        for name, path in json.loads(sys.argv[1]).items():
            try:
                n = sum(1 for _ in npystream.iter_objects(path, trusted=True))
                print(name, "ok", n, flush=True)
            except npystream.NpyStreamError as exc:
                print(name, type(exc).__name__, flush=True)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-c", script, json.dumps(paths)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}; last lines: {proc.stdout[-300:]} {proc.stderr[-500:]}"
    assert "Error" not in proc.stderr, proc.stderr[-500:]
    assert len(proc.stdout.splitlines()) == len(MISUSE)


def test_trusted_mode_arrays_inside_other_objects_match_np_load(tmp_path):
    """trusted=True checks array states through placeholders; one handed to a non-container object still reads as np.load."""
    import collections
    import types

    shared = np.arange(4.0)
    vals = [[shared], types.SimpleNamespace(a=np.arange(3.0), b=[shared, np.array([None, 1], object)]),
            collections.OrderedDict(x=shared, y=np.zeros(2, ">i4")), [shared, (shared,)], np.arange(5)]
    path = tmp_path / "t.npy"
    np.save(path, obj_array(vals))
    want = np.load(path, allow_pickle=True)

    def same(a, b):
        assert type(a) is type(b), (a, b)
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and a.shape == b.shape
            for x, y in zip(a.ravel().tolist(), b.ravel().tolist()) if a.dtype.hasobject else []:
                same(x, y)
            if not a.dtype.hasobject:
                assert np.array_equal(a, b)
        elif isinstance(a, types.SimpleNamespace):
            same(vars(a), vars(b))
        elif isinstance(a, dict):
            assert list(a) == list(b)
            for k in a:
                same(a[k], b[k])
        elif isinstance(a, (list, tuple)):
            assert len(a) == len(b)
            for x, y in zip(a, b):
                same(x, y)
        else:
            assert a == b

    same(list(npystream.iter_objects(path, trusted=True)), list(want))
    for zero_copy in (True, False):
        with npystream.open(path, trusted=True, zero_copy=zero_copy, nsidx=False) as arr:
            same([arr[i] for i in range(len(arr))], list(want))


def test_random_byte_mutations_raise_only_our_errors():
    """300 seeded 1-3 byte mutations of corpus files: every failure is an NpyStreamError (never IndexError, struct.error...).

    (UnicodeError / ImportError are what np.load raises for Python-2 encodings and module names.)
    """
    import random
    import warnings

    from objcases import case, case_bytes

    seeds = ["python_objects", "ndarrays_every_dtype", "memo_backrefs", "structured_object_fields",
             "protocol2_mixed", "nested_object_arrays", "numpy1_protocol3", "many_2500"]
    originals = {n: case_bytes(case(n)) for n in seeds}
    rng = random.Random(20261122)
    surprises = {}
    for _ in range(300):
        name = rng.choice(seeds)
        data = bytearray(originals[name])
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(128, len(data))] = rng.randrange(256)
        payload = bytes(data)
        for mode in ("iter", "index"):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if mode == "iter":
                        for _ in npystream.iter_objects(payload):
                            pass
                    else:
                        with npystream.open(io.BytesIO(payload)) as arr:
                            arr.get(range(arr.size))
            except (npystream.NpyStreamError, UnicodeError, ImportError):
                pass
            except Exception as exc:  # noqa: BLE001 - collected and reported below
                surprises.setdefault((mode, type(exc).__name__, str(exc)[:80]), name)
    assert not surprises, surprises
