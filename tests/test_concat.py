"""npystream.concat / ConcatArray against np.concatenate (the oracle): indexing, any axis, files, errors."""

from __future__ import annotations

import os

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import npystream
from npystream import ConcatArray

HSETTINGS = settings(max_examples=80, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def oracle(fn):
    try:
        return fn(), None
    except Exception as exc:
        return None, exc


def parts_for(lengths, axis, inner=(3, 2), dtype=np.int32):
    out = []
    start = 0
    for n in lengths:
        shape = list(inner)
        shape.insert(axis, n)
        size = int(np.prod(shape))
        out.append(np.arange(start, start + size, dtype=dtype).reshape(shape))
        start += size
    return out


@st.composite
def concat_keys(draw, shape):
    n0 = shape[0]
    return draw(st.one_of(
        st.integers(-n0 - 1, n0),
        st.slices(n0),
        hnp.basic_indices(shape=shape, allow_newaxis=True, allow_ellipsis=True),
        *([hnp.integer_array_indices(shape=shape)] if min(shape) > 0 else []),
        st.lists(st.integers(-n0, max(n0 - 1, 0)), max_size=8).map(lambda xs: np.array(xs, np.intp)),
        st.lists(st.booleans(), min_size=n0, max_size=n0).map(np.array),
        st.tuples(st.slices(n0), st.integers(-shape[1], max(shape[1] - 1, 0))),
        st.tuples(st.slices(n0), st.lists(st.integers(-shape[1], max(shape[1] - 1, 0)), min_size=1, max_size=3)),
        st.tuples(st.lists(st.integers(0, max(n0 - 1, 0)), min_size=1, max_size=3), st.just(Ellipsis),
                  st.lists(st.integers(0, max(shape[-1] - 1, 0)), min_size=1, max_size=1)),
        st.just(np.arange(np.prod(shape)).reshape(shape) % 3 == 0),
    ))


@HSETTINGS
@given(data=st.data(), lengths=st.lists(st.integers(0, 4), min_size=1, max_size=5),
       axis=st.integers(0, 2), source=st.sampled_from(["arrays", "files"]))
def test_indexing_matches_numpy(tmp_path, data, lengths, axis, source):
    arrays = parts_for(lengths, axis)
    items = arrays
    if source == "files":
        items = []
        for i, a in enumerate(arrays):
            p = tmp_path / f"p{i}.npy"
            np.save(p, a)
            items.append(str(p))
    c = npystream.concat(items, axis=axis)
    full = np.concatenate(arrays, axis=axis)
    assert (c.shape, c.dtype, c.ndim, c.size, c.nbytes, len(c)) == (
        full.shape, full.dtype, full.ndim, full.size, full.nbytes, len(full))
    np.testing.assert_array_equal(np.asarray(c), full)
    for _ in range(5):
        key = data.draw(concat_keys(full.shape))
        want, err = oracle(lambda key=key: full[key])
        if err is not None:
            with pytest.raises(type(err)):
                c[key]
            continue
        got = c[key]
        assert np.asarray(got).dtype == want.dtype and np.shape(got) == np.shape(want), key
        np.testing.assert_array_equal(got, want)
    c.close()


def test_selection_inside_one_file_is_a_view_of_its_memmap(tmp_path):
    arrays = parts_for([4, 5, 3], 0)
    paths = []
    for i, a in enumerate(arrays):
        paths.append(str(tmp_path / f"p{i}.npy"))
        np.save(paths[-1], a)
    c = npystream.concat(paths)
    assert c.paths == tuple(paths) and c.axis == 0 and c.offsets == (0, 4, 9, 12)
    assert all(isinstance(p, np.memmap) for p in c.parts)
    for key in (5, -1, slice(4, 8), slice(8, 4, -2), (6, 1), (slice(5, 7), 2, 1)):
        got = c[key]
        assert isinstance(got, np.memmap) or np.isscalar(got), key
        if isinstance(got, np.ndarray) and got.size:
            assert np.shares_memory(got, c.parts[1] if key != -1 else c.parts[2]), key
    spanning = c[2:6]
    assert not any(np.shares_memory(spanning, p) for p in c.parts)
    np.testing.assert_array_equal(spanning, np.concatenate(arrays)[2:6])
    np.testing.assert_array_equal(np.stack(list(c)), np.concatenate(arrays))


def test_integer_array_rows_for_loaders(tmp_path):
    arrays = [np.random.default_rng(i).random((50, 8), dtype=np.float32) for i in range(10)]
    paths = []
    for i, a in enumerate(arrays):
        paths.append(tmp_path / f"r{i}.npy")
        np.save(paths[-1], a)
    c = npystream.concat(paths)
    full = np.concatenate(arrays)
    idx = np.random.default_rng(0).integers(-len(full), len(full), 1000)
    np.testing.assert_array_equal(c[idx], full[idx])
    np.testing.assert_array_equal(c[idx.tolist()], full[idx])
    np.testing.assert_array_equal(c[np.array([], dtype=np.intp)], full[np.array([], dtype=np.intp)])


def test_nested_npz_member_dtype_cast_and_lazy_operand(tmp_path):
    a = np.arange(12, dtype=np.int16).reshape(4, 3)
    b = np.arange(100, 106, dtype=np.int16).reshape(2, 3)
    np.savez(tmp_path / "z.npz", b=b)
    np.save(tmp_path / "a.npy", a)
    inner = npystream.concat([str(tmp_path / "a.npy"), f"{tmp_path / 'z.npz'}:b"])
    outer = npystream.concat([inner, np.zeros((1, 3), np.int16)])
    assert len(outer.parts) == 3  # flattened
    full = np.concatenate([a, b, np.zeros((1, 3), np.int16)])
    np.testing.assert_array_equal(np.asarray(outer), full)
    side = npystream.concat([inner, inner], axis=1)
    np.testing.assert_array_equal(side[1:5], np.concatenate([full[:6]] * 2, axis=1)[1:5])
    cast = npystream.concat([a, np.ones((2, 3), np.float32)], dtype=np.float64)
    assert cast.dtype == np.float64 and cast[5].dtype == np.float64
    np.testing.assert_array_equal(cast[3:5], np.array([[9, 10, 11], [1, 1, 1]], np.float64))
    x = npystream.lazy(outer) * 2 + 1
    np.testing.assert_array_equal(np.asarray(x), full * 2 + 1)
    assert x[1:6].sum() == (full * 2 + 1)[1:6].sum()
    assert x.sum(axis=0).tolist() == (full * 2 + 1).sum(axis=0).tolist()
    view = outer.select((slice(2, 6), slice(1, 3)))
    assert isinstance(view, ConcatArray)  # a sub-view over the parts, nothing read
    np.testing.assert_array_equal(np.asarray(view), full[2:6, 1:3])


def test_mismatches_raise_shape_errors_naming_the_file(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((3, 4)))
    np.save(tmp_path / "b.npy", np.zeros((3, 5)))
    np.save(tmp_path / "c.npy", np.zeros((3, 4), np.float32))
    np.save(tmp_path / "o.npy", np.array([1, "x"], dtype=object), allow_pickle=True)
    with pytest.raises(npystream.ShapeError, match=r"b\.npy.*\(3, 5\).*\(3, 4\)"):
        npystream.concat([tmp_path / "a.npy", tmp_path / "b.npy"])
    with pytest.raises(npystream.ShapeError, match=r"c\.npy.*float32.*float64.*dtype="):
        npystream.concat([tmp_path / "a.npy", tmp_path / "c.npy"])
    with pytest.raises(npystream.UnsupportedError, match="Python objects"):
        npystream.concat([tmp_path / "o.npy"])
    with pytest.raises(npystream.StoreNotFoundError):
        npystream.concat([tmp_path / "missing.npy"])
    with pytest.raises(npystream.ShapeError, match="zero-dimensional"):
        npystream.concat([np.float64(1.0) * np.ones(())])
    with pytest.raises(np.exceptions.AxisError):
        npystream.concat([np.zeros((2, 2))], axis=2)
    with pytest.raises(ValueError, match="at least one"):
        npystream.concat([])
    with pytest.raises(TypeError):
        npystream.concat(str(tmp_path / "a.npy"))
    c = npystream.concat([tmp_path / "a.npy", tmp_path / "a.npy"])
    with pytest.raises(IndexError, match="out of bounds"):
        c[6]
    with pytest.raises(IndexError, match="out of bounds"):
        c[[0, 6]]
    with pytest.raises(IndexError, match="too many indices"):
        c[0, 0, 0]


def test_truncated_file_under_a_view_raises_not_sigbus(tmp_path):
    p = tmp_path / "a.npy"
    np.save(p, np.arange(4096, dtype=np.float64))
    np.save(tmp_path / "b.npy", np.arange(10, dtype=np.float64))
    c = npystream.concat([p, tmp_path / "b.npy"])
    assert c[4095] == 4095
    os.truncate(p, 1000)
    for key in (5, slice(4090, 4100), [1, 4097]):
        with pytest.raises(npystream.TruncatedError, match="truncated"):
            c[key]
    with pytest.raises(npystream.TruncatedError):
        np.asarray(c)


def test_deleted_file_stays_readable(tmp_path):
    p = tmp_path / "a.npy"
    np.save(p, np.arange(10))
    c = npystream.concat([p, np.arange(3)])
    os.unlink(p)
    np.testing.assert_array_equal(np.asarray(c), np.concatenate([np.arange(10), np.arange(3)]))


def test_save_copies_files_in_the_kernel_and_falls_back(tmp_path, monkeypatch):
    arrays = [np.arange(i * 7, i * 7 + 7 * 3, dtype="<u2").reshape(-1, 3) for i in range(3)]
    paths = []
    for i, a in enumerate(arrays):
        paths.append(tmp_path / f"p{i}.npy")
        np.save(paths[-1], a)
    want = np.concatenate(arrays)
    c = npystream.concat(paths)
    assert c.copyable()
    c.save(tmp_path / "k.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "k.npy"), want)
    from npystream.formats import fixed

    calls = []

    def no_cfr(*args):
        calls.append("cfr")
        raise OSError(18, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", no_cfr)
    npystream.save_npy(tmp_path / "s.npy", c)
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), want)
    monkeypatch.setattr(os, "sendfile", lambda *a: (_ for _ in ()).throw(OSError(22, "nope")))
    c.save(tmp_path / "r.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "r.npy"), want)
    assert calls and fixed is not None
    f = tmp_path / "f.npy"
    np.save(f, np.asfortranarray(np.arange(6, dtype="<u2").reshape(2, 3)))
    mixed = npystream.concat([paths[0], f])
    assert not mixed.copyable()
    mixed.save(tmp_path / "m.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), np.concatenate([arrays[0], np.load(f)]))


def test_pickles_by_file_name(tmp_path):
    import pickle

    np.save(tmp_path / "a.npy", np.arange(10_000, dtype=np.float64))
    c = npystream.concat([tmp_path / "a.npy", tmp_path / "a.npy"])
    blob = pickle.dumps(c)
    assert len(blob) < 2000  # names, not 160 kB of data
    back = pickle.loads(blob)
    np.testing.assert_array_equal(back[[1, 15_000]], c[[1, 15_000]])
    mixed = npystream.concat([np.arange(3.0), tmp_path / "a.npy"])
    np.testing.assert_array_equal(np.asarray(pickle.loads(pickle.dumps(mixed))), np.asarray(mixed))
