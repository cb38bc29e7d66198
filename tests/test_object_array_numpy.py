"""ObjectArray behaves like the object ndarray ``np.load`` returns: indexing, iteration, errors, alignment.

numpy is the oracle: every key is applied to ``np.load(path, allow_pickle=True)``
and to ``npystream.open(path)`` and the results compared, types included.
"""

from __future__ import annotations

import collections
import gc
import os
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from objcases import assert_same_element, obj_array

import npystream
from npystream import NpyStreamError, UnsafePickleError
from npystream.object_array import ObjectArray


def _same_result(got, want, probe):
    """``got`` (ObjectArray[key]) equals ``want`` (numpy's [key]); ``probe`` is numpy's result on positions."""
    if isinstance(probe, np.ndarray):  # numpy returns an object ndarray here
        assert type(got) is np.ndarray, f"expected an object ndarray, got {type(got).__name__}"
        assert got.dtype == want.dtype and got.shape == want.shape
        for g, w in zip(got.flat, want.flat, strict=True):
            assert_same_element(g, w)
    else:  # numpy returns the element itself
        assert_same_element(got, want)


def _element(i: int):
    kind = i % 5
    if kind == 0:
        return i
    if kind == 1:
        return f"s{i}"
    if kind == 2:
        return [i, str(i)]
    if kind == 3:
        return np.arange(i % 4, dtype="<f4")
    return {"k": i}


def _key_strategy(shape):
    return st.one_of(
        hnp.basic_indices(shape, allow_newaxis=True, allow_ellipsis=True),
        hnp.integer_array_indices(shape) if shape and all(shape) else st.just(Ellipsis),
        hnp.arrays(bool, shape),
        hnp.arrays(bool, shape[:1]),
    )


@settings(max_examples=int(os.environ.get("NPYSTREAM_PROP_EXAMPLES", "60")), deadline=None)
@given(
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
    order=st.sampled_from(["C", "F"]),
    data=st.data(),
)
def test_keys_match_np_load(tmp_path_factory, shape, order, data):
    """Hypothesis over shapes and keys: ObjectArray[key] == np.load(...)[key], types included."""
    folder = tmp_path_factory.mktemp("keys")
    n = int(np.prod(shape))
    src = obj_array([_element(i) for i in range(n)], shape=shape, order=order)
    path = folder / "a.npy"
    np.save(path, src)
    loaded = np.load(path, allow_pickle=True)
    shape = loaded.shape  # np.asfortranarray makes a 0-d array 1-d
    positions = np.arange(n).reshape(shape)
    with npystream.open(path, nsidx=False) as arr:
        for _ in range(5):
            key = data.draw(_key_strategy(shape))
            try:
                probe = positions[key]
                want = loaded[key]
            except IndexError as exc:
                with pytest.raises(IndexError) as info:
                    arr[key]
                assert str(info.value) == str(exc)
                continue
            _same_result(arr[key], want, probe)
        # iteration over the first axis, and .flat in C order
        if shape:
            got_rows = list(arr)
            assert len(got_rows) == len(loaded)
            for g, w in zip(got_rows, loaded, strict=True):
                _same_result(g, w, positions[0])
        else:
            with pytest.raises(TypeError, match="0-d"):
                iter(arr)
        for g, w in zip(arr.flat, loaded.flat, strict=True):
            assert_same_element(g, w)
        assert len(arr.flat) == loaded.size
        if n:
            i = data.draw(st.integers(-n, n - 1))
            assert_same_element(arr.flat[i], loaded.flat[i])
            _same_result(arr.flat[1:3], loaded.flat[1:3], positions.flat[1:3])


