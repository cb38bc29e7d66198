""".npy headers: every error the issue lists, every truncation, numpy round trips, encode_header."""

from __future__ import annotations

import gzip
import io
import os
import struct
import threading
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import npystream
from npystream.errors import FormatError, NpyStreamError, TruncatedError
from npystream.formats.npy import MAGIC, MAX_HEADER_SIZE, encode_header, header_room, read_header

GOOD = "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }"


def raw_npy(text: str, version: tuple[int, int] = (1, 0), *, newline: bool = True,
            data: bytes = b"", encoding: str | None = None) -> bytes:
    """Hand-made .npy bytes with an arbitrary header text (no validation)."""
    fmt = "<H" if version == (1, 0) else "<I"
    enc = encoding or ("utf8" if version == (3, 0) else "latin1")
    body = text.encode(enc) + (b"\n" if newline else b"")
    return MAGIC + bytes(version) + struct.pack(fmt, len(body)) + body + data


def header_error(data: bytes, **kwargs) -> FormatError:
    with pytest.raises(FormatError) as info:
        read_header(io.BytesIO(data), **kwargs)
    err = info.value
    assert isinstance(err, NpyStreamError) and isinstance(err, ValueError)
    assert err.path is not None and err.offset is not None
    assert str(err).startswith(f"{err.path}, at byte {err.offset}: ")
    return err


def test_good_header_baseline():
    h = read_header(io.BytesIO(raw_npy(GOOD, data=b"\0" * 12)))
    assert (h.shape, h.dtype, h.fortran_order, h.pickled, h.nbytes, h.count) == (
        (3,), np.dtype("<f4"), False, False, 12, 3)


def test_bad_magic():
    err = header_error(b"\x93NUMPZ\x01\x00" + b"\0" * 100)
    assert err.offset == 0 and "magic" in str(err) and "NUMPZ" in str(err)
    err = header_error(b"PK\x03\x04 a zip file, not a .npy")
    assert "magic" in str(err) and "npystream.open(path)" in str(err)


@pytest.mark.parametrize("version", [(0, 0), (1, 1), (4, 0), (2, 1), (255, 255)])
def test_unknown_version(version):
    data = MAGIC + bytes(version) + b"\x10\x00" + b" " * 16
    err = header_error(data)
    assert err.offset == 6
    assert f"{version[0]}.{version[1]}" in str(err) and "1.0, 2.0 or 3.0" in str(err)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("{'descr': '<f4', 'fortran_order': False}", "missing ['shape']"),
        ("{'descr': '<f4', 'shape': (3,)}", "missing ['fortran_order']"),
        ("{'fortran_order': False, 'shape': (3,)}", "missing ['descr']"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), 'extra': 1}", "unexpected ['extra']"),
        ("{}", "missing"),
    ],
)
def test_missing_or_extra_keys(text, needle):
    err = header_error(raw_npy(text))
    assert needle in str(err)
    assert "expected exactly" in str(err)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("{'descr': '<f4', 'fortran_order': False, 'shape': [3]}", "tuple of ints"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (3.0,)}", "tuple of ints"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': ('3',)}", "tuple of ints"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (True,)}", "tuple of ints"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': 3}", "tuple of ints"),
        ("{'descr': '<f4', 'fortran_order': 0, 'shape': (3,)}", "True or False"),
        ("{'descr': '<f4', 'fortran_order': 'no', 'shape': (3,)}", "True or False"),
        ("{'descr': 3, 'fortran_order': False, 'shape': (3,)}", "not a dtype"),
        ("{'descr': '<q7', 'fortran_order': False, 'shape': (3,)}", "not a dtype"),
        ("{'descr': [('a',)], 'fortran_order': False, 'shape': (3,)}", "not a dtype"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (-1,)}", "negative"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (3, -2)}", "negative"),
        ("{'descr': '<f8', 'fortran_order': False, 'shape': (2**40, 2**40)}", "not a Python literal"),
        ("{'descr': '<f8', 'fortran_order': False, 'shape': (1099511627776, 1099511627776)}", "overflows"),
        ("{'descr': '|u1', 'fortran_order': False, 'shape': (0, 99999999999999999999999)}", "2**63"),
        ("['descr', '<f4']", "expected a dict"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (3,),", "not a Python literal"),
        ("__import__('os').system('true')", "not a Python literal"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (3,)} + 1", "not a Python literal"),
    ],
)
def test_wrong_typed_values(text, needle):
    err = header_error(raw_npy(text))
    assert needle in str(err)
    assert err.offset == 10  # the header text starts after magic, version and uint16 length


def test_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.npy"
    path.write_bytes(raw_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (-1,)}"))
    with pytest.raises(FormatError) as info:
        read_header(path)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)
    with pytest.raises(FormatError, match="negative"):
        npystream.open(path)


