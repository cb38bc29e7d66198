"""npystream.lazy / LazyArray against numpy's eager result (the oracle), on arrays, memmaps and concat views."""

from __future__ import annotations

import os
import sys
import tracemalloc
import warnings

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import npystream
from npystream import deferred
from npystream.deferred import Call, Cast, LazyArray, Leaf

DTYPES = [np.bool_, np.int8, np.uint8, np.int16, np.int32, np.int64, np.uint64, np.float16,
          np.float32, np.float64, np.complex64, ">f8", "<i2"]
BINARY = [np.add, np.subtract, np.multiply, np.true_divide, np.maximum, np.minimum, np.greater,
          np.equal, np.logical_and, np.arctan2, np.power, np.fmax, np.hypot, np.floor_divide]
UNARY = [np.sqrt, np.negative, np.absolute, np.exp, np.isnan, np.sign, np.square, np.logical_not,
         np.floor, np.sin]
HSETTINGS = settings(max_examples=60, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 7 elements: every expression spans many blocks, with a short last one."""
    monkeypatch.setattr(deferred, "BLOCK_ELEMENTS", 7)


def eager(fn, *args):
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            return fn(*args), None
        except Exception as exc:  # numpy's own error is part of the oracle
            return None, exc


def same(got, want):
    got_arr, want_arr = np.asarray(got), np.asarray(want)
    assert got_arr.dtype == want_arr.dtype, (got_arr.dtype, want_arr.dtype)
    assert got_arr.shape == want_arr.shape
    np.testing.assert_array_equal(got_arr, want_arr)


def as_kind(arr, kind, tmp_path, name="x"):
    """The same values as a plain array, a memmap of a .npy, or a 2-part concat view (axis 0 or last)."""
    if kind == "array":
        return arr
    if kind == "memmap":
        path = tmp_path / f"{name}.npy"
        np.save(path, arr)
        return np.load(path, mmap_mode="r")
    if kind == "concat_last":  # a concat view along the last axis: rows stitched from parts
        if arr.ndim < 2 or arr.shape[-1] < 2:
            return arr
        cut = arr.shape[-1] // 2
        return npystream.concat([arr[..., :cut], arr[..., cut:]], axis=arr.ndim - 1)
    if arr.ndim == 0 or arr.shape[0] < 2:
        return arr
    cut = arr.shape[0] // 2
    return npystream.concat([arr[:cut], arr[cut:]])


def small_elements(dt, nan=False):
    """Values in [-4, 4] (ints clipped to the dtype's range), NaN too when asked; None: numpy's default."""
    dt = np.dtype(dt)
    if dt.kind in "iu":
        return hnp.from_dtype(dt, min_value=max(-4, int(np.iinfo(dt).min)), max_value=4)
    if dt.kind == "f":
        finite = hnp.from_dtype(dt, min_value=-4, max_value=4)
        return st.one_of(finite, st.just(np.nan)) if nan else finite
    if dt.kind == "c":  # |z| <= 4 too: unbounded complex values overflow var/std's squares (1e264**2)
        finite = st.complex_numbers(max_magnitude=4, allow_nan=False, allow_infinity=False)
        return st.one_of(finite, st.just(complex(np.nan, 0))) if nan else finite
    return None


values = st.sampled_from(DTYPES).flatmap(
    lambda dt: hnp.arrays(np.dtype(dt), hnp.array_shapes(min_dims=1, max_dims=3, max_side=6),
                          elements=small_elements(dt, nan=True)))


@HSETTINGS
@given(data=st.data(), kind=st.sampled_from(["array", "memmap", "concat"]))
def test_binary_ufuncs_match_numpy(tmp_path, data, kind):
    shapes = data.draw(hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=3, max_side=5))
    dt1, dt2 = data.draw(st.sampled_from(DTYPES)), data.draw(st.sampled_from(DTYPES))
    x = data.draw(hnp.arrays(np.dtype(dt1), shapes.input_shapes[0]))
    y_kind = data.draw(st.sampled_from(["array", "lazy", "pyscalar", "npscalar"]))
    if y_kind == "pyscalar":
        y = data.draw(st.sampled_from([2, 3.5, True, -1, 1j]))
    elif y_kind == "npscalar":
        y = np.dtype(dt2).type(3)
    else:
        y = data.draw(hnp.arrays(np.dtype(dt2), shapes.input_shapes[1]))
    uf = data.draw(st.sampled_from(BINARY))
    reflect = data.draw(st.booleans())
    want, err = eager(lambda: uf(y, x) if reflect else uf(x, y))
    lx = npystream.lazy(as_kind(x, kind, tmp_path)) if x.ndim else x
    ly = npystream.lazy(y) if y_kind == "lazy" else y
    if err is not None:
        with pytest.raises(type(err)):
            got = uf(ly, lx) if reflect else uf(lx, ly)
            np.asarray(got)
        return
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        got = uf(ly, lx) if reflect else uf(lx, ly)
        if isinstance(got, LazyArray):
            assert got.dtype == np.asarray(want).dtype  # recorded dtype, before any evaluation
            assert got.shape == np.shape(want)
            got = got.compute()
    same(got, want)


@HSETTINGS
@given(x=values, uf=st.sampled_from(UNARY), kind=st.sampled_from(["array", "memmap", "concat"]))
def test_unary_ufuncs_and_chains_match_numpy(tmp_path, x, uf, kind):
    want, err = eager(lambda: (uf(x * 2) + 1) if x.dtype != bool else uf(~x))
    lx = npystream.lazy(as_kind(x, kind, tmp_path))
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        if err is not None:
            with pytest.raises(type(err)):
                np.asarray((uf(lx * 2) + 1) if x.dtype != bool else uf(~lx))
            return
        got = (uf(lx * 2) + 1) if x.dtype != bool else uf(~lx)
        assert got.dtype == want.dtype
        same(np.asarray(got), want)


def test_operators_where_clip_astype(tmp_path):
    a = np.arange(-20, 20, dtype=np.int16).reshape(8, 5)
    m = as_kind(a, "memmap", tmp_path)
    x = npystream.lazy(m)
    with np.errstate(all="ignore"):
        cases = [
            (x + 1, a + 1), (1 - x, 1 - a), (x * 2.5, a * 2.5), (x / 3, a / 3), (x // 3, a // 3),
            (x % 7, a % 7), (x ** 2, a ** 2), (-x, -a), (+x, +a), (abs(x), abs(a)), (~x, ~a),
            (x & 3, a & 3), (x | 8, a | 8), (x ^ 5, a ^ 5), (x << 1, a << 1), (x >> 1, a >> 1),
            (x < 3, a < 3), (x <= 3, a <= 3), (x > 3, a > 3), (x >= 3, a >= 3), (x == 3, a == 3),
            (x != 3, a != 3), (np.where(x > 0, x, 0.5), np.where(a > 0, a, 0.5)),
            (np.where(x > 0, x, np.int8(7)), np.where(a > 0, a, np.int8(7))),
            (np.clip(x, -3, 4), np.clip(a, -3, 4)), (x.clip(0, 2.5), a.clip(0, 2.5)),
            (x.astype(np.float32) / 3, a.astype(np.float32) / 3),
            (x.astype(np.uint8), a.astype(np.uint8)),
            (np.sqrt(np.abs(x)) + np.float32(1), np.sqrt(np.abs(a)) + np.float32(1)),
            (np.add(x, a[0]), np.add(a, a[0])), (x + [1, 2, 3, 4, 5], a + [1, 2, 3, 4, 5]),
        ]
    for got, want in cases:
        assert isinstance(got, LazyArray)
        same(got.compute(), want)
    m1, e1 = np.modf(x / 4)
    same(np.asarray(m1), np.modf(a / 4)[0])
    same(np.asarray(e1), np.modf(a / 4)[1])
    with pytest.raises(TypeError):
        x.astype(np.int8, casting="safe")


def test_nep50_weak_scalars_and_overflow():
    u = npystream.lazy(np.arange(10, dtype=np.uint8))
    assert (u + 3).dtype == np.uint8
    assert (u + 3.0).dtype == np.float64
    assert (u + np.int16(3)).dtype == np.int16
    assert np.sqrt(u).dtype == np.float16
    assert (npystream.lazy(np.ones(3, np.float32)) * 2.0).dtype == np.float32
    with pytest.raises(OverflowError):
        u + 300  # numpy 2 refuses an out-of-range Python int for uint8, and so do we


index_keys = st.one_of(
    hnp.basic_indices(shape=(9, 4, 3), allow_newaxis=True, allow_ellipsis=True),
    hnp.integer_array_indices(shape=(9, 4, 3)),
    st.lists(st.integers(-9, 8), min_size=0, max_size=6).map(lambda xs: np.array(xs, dtype=np.intp)),
    st.lists(st.booleans(), min_size=9, max_size=9).map(np.array),
    st.tuples(st.slices(9), st.integers(-4, 3)),
    st.tuples(st.lists(st.integers(-9, 8), min_size=1, max_size=4), st.slices(4),
              st.lists(st.integers(-3, 2), min_size=1, max_size=1)),
)


@HSETTINGS
@given(key=index_keys, kind=st.sampled_from(["array", "memmap", "concat", "concat_last"]),
       bcast=st.booleans())
def test_index_push_down_matches_numpy(tmp_path, key, kind, bcast):
    a = np.arange(9 * 4 * 3, dtype=np.float64).reshape(9, 4, 3)
    b = np.arange(3, dtype=np.int32) if bcast else np.arange(9 * 4 * 3, dtype=np.int32).reshape(9, 4, 3)
    x = npystream.lazy(as_kind(a, kind, tmp_path)) * 2 + b
    want, err = eager(lambda: (a * 2 + b)[key])
    if err is not None:
        with pytest.raises(type(err)):
            x[key]
        return
    got = x[key]
    if np.ndim(want) == 0:
        assert not isinstance(got, LazyArray)
        assert type(got) is type(want)
    same(got.compute() if isinstance(got, LazyArray) else got, want)


class Spy:
    """An array-like that records every key it is indexed with and how many elements it served."""

    def __init__(self, arr):
        self.arr = arr
        self.shape = arr.shape
        self.dtype = arr.dtype
        self.served = 0

    def __getitem__(self, key):
        out = self.arr[key]
        self.served += np.size(out)
        return out


def test_index_reads_only_the_selection():
    spy = Spy(np.arange(1_000_000, dtype=np.float64))
    b = npystream.lazy(spy) + 1
    assert spy.served == 0  # recording reads nothing
    assert b[1] == 2.0
    assert spy.served == 1
    assert b[10:20].compute().tolist() == list(np.arange(10, 20) + 1.0)
    assert spy.served == 11
    assert b[[5, 9]].compute().tolist() == [6.0, 10.0]
    assert spy.served == 13
    mat = Spy(np.arange(600.0).reshape(200, 3))
    col = (npystream.lazy(mat) * 2)[:, 1]
    assert col.shape == (200,) and mat.served == 200  # the column only (memmaps: a view, no read)
    same(col.compute(), np.arange(600.0).reshape(200, 3)[:, 1] * 2)
    assert mat.served == 200


def test_index_on_memmap_does_not_touch_other_pages(tmp_path):
    path = tmp_path / "big.npy"
    mm = npystream.create_npy(path, (4_000_000,), np.float64)
    mm[123456] = 7.0
    mm.flush()
    del mm
    b = npystream.open(path, lazy=True) * 2 + 1
    assert isinstance(b, LazyArray)
    assert b[123456] == 15.0


REDUCTIONS = ["sum", "mean", "min", "max", "std", "var", "prod", "any", "all", "argmin", "argmax"]


def close(got, want, dtype):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    if want.dtype.kind in "fc":
        eps = np.finfo(want.dtype).eps
        finite = np.abs(want[np.isfinite(want)].astype(np.complex128))
        scale = max(1.0, float(finite.max()) if finite.size else 1.0)
        np.testing.assert_allclose(got, want, rtol=200 * eps, atol=200 * eps * scale, equal_nan=True)
    else:
        np.testing.assert_array_equal(got, want)


@HSETTINGS
@given(data=st.data(), kind=st.sampled_from(["array", "memmap", "concat", "concat_last"]),
       red=st.sampled_from(REDUCTIONS))
def test_reductions_match_numpy(tmp_path, data, kind, red):
    dt = np.dtype(data.draw(st.sampled_from([np.bool_, np.int8, np.uint8, np.int32, np.int64,
                                             np.float16, np.float32, np.float64, np.complex128])))
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=7))
    a = data.draw(hnp.arrays(dt, shape, elements=small_elements(dt, nan=data.draw(st.booleans()))))
    axis = data.draw(st.sampled_from([None, *range(-len(shape), len(shape))]))
    keepdims = red not in ("argmin", "argmax") and data.draw(st.booleans())
    opts = {"axis": axis, **({"keepdims": True} if keepdims else {})}
    want, err = eager(lambda: getattr(a * 1 if dt.kind != "b" else a, red)(**opts))
    x = npystream.lazy(as_kind(a, kind, tmp_path))
    x = x * 1 if dt.kind != "b" else x
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        if err is not None:
            with pytest.raises(type(err)):
                getattr(x, red)(**opts)
            return
        got = getattr(x, red)(**opts)
        via_np = getattr(np, red)(x, **opts)
    close(got, want, dt)
    close(via_np, want, dt)
    if axis is None and not keepdims:
        assert np.ndim(got) == 0 and not isinstance(got, np.ndarray)  # a numpy scalar, like numpy


def test_reduction_dtype_and_ddof_options():
    a = np.arange(1, 50, dtype=np.int32).reshape(7, 7)
    x = npystream.lazy(a)
    close(x.sum(dtype=np.float32), a.sum(dtype=np.float32), np.float32)
    close(x.mean(axis=0, dtype=np.float32), a.mean(axis=0, dtype=np.float32), np.float32)
    close(x.var(ddof=1), a.var(ddof=1), np.float64)
    close(np.std(x, axis=1, ddof=1), np.std(a, axis=1, ddof=1), np.float64)
    close(np.add.reduce(x), np.add.reduce(a), np.int32)
    close(np.maximum.reduce(x, axis=1), np.maximum.reduce(a, axis=1), np.int32)
    out = np.empty(7)
    assert x.sum(axis=1, out=out) is out
    close(out, a.sum(axis=1).astype(float), np.float64)
    with pytest.raises(np.exceptions.AxisError):
        x.sum(axis=2)


def test_float_sum_error_is_numpy_sized(monkeypatch):
    monkeypatch.setattr(deferred, "BLOCK_ELEMENTS", 1 << 12)
    rng = np.random.default_rng(0)
    a = rng.random(1_000_003, dtype=np.float32)
    exact = np.sum(a, dtype=np.float64)
    got = npystream.lazy(a).sum()
    assert got.dtype == np.float32
    # within a few float32 ulps of the exact sum, like numpy's pairwise sum
    assert abs(float(got) - exact) <= 8 * np.finfo(np.float32).eps * exact
    assert abs(float(np.sum(a)) - exact) <= 8 * np.finfo(np.float32).eps * exact


def test_reductions_use_bounded_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(deferred, "BLOCK_ELEMENTS", 1 << 16)
    path = tmp_path / "a.npy"
    mm = npystream.create_npy(path, (2_000_000,), np.float64)  # 16 MB
    mm[:] = 1.5
    mm.flush()
    del mm
    a = npystream.open(path, lazy=True)
    tracemalloc.start()
    try:
        total = ((a * 2 + a) - 1).sum()
        mean = np.sqrt(a * a).mean()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == 2_000_000 * 3.5 and mean == 1.5
    assert peak < 4 << 20, peak  # a few 512 KiB blocks, not 16 MB temporaries


def test_any_all_stop_at_the_first_deciding_block():
    spy = Spy(np.ones(10_000, dtype=bool))
    assert npystream.lazy(spy).any()
    assert spy.served == 7  # the first block decided it


def test_compute_asarray_and_out(tmp_path):
    a = np.arange(100.0).reshape(20, 5)
    x = npystream.lazy(as_kind(a, "memmap", tmp_path)) * 2
    same(np.asarray(x), a * 2)
    same(x.compute(), a * 2)
    out = npystream.create_npy(tmp_path / "o.npy", x.shape, x.dtype)
    res = np.add(x, 1, out=out)
    assert res is out
    out.flush()
    same(np.load(tmp_path / "o.npy"), a * 2 + 1)
    with pytest.raises(ValueError, match="shape"):
        np.add(x, 1, out=np.empty((5, 20)))
    with pytest.raises(ValueError, match="shape"):
        x.compute(out=np.empty(3))
    assert float((npystream.lazy(np.array([2.5])) * 2).sum()) == 5.0
    assert len(x) == 20 and x.ndim == 2 and x.size == 100 and x.nbytes == 800
    same(np.stack([np.asarray(r) for r in x]), a * 2)


def test_bad_operands_raise_clear_errors():
    with pytest.raises(npystream.UnsupportedError, match="strings"):
        npystream.lazy(["a", "b"])
    with pytest.raises(npystream.UnsupportedError, match="Python objects"):
        npystream.lazy(np.array([1, None], dtype=object))
    with pytest.raises(npystream.UnsupportedError):
        npystream.lazy(np.ones(3)) + {"a": 1}
    with pytest.raises(npystream.UnsupportedError):
        npystream.lazy(np.ones(3)) + "text"
    with pytest.raises(npystream.ShapeError, match=r"\(3,\) \(4,\)") as info:
        npystream.lazy(np.ones(3)) + np.ones(4)
    assert isinstance(info.value, ValueError)
    x = npystream.lazy(np.ones((4, 3)))
    with pytest.raises(IndexError):
        x[4]
    with pytest.raises(IndexError):
        x[:, [0, 3]]
    with pytest.raises(TypeError, match="read-only"):
        x[0] = 1
    with pytest.raises(npystream.UnsupportedError, match="np.asarray"):
        np.concatenate([x, x])
    with pytest.raises(npystream.UnsupportedError):
        np.add.accumulate(x)
    with pytest.raises(npystream.UnsupportedError):
        np.add(x, 1, where=np.ones((4, 3), bool))


def test_tree_is_walkable_and_evaluate_with():
    a = np.arange(12.0).reshape(4, 3)
    b = np.arange(3)
    x = np.where(npystream.lazy(a) > 4, (npystream.lazy(a) * 2 + b).astype(np.float32), -1.0)
    root = x.node
    assert isinstance(root, Call) and root.func is np.where
    kinds = set()

    def walk(n):
        kinds.add(type(n))
        for c in ([n.child] if isinstance(n, Cast) else n.args if isinstance(n, Call) else []):
            if isinstance(c, deferred.Node):
                walk(c)

    walk(root)
    assert kinds == {Call, Cast, Leaf}
    assert [id(v) for v in x.leaves] == [id(a), id(b)]
    calls = []
    got = x.evaluate_with(lambda arr: calls.append(1) or np.array(arr))
    same(got, np.where(a > 4, (a * 2 + b).astype(np.float32), -1.0))
    assert len(calls) == 2  # each leaf converted once, although `a` appears twice


def test_evaluate_with_dask():
    da = pytest.importorskip("dask.array")
    a = np.arange(30.0).reshape(10, 3)
    x = np.sqrt(npystream.lazy(a) * 2 + 1).astype(np.float32)
    d = x.evaluate_with(lambda arr: da.from_array(arr, chunks=4))
    assert isinstance(d, da.Array)
    same(d.compute(), np.sqrt(a * 2 + 1).astype(np.float32))


def test_to_dask_without_the_adapter_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "npystream.dask", None)
    with pytest.raises(npystream.UnsupportedError, match=r"pip install 'npystream\[dask\]'"):
        npystream.lazy(np.ones(3)).to_dask()


def test_open_lazy_refuses_object_files(tmp_path):
    path = tmp_path / "obj.npy"
    np.save(path, np.array([1, "x"], dtype=object), allow_pickle=True)
    with pytest.raises(npystream.UnsupportedError, match="fixed-dtype"):
        npystream.open(path, lazy=True)


def test_save_npy_writes_standard_files_atomically(tmp_path, monkeypatch):
    a = np.arange(1000, dtype=">f8").reshape(100, 10)
    m = as_kind(a, "memmap", tmp_path)
    dst = tmp_path / "out.npy"
    npystream.save_npy(dst, npystream.lazy(m) * 2 + 1)
    same(np.load(dst), a * 2 + 1)
    npystream.save_npy(dst, m, overwrite=True)  # any array-like: a plain memmap
    same(np.load(dst), a)
    with pytest.raises(FileExistsError):
        npystream.save_npy(dst, m)
    npystream.save_npy(tmp_path / "scalar.npy", npystream.lazy(np.float32(2.5) * np.ones(())) * 2)
    same(np.load(tmp_path / "scalar.npy"), np.float32(2.5) * np.ones(()) * 2)
    npystream.save_npy(tmp_path / "empty.npy", npystream.lazy(np.ones((0, 3))) + 1)
    same(np.load(tmp_path / "empty.npy"), np.ones((0, 3)))

    class Boom(Spy):
        def __getitem__(self, key):
            if self.served > 20:
                raise RuntimeError("disk on fire")
            return super().__getitem__(key)

    with pytest.raises(RuntimeError):
        npystream.save_npy(tmp_path / "fail.npy", npystream.lazy(Boom(np.ones(1000))) + 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.npy", "out.npy", "scalar.npy", "x.npy"]


@pytest.mark.parametrize("name", ["npystream.deferred", "npystream.concatenation"])
def test_module_doctests(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0


def test_truncated_memmap_raises_instead_of_sigbus(tmp_path):
    path = tmp_path / "t.npy"
    np.save(path, np.arange(100_000, dtype=np.float64))
    x = npystream.open(path, lazy=True) + 1
    os.truncate(path, 4096)
    with pytest.raises(npystream.TruncatedError, match="truncated"):
        x.sum()
    with pytest.raises(npystream.TruncatedError):
        x[99_999]