def test_issue_reproducer_4x5(tmp_path):
    """Shape (4, 5): len 4, iteration yields 4 rows, arr[1] and arr[1:3] are object ndarrays."""
    path = tmp_path / "nd.npy"
    np.save(path, obj_array([_element(i) for i in range(20)], shape=(4, 5)))
    loaded = np.load(path, allow_pickle=True)
    with npystream.open(path) as arr:
        assert len(arr) == 4
        rows = list(arr)
        assert len(rows) == 4 and all(type(r) is np.ndarray and r.shape == (5,) for r in rows)
        _same_result(arr[1], loaded[1], loaded[1])
        _same_result(arr[1:3], loaded[1:3], loaded[1:3])
        assert_same_element(arr[1, 2], loaded[1, 2])
        assert [type(x) for x in arr.flat] == [type(x) for x in loaded.flat]
        listed = arr.tolist()  # like ndarray.tolist: nested lists of the elements as they are
        assert len(listed) == 4 and all(len(r) == 5 for r in listed)
        for r, want in zip(listed, loaded, strict=True):
            for g, w in zip(r, want, strict=True):
                assert_same_element(g, w)
        assert arr.get([7, 2]) == [loaded.flat[7], loaded.flat[2]]  # the list fast path


def test_one_d_slices_are_object_arrays(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, obj_array([1, "two", [3], {"four": 4}]))
    loaded = np.load(path, allow_pickle=True)
    with npystream.open(path) as arr:
        for key in [slice(1, 3), [0, 2], np.array([True, False, True, False]), slice(None, None, -1), Ellipsis]:
            got = arr[key]
            assert type(got) is np.ndarray and got.dtype == object
            _same_result(got, loaded[key], loaded[key])
        assert arr[2] == [3] and type(arr[2]) is list


# ---------------------------------------------------------------------------
# errors blame the element asked for


def test_random_access_blames_the_element_asked_for(tmp_path):
    path = tmp_path / "od.npy"
    np.save(path, obj_array([collections.OrderedDict(a=1), 5, collections.defaultdict(list)]))
    with npystream.open(path, nsidx=False) as arr:
        with pytest.raises(UnsafePickleError) as info:
            arr[2]
        assert info.value.index == 2
        assert "collections.defaultdict" in str(info.value) and "OrderedDict" not in str(info.value)
        assert arr[1] == 5
        with pytest.raises(UnsafePickleError, match="collections.OrderedDict") as info:
            arr[0]
        assert info.value.index == 0
    # once that global is allowed, the next one it needs is named
    with npystream.open(path, nsidx=False, allowed_globals=["collections.defaultdict"]) as arr:
        with pytest.raises(UnsafePickleError, match="builtins.list") as info:
            arr[2]
        assert info.value.index == 2
    with npystream.open(path, nsidx=False, allowed_globals=["collections.defaultdict", "builtins.list"]) as arr:
        assert arr[2] == collections.defaultdict(list)


def test_35_elements_last_one_names_itself(tmp_path):
    items = [collections.OrderedDict(b=2) if i == 18 else collections.Counter("ab") if i == 34 else i
             for i in range(35)]
    path = tmp_path / "b35.npy"
    np.save(path, obj_array(items))
    with npystream.open(path, nsidx=False) as arr:
        with pytest.raises(UnsafePickleError, match="collections.Counter") as info:
            arr[34]
        assert info.value.index == 34 and "element 18" not in str(info.value)
        assert arr[33] == 33
        for key in (slice(30, 35), [34, 1], slice(19, 35)):  # runs of elements name the same one
            with pytest.raises(UnsafePickleError, match="collections.Counter") as info:
                arr[key]
            assert info.value.index == 34
        with pytest.raises(UnsafePickleError, match="collections.Counter") as info:
            list(arr.iter_range(19, 35))
        assert info.value.index == 34


def test_a_read_back_class_is_blamed_on_the_asker(tmp_path):
    """Element 2 reads the class that element 0 memoized: refused for element 2, naming that class."""
    path = tmp_path / "three.npy"
    np.save(path, obj_array([collections.OrderedDict(a=i) for i in range(3)]))
    with npystream.open(path, nsidx=False) as arr, pytest.raises(UnsafePickleError) as info:
        arr[2]
    assert info.value.index == 2 and "collections.OrderedDict" in str(info.value)
    assert "element 0" in str(info.value)  # where the object it reads back is written