def test_header_size_limit():
    big = "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }" + " " * 20000
    data = raw_npy(big, (2, 0), data=b"\0" * 12)
    err = header_error(data)
    assert "max_header_size" in str(err) and str(MAX_HEADER_SIZE) in str(err)
    assert err.offset == 8
    h = read_header(io.BytesIO(data), max_header_size=30000)
    assert h.shape == (3,)
    with pytest.raises(ValueError):
        read_header(io.BytesIO(data), max_header_size=0)


def test_header_without_newline_and_bad_encoding():
    err = header_error(raw_npy(GOOD, newline=False))
    assert "newline" in str(err)
    bad_utf8 = MAGIC + bytes((3, 0)) + struct.pack("<I", 4) + b"{\xff}\n"
    err = header_error(bad_utf8)
    assert "utf8" in str(err) and err.offset == 13


def test_python2_long_suffix_accepted_for_v1():
    h = read_header(io.BytesIO(raw_npy("{'descr': '<i8', 'fortran_order': False, 'shape': (10L, 2L), }")))
    assert h.shape == (10, 2)
    err = header_error(raw_npy("{'descr': '<i8', 'fortran_order': False, 'shape': (10L,), }", (3, 0)))
    assert "not a Python literal" in str(err)


def test_deeply_nested_literal_is_an_error_not_a_crash():
    text = "{'descr': " + "[" * 3000 + "]" * 3000 + ", 'fortran_order': False, 'shape': (1,)}"
    header_error(raw_npy(text, (2, 0)), max_header_size=100000)


def test_data_shorter_than_header_at_open(tmp_path):
    path = tmp_path / "short.npy"
    path.write_bytes(raw_npy("{'descr': '<f8', 'fortran_order': False, 'shape': (4,), }", data=b"\0" * 31))
    with pytest.raises(TruncatedError) as info:
        npystream.open(path)
    assert isinstance(info.value, FormatError) and isinstance(info.value, EOFError)
    assert "32" in str(info.value) and "31" in str(info.value)


# ---------------------------------------------------------------------------- truncation


def _valid_files() -> dict[str, bytes]:
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, arr, version in (
            ("v1", np.arange(6, dtype="<i4").reshape(2, 3), (1, 0)),
            ("v2", np.asfortranarray(np.arange(6, dtype=">f8").reshape(3, 2)), (2, 0)),
            ("v3", np.zeros(3, dtype=[("\u512a", "<f4"), ("b", "S2")]), (3, 0)),
            ("0d", np.array(1.5, dtype="<f2"), (1, 0)),
        ):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, arr, version=version)
            out[name] = buf.getvalue()
    return out


@pytest.mark.parametrize("name", ["v1", "v2", "v3", "0d"])
def test_every_truncation_raises_truncated_error(tmp_path, name):
    data = _valid_files()[name]
    full = read_header(io.BytesIO(data))
    path = tmp_path / "cut.npy"
    axis = -1 if full.fortran_order else 0
    for cut in range(len(data)):
        part = data[:cut]
        if cut < full.data_offset:
            with pytest.raises(TruncatedError) as info:
                read_header(io.BytesIO(part))
            assert info.value.offset <= cut
        else:
            assert read_header(io.BytesIO(part)) == full  # the header itself is complete
        path.write_bytes(part)
        with pytest.raises(TruncatedError):
            npystream.open(path)
        with pytest.raises(TruncatedError):
            list(npystream.iter_batches(io.BytesIO(part), 1, axis=axis))
        with pytest.raises(TruncatedError):
            list(npystream.iter_batches(path, 1, axis=axis))


def test_truncation_through_gzip_and_pipe():
    data = _valid_files()["v1"]
    for cut in (0, 5, 9, 40, len(data) - 1):
        with pytest.raises(TruncatedError):
            list(npystream.iter_batches(io.BytesIO(gzip.compress(data[:cut])), 1))
        r, w = os.pipe()

        def feed(w=w, part=data[:cut]):
            with os.fdopen(w, "wb") as wf:
                wf.write(part)

        t = threading.Thread(target=feed)
        t.start()
        with os.fdopen(r, "rb") as rf, pytest.raises(TruncatedError):
            list(npystream.iter_batches(rf, 1))
        t.join(5)


def test_never_reads_past_the_header():
    data = _valid_files()["v2"] + b"TRAILER"
    h = read_header(io.BytesIO(data))
    r, w = os.pipe()
    with os.fdopen(w, "wb") as wf:
        wf.write(data)
    with os.fdopen(r, "rb", buffering=0) as rf:
        assert read_header(rf) == h
        rest = rf.read()
    assert rest == data[h.data_offset :]
    f = io.BytesIO(data)
    read_header(f)
    assert f.tell() == h.data_offset


# ---------------------------------------------------------------------------- numpy round trips

