"""ObjectArray's numpy-style key resolution (no file needed): numpy is the oracle."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from npystream import FormatError
from npystream.object_array import ObjectArray, _nest, resolve_key

SHAPES = [(), (0,), (1,), (7,), (3, 4), (2, 0, 3), (2, 3, 4), (1, 1, 1, 5)]


def _numpy_result(key, shape):
    base = np.arange(int(np.prod(shape)), dtype=np.intp).reshape(shape)
    return base[key]  # a numpy scalar where an object array gives its element, else an array


def _check(key, shape):
    try:
        want = _numpy_result(key, shape)
    except IndexError as exc:
        with pytest.raises(IndexError) as info:
            resolve_key(key, shape)
        assert str(info.value) == str(exc)
        return
    flat, positions = resolve_key(key, shape)
    if not isinstance(want, np.ndarray):
        assert positions is None and flat == int(want)
    else:
        assert flat is None
        assert positions.shape == want.shape
        assert np.array_equal(positions, want)


@pytest.mark.parametrize("shape", SHAPES)
def test_fixed_keys_match_numpy(shape):
    keys = [
        0, -1, 1, 5, -8, 100, (), Ellipsis, slice(None), slice(1, None, 2), slice(None, None, -1),
        [0], [0, -1, 0], np.array([], dtype=np.intp), (0, 0), (0, -1), (-1, 1, 2), (0, 0, 0, 0),
        (slice(None), 0), (Ellipsis, 0), (None, 0), np.int64(0), np.uint8(1),
        np.array(True), True, False, np.zeros(shape, bool) if shape else np.array(True),
        np.ones(shape, bool) if shape else np.array(False), [True] * (shape[0] if shape else 1),
        (0, [0, 1]), ([0, 1], [1, 0]),
    ]
    for key in keys:
        _check(key, shape)


@pytest.mark.parametrize("key", ["x", 1.5, None, [0.5], {"a": 1}, (0, "y")])
def test_bad_key_types_raise_like_numpy(key):
    for shape in [(3,), (3, 4)]:
        try:
            _numpy_result(key, shape)
        except (IndexError, TypeError) as exc:
            with pytest.raises(type(exc)):
                resolve_key(key, shape)
        else:
            _check(key, shape)


@settings(max_examples=80, deadline=None)
@given(data=st.data(), shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=6))
def test_basic_indices_match_numpy(data, shape):
    key = data.draw(hnp.basic_indices(shape, allow_newaxis=True, allow_ellipsis=True))
    _check(key, shape)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=6))
def test_integer_array_indices_match_numpy(data, shape):
    key = data.draw(hnp.integer_array_indices(shape))
    _check(key, shape)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5))
def test_boolean_masks_match_numpy(data, shape):
    mask = data.draw(hnp.arrays(bool, shape))
    _check(mask, shape)
    _check(mask.ravel()[: shape[0]] if mask.size else mask, shape)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 50), i=st.integers(-60, 60))
def test_out_of_bounds_messages_match_numpy(n, i):
    _check(i, (n,))
    _check((i, 0), (n, 1))


def test_resolution_memory_is_proportional_to_the_result():
    """A huge array: one element or a short slice never builds an index array of the array's size."""
    shape = (10**12,)
    assert resolve_key(-1, shape) == (10**12 - 1, None)
    flat, positions = resolve_key(slice(5, 8), shape)
    assert flat is None and positions.tolist() == [5, 6, 7]
    flat, positions = resolve_key((slice(None, 2), -1), (10**6, 10**6))
    assert positions.tolist() == [10**6 - 1, 2 * 10**6 - 1]


def test_nest():
    assert _nest([1, 2, 3], (3,)) == [1, 2, 3]
    assert _nest(list(range(6)), (2, 3)) == [[0, 1, 2], [3, 4, 5]]
    assert _nest(list(range(8)), (2, 2, 2)) == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    assert _nest([], (0, 3)) == []
    assert _nest([], (2, 0)) == [[], []]


def test_fixed_dtype_npy_is_not_an_object_array(tmp_path):
    path = tmp_path / "f.npy"
    np.save(path, np.arange(3))
    with pytest.raises(FormatError, match="ObjectArray"):
        ObjectArray(path)


def test_as_run():
    from npystream.object_array import _as_run

    assert _as_run(np.arange(3, 9)) == range(3, 9)
    assert _as_run(np.array([5])) == range(5, 6)
    assert _as_run(np.array([], dtype=np.intp)) == []
    assert _as_run(np.array([3, 5, 4])) == [3, 5, 4]
    assert _as_run(np.array([1, 3, 2, 4])) == [1, 3, 2, 4]  # same ends, not consecutive
    assert _as_run(np.array([4, 3])) == [4, 3]


def test_module_doctests():
    import doctest

    import npystream.object_array as mod

    result = doctest.testmod(mod)
    assert result.attempted > 0 and result.failed == 0