def test_a_read_back_string_is_served_without_the_refused_part(tmp_path):
    """Element 2 is the string 'collections', memoized inside refused element 0: it reads as np.load's."""
    path = tmp_path / "s.npy"
    np.save(path, obj_array([collections.OrderedDict(a=1), 5, "collections"]))
    with npystream.open(path, nsidx=False) as arr:
        assert arr[2] == "collections"


# ---------------------------------------------------------------------------
# alignment of zero-copy views


def _unaligned_file(path):
    rng = np.random.default_rng(1)
    items = []
    for i in range(40):
        items.append("x" * (i % 7))  # shifts the next payload by a few bytes
        items.append(rng.standard_normal(1000 + i).astype("<f4"))
        items.append(rng.standard_normal(50).astype("<f8"))
    np.save(path, obj_array(items))
    return np.load(path, allow_pickle=True)


def test_zero_copy_true_views_only_aligned_payloads(tmp_path):
    path = tmp_path / "u.npy"
    loaded = _unaligned_file(path)
    with npystream.open(path, zero_copy="always") as arr:
        views = [arr[i] for i in range(len(loaded)) if isinstance(loaded[i], np.ndarray)]
        assert all(not v.flags.writeable for v in views)
        assert any(not v.flags.aligned for v in views)  # the file does hold unaligned payloads
    with npystream.open(path) as arr:
        assert arr.zero_copy is True
        for i, want in enumerate(loaded):
            got = arr[i]
            assert_same_element(got, want)
            if isinstance(want, np.ndarray):
                assert got.flags.aligned
                assert not got.flags.writeable or got.flags.owndata or got.base is not None
                # numpy reduces aligned data through the same loops as np.load's array
                assert got.sum().tobytes() == want.sum().tobytes()
        got = list(arr.iter_range(0, len(loaded)))
        assert all(x.flags.aligned for x in got if isinstance(x, np.ndarray))
    got = list(npystream.iter_objects(path, zero_copy=True))
    assert all(x.flags.aligned for x in got if isinstance(x, np.ndarray))


def test_zero_copy_option_is_checked(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, obj_array([np.arange(3)]))
    with pytest.raises(TypeError, match="always"):
        npystream.open(path, zero_copy="sometimes")
    with pytest.raises(TypeError, match="always"):
        npystream.iter_objects(path, zero_copy=1)


# ---------------------------------------------------------------------------
# the small ones


def test_filename_is_the_path_np_load_gives(tmp_path):
    obj, fixed = tmp_path / "o.npy", tmp_path / "f.npy"
    np.save(obj, obj_array([1]))
    np.save(fixed, np.arange(3.0))
    for spell in (str, lambda p: p):  # a str path, a pathlib.Path: what np.memmap records for each
        want = np.load(spell(fixed), mmap_mode="r").filename
        assert want is not None
        got = npystream.open(spell(fixed)).filename
        assert got == want and type(got) is type(want)
        with npystream.open(spell(obj)) as arr:
            assert arr.filename == np.load(spell(fixed), mmap_mode="r").filename.__class__(
                os.path.abspath(obj))
    with ObjectArray(obj.read_bytes()) as arr:
        assert arr.filename is None


def test_dropped_without_close_no_resource_warning(tmp_path):
    path = tmp_path / "o.npy"
    np.save(path, obj_array([np.arange(3), "x"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        arr = npystream.open(path)
        assert arr[1] == "x"
        it = iter(arr)
        next(it)
        del arr, it
        gc.collect()


def test_iter_objects_on_a_fixed_dtype_file_is_an_npystream_error(tmp_path):
    path = tmp_path / "f.npy"
    np.save(path, np.arange(3))
    with pytest.raises(NpyStreamError, match="open") as info:
        npystream.iter_objects(path)
    assert isinstance(info.value, ValueError)  # still what np.load users catch