DTYPES = hnp.nested_dtypes(
    subtype_strategy=st.one_of(
        hnp.boolean_dtypes(),
        hnp.integer_dtypes(),
        hnp.unsigned_integer_dtypes(),
        hnp.floating_dtypes(),
        hnp.complex_number_dtypes(),
        hnp.datetime64_dtypes(),
        hnp.timedelta64_dtypes(),
        hnp.byte_string_dtypes(min_len=1, max_len=8),
        hnp.unicode_string_dtypes(min_len=1, max_len=8),
    ),
    max_leaves=4,
    max_itemsize=64,
)
SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)


@settings(max_examples=80, deadline=None)
@given(dtype=DTYPES, shape=SHAPES, fortran=st.booleans(), data=st.data())
def test_roundtrip_against_numpy(tmp_path_factory, dtype, shape, fortran, data):
    arr = data.draw(hnp.arrays(dtype, shape))
    if fortran:
        arr = np.asfortranarray(arr)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.save(buf, arr)
    raw = buf.getvalue()
    h = read_header(io.BytesIO(raw))
    ref = np.load(io.BytesIO(raw))
    assert h.shape == ref.shape and h.dtype == ref.dtype and not h.pickled
    assert h.fortran_order == (arr.flags.f_contiguous and not arr.flags.c_contiguous)
    assert h.nbytes == ref.nbytes and h.expected_size == len(raw)
    # encode_header writes numpy's exact bytes
    assert raw[: h.data_offset] == encode_header(h.dtype, h.shape, h.fortran_order)
    path = tmp_path_factory.mktemp("rt") / "a.npy"
    path.write_bytes(raw)
    got = npystream.open(path)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert got.tobytes(order="A") == ref.tobytes(order="A")


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0), None])
@pytest.mark.parametrize(
    "dtype",
    ["<f4", ">i8", "S3", [("a", "<i4"), ("b", ">f8", (2,))], [("\u512a", "<f4")],
     np.dtype({"names": ["a", "b"], "formats": ["u1", "<f8"]}, align=True)],
)
@pytest.mark.parametrize("shape", [(), (0,), (7,), (2, 3), (10**15, 2)])
@pytest.mark.parametrize("fortran", [False, True])
def test_encode_header_byte_identical(dtype, shape, fortran, version):
    from numpy.lib import _format_impl as fmt  # numpy's own writer, the oracle

    d = {"descr": fmt.dtype_to_descr(np.dtype(dtype)), "fortran_order": fortran, "shape": shape}
    ref = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fmt._write_array_header(ref, d, version)
        except (ValueError, UnicodeEncodeError):
            with pytest.raises(ValueError):
                encode_header(dtype, shape, fortran, version=version)
            return
    got = encode_header(dtype, shape, fortran, version=version)
    assert got == ref.getvalue()
    assert len(got) % 64 == 0
    h = read_header(io.BytesIO(got))
    assert (h.shape, h.fortran_order, h.dtype) == (shape, fortran, np.dtype(dtype))


@pytest.mark.parametrize(
    ("dtype", "ndim"),
    [(d, n) for d in ["<f8", "|O", [("\u512a", "<f4")]] for n in (0, 1, 3)]
    + [([(f"f{i}", "<i2") for i in range(6000)], 1)],  # a version 2.0 header
)
def test_encode_header_sized(dtype, ndim):
    """size=header_room(...): every shape up to int64 fits in the same room, and numpy reads the file."""
    room = header_room(dtype, ndim)
    assert room % 64 == 0
    for shape in [(0,) * ndim, (2**63 - 1,) * ndim, tuple(range(1, ndim + 1))]:
        head = encode_header(dtype, shape, grow=False, size=room)
        assert len(head) == room
        if 2**63 - 1 in shape:
            continue  # the reader refuses a shape that overflows a file
        h = read_header(io.BytesIO(head), max_header_size=room)
        assert (h.shape, h.dtype, h.data_offset) == (shape, np.dtype(dtype), room)
    with pytest.raises(ValueError, match="does not fit"):
        encode_header(dtype, (2**63 - 1,) * 3, grow=False, size=64)
    if np.dtype(dtype).hasobject:
        return
    shape = tuple(range(1, ndim + 1))
    a = np.arange(int(np.prod(shape)) * np.dtype(dtype).itemsize, dtype="u1").view(dtype).reshape(shape)
    buf = io.BytesIO(encode_header(dtype, shape, grow=False, size=room) + a.tobytes())
    np.testing.assert_array_equal(np.load(buf, max_header_size=room), a)


def test_encode_header_room_to_grow():
    """numpy's growth padding: the header keeps its length while the count grows to 21 digits."""
    sizes = {len(encode_header("<f8", (n, 3))) for n in (0, 7, 10**10, 10**20)}
    assert len(sizes) == 1
    assert len(encode_header("<f8", (0, 3), grow=False)) <= len(encode_header("<f8", (0, 3)))
