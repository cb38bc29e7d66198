"""iter_objects in copying mode on a mapped file: large-element chunks copy each payload once.

Chunks whose elements average >= ``LARGE_ELEMENT_BYTES`` reference array
payloads by file offset (the zero-copy rewrite) and copy them once out of the
mapping; these tests check the arrays handed out are writeable, backed by
memory of their own (never the mapping), and equal to ``np.load``'s.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from objcases import assert_same_elements, expected_elements, obj_array

import npystream
from npystream.formats.pickle_walk import LARGE_ELEMENT_BYTES

BIG = 2 * LARGE_ELEMENT_BYTES  # bytes per large payload (at least): chunks average above the threshold


def _owner(a: Any) -> Any:
    """The object at the end of an array's ``.base`` chain (through memoryviews to their exporter)."""
    while True:
        if isinstance(a, np.ndarray) and a.base is not None:
            a = a.base
        elif isinstance(a, memoryview):
            a = a.obj
        else:
            return a


def _large_items() -> list[Any]:
    rng = np.random.default_rng(7)
    f32 = rng.random(BIG // 4 + 100, dtype=np.float32)
    shared = rng.integers(0, 1000, BIG // 8 + 3, dtype=np.int64)
    return [
        f32,
        rng.random(BIG // 8 + 5).astype(">f8"),  # big-endian: numpy loads it byte-swapped to native
        np.asfortranarray(rng.random((300, BIG // 2400 + 7))),  # Fortran-ordered, native
        np.asfortranarray(rng.integers(-(2**30), 2**30, (200, BIG // 800 + 3)).astype(">i4")),  # Fortran, big-endian
        rng.integers(0, 100, (BIG // 64 + 1, 32), dtype=np.int16),  # C-ordered 2-D
        np.zeros(BIG // 12 + 1, dtype=[("a", "<i4"), ("b", ">f8")]),  # structured, no objects
        np.arange(BIG // 8 + 1).astype("M8[s]"),
        np.array(["x" * 40] * (BIG // 160 + 1)),  # unicode
        [shared, shared],  # the same array twice inside one element
        {"k": rng.random(BIG // 8 + 1), "n": 3},
        shared,  # the same array again, a later element (memo back-reference)
        f32,
    ]


def _write(tmp_path: Path, items: list[Any], name: str = "large.npy") -> tuple[str, np.ndarray]:
    path = str(tmp_path / name)
    np.save(path, obj_array(items), allow_pickle=True)
    return path, np.load(path, allow_pickle=True)


def _mapped(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mm, dtype=np.uint8)


def _arrays(x: Any) -> list[np.ndarray]:
    if isinstance(x, np.ndarray):
        return [x]
    if isinstance(x, (list, tuple)):
        return [a for v in x for a in _arrays(v)]
    if isinstance(x, dict):
        return [a for v in x.values() for a in _arrays(v)]
    return []


def test_large_elements_are_writeable_owned_copies_equal_to_np_load(tmp_path: Path) -> None:
    path, loaded = _write(tmp_path, _large_items())
    got = list(npystream.iter_objects(path))
    assert_same_elements(got, expected_elements(loaded))
    whole = _mapped(path)
    arrays = [a for x in got for a in _arrays(x)]
    assert len(arrays) == 13
    expected_arrays = [a for x in expected_elements(loaded) for a in _arrays(x)]
    for a, e in zip(arrays, expected_arrays):
        assert a.flags.writeable
        assert not np.shares_memory(a, whole)
        # backed by what np.load's array is backed by: its own data, or the bytes object numpy's
        # __setstate__ keeps for large aligned payloads (one copy out of the mapping, never a view)
        assert type(_owner(a)) is type(_owner(e)), (type(_owner(a)), type(_owner(e)))
    first = got[0]
    assert type(first.base) is bytes and len(first.base) == first.nbytes
    # byte-swapped payloads come out native-endian and owning their data, as np.load makes them
    assert got[1].dtype == np.dtype("f8") and got[1].flags.owndata
    assert got[3].dtype == np.dtype("i4") and got[3].flags.f_contiguous and got[3].flags.owndata
    assert got[2].flags.f_contiguous and not got[2].flags.c_contiguous
    # sharing across elements and inside one, exactly as np.load
    assert got[8][0] is got[8][1]
    assert (got[10] is got[8][0]) == (loaded[10] is loaded[8][0])
    assert (got[11] is got[0]) == (loaded[11] is loaded[0])


def test_writing_into_a_copy_changes_neither_the_file_nor_later_reads(tmp_path: Path) -> None:
    path, loaded = _write(tmp_path, _large_items())
    before = Path(path).read_bytes()
    first = next(iter(npystream.iter_objects(path)))
    first[:] = -1.0
    assert Path(path).read_bytes() == before
    again = next(iter(npystream.iter_objects(path)))
    np.testing.assert_array_equal(again, loaded[0])


@pytest.mark.parametrize("trusted", [False, True])
def test_mixed_small_and_large_chunks(tmp_path: Path, trusted: bool) -> None:
    rng = np.random.default_rng(3)
    items: list[Any] = []
    for k in range(3):
        items += [rng.random(int(n), dtype=np.float32) for n in rng.integers(1, 200, 1500)]  # small chunks
        items += [rng.random(BIG // 4 + int(n), dtype=np.float32).astype(">f4" if k == 1 else "<f4") for n in range(12)]
        items += ["text", None, {"a": np.arange(5)}]
    path, loaded = _write(tmp_path, items, "mixed.npy")
    got = list(npystream.iter_objects(path, trusted=trusted))
    assert_same_elements(got, expected_elements(loaded))
    for x in got:
        if isinstance(x, np.ndarray):
            assert x.flags.writeable


def test_zero_copy_mode_still_gives_read_only_views(tmp_path: Path) -> None:
    path, loaded = _write(tmp_path, _large_items())
    got = list(npystream.iter_objects(path, zero_copy="always"))  # views, aligned or not
    assert_same_elements(got, expected_elements(loaded))
    assert not got[0].flags.writeable  # native 1-D payload: a view of the mapping
    assert got[1].flags.writeable  # byte-swapped: numpy's swapped copy, as before
