"""Self-tests of the object-array corpus (tests/objcases.py): the oracle must be able to fail."""

from __future__ import annotations

import io
import pickle
import struct

import numpy as np
import pytest
from hostile_pickles import (
    array_elem,
    envelope,
    integer,
    npy_file,
    object_array_elem,
    short_uni,
    stack_glob,
    uni,
)
from objcases import (
    CASE_NAMES,
    CASES,
    assert_same_element,
    assert_same_elements,
    case,
    case_bytes,
    expected_elements,
    obj_array,
    write_case,
)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_case_round_trips_through_numpy(tmp_path, name):
    """Every case writes a file np.load reads back equal to what was saved (checked with our comparator)."""
    c = case(name)
    loaded = write_case(c, tmp_path / f"{name}.npy")
    original = c.make()
    assert loaded.shape == original.shape
    assert loaded.dtype == original.dtype
    assert bool(loaded.flags.f_contiguous and not loaded.flags.c_contiguous) == bool(
        original.flags.f_contiguous and not original.flags.c_contiguous
    )
    got = expected_elements(loaded)
    assert len(got) == original.size
    assert_same_elements(got, expected_elements(pickle.loads(pickle.dumps(original, protocol=c.protocol or 4))))


def test_catalogue_covers_protocols_and_tags():
    protos = {c.protocol for c in CASES}
    assert {None, 2, 3, 4, 5} <= protos
    tags = set().union(*(c.tags for c in CASES))
    assert {"arrays", "big", "nd", "empty", "zero_d", "structured", "memo", "protocol"} <= tags
    data = case_bytes(case("numpy1_protocol3"))
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in data
    assert b"numpy._core" not in data
    assert case_bytes(case("protocol5_arrays"))[128:130] == b"\x80\x05"
    big = case("large_payloads").make()
    assert max(getattr(x, "nbytes", 0) for x in big) > 65536
    assert case("many_2500").make().size > 1000


@pytest.mark.parametrize(
    ("got", "expected"),
    [
        (1, True),
        (1.0, 1),
        (0.0, -0.0),
        (float("nan"), 1.0),
        (complex(0, -0.0), complex(0, 0.0)),
        ("a", b"a"),
        ([1, 2], (1, 2)),
        ([1, 2], [1, 2, 3]),
        ({"a": 1, "b": 2}, {"b": 2, "a": 1}),
        ({1, 2}, frozenset({1, 2})),
        ({1, 2}, {1.0, 2}),
        (bytearray(b"x"), b"x"),
        (range(3), range(4)),
        (slice(1, 2), slice(1, 3)),
        (slice(1, 2), slice(1.0, 2)),
        (np.arange(3, dtype="<i4"), np.arange(3, dtype=">i4")),
        (np.arange(3, dtype="<i4"), np.arange(3, dtype="<i8")),
        (np.arange(6).reshape(2, 3), np.arange(6).reshape(3, 2)),
        (np.arange(6.0).reshape(2, 3), np.asfortranarray(np.arange(6.0).reshape(2, 3))),
        (np.array([1.0, np.nan]), np.array([1.0, 2.0])),
        (np.float32(1), np.float64(1)),
        (np.float64(0.0), np.float64(-0.0)),
        (np.int64(1), 1),
        (obj_array([1, [2]]), obj_array([1, [3]])),
        (np.array(5.0), np.float64(5.0)),
        (None, 0),
    ],
)
def test_comparator_rejects_differences(got, expected):
    with pytest.raises(AssertionError):
        assert_same_element(got, expected)


def test_comparator_checks_aliasing_and_record_fields():
    shared = [1]
    with pytest.raises(AssertionError, match="same object"):
        assert_same_element([[1], [1]], [shared, shared])
    twin = [1]
    assert_same_element([twin, twin], [shared, shared])
    dt = np.dtype([("a", "O"), ("b", "<i4")])
    r1 = np.array([({"k": 1}, 2)], dtype=dt)[0]
    r2 = np.array([({"k": 2}, 2)], dtype=dt)[0]
    with pytest.raises(AssertionError):
        assert_same_element(r1, r2)
    assert_same_element(r1, np.array([({"k": 1}, 2)], dtype=dt)[0])


def test_assert_same_elements_counts():
    with pytest.raises(AssertionError, match="got 1 elements, expected 2"):
        assert_same_elements([1], [1, 2])
    with pytest.raises(AssertionError, match="more than"):
        assert_same_elements([1, 2], [1])
    with pytest.raises(AssertionError, match="element 1"):
        assert_same_elements([1, 3], [1, 2])
    assert_same_elements(iter([np.nan, "x"]), [np.nan, "x"])


# the assembler is right: benign versions load with numpy


def test_assembler_builds_what_numpy_reads():
    els = [
        integer(1),
        uni("a"),
        array_elem("f4", "<", (3,), struct.pack("<3f", 1, 2, 3)),
        object_array_elem((2,), [b"N", integer(300)]),
        array_elem("i2", ">", (2, 2), bytes(range(8)), fortran=True),
    ]
    data = npy_file(envelope(els), (5,))
    loaded = np.load(io.BytesIO(data), allow_pickle=True)
    expected = [
        1,
        "a",
        np.array([1, 2, 3], "<f4"),
        obj_array([None, 300]),
        # numpy unpickles non-native byte orders (protocols 2-4) into native ones
        np.asfortranarray(np.frombuffer(bytes(range(8)), ">i2").reshape(2, 2, order="F").astype("<i2")),
    ]
    assert_same_elements(list(loaded.flat), expected)
    data = npy_file(envelope(els[:4], (2, 2), fortran=True), (2, 2), fortran=True)
    loaded = np.load(io.BytesIO(data), allow_pickle=True)
    assert loaded.flags.f_contiguous and not loaded.flags.c_contiguous
    assert_same_element(loaded[0, 1], "a")


def test_short_binunicode_helper_is_protocol4():
    assert short_uni("ab") == b"\x8c\x02ab"
    assert stack_glob("a", "b") == b"\x8c\x01a\x8c\x01b\x93"
