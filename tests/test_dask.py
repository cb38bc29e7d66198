"""npystream.dask on a real ``dask.distributed.LocalCluster`` (two worker processes), against single-process results."""

from __future__ import annotations

import fractions
import os
import pickle

import numpy as np
import pytest
from objcases import assert_same_store

import npystream
from npystream.errors import (
    CastError,
    NpyStreamError,
    StoreNotFoundError,
    UnsafePickleError,
    UnsupportedError,
)

distributed = pytest.importorskip("distributed")
da = pytest.importorskip("dask.array")
db = pytest.importorskip("dask.bag")
nd = pytest.importorskip("npystream.dask")

# Only decoding object .npy files depends on the backend (C accelerator or pure Python);
# the rest runs once, on the default path.
once = pytest.mark.skipif(os.environ.get("NPYSTREAM_PURE_PYTHON") == "1",
                          reason="backend-independent: runs on the C path only")


@pytest.fixture(scope="module")
def client():
    """One cluster for the module: separate worker processes that receive pickled tasks."""
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
    c = distributed.Client(cluster)
    try:
        yield c
    finally:
        c.close()
        cluster.close()


def _graph_bytes(collection) -> int:
    import cloudpickle

    return len(cloudpickle.dumps(dict(collection.__dask_graph__())))


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    return type(a) is type(b) and a == b


def _objects(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty(n, dtype=object)
    for i in range(n):
        r = i % 4
        out[i] = (np.arange(int(rng.integers(0, 9)), dtype=np.int32) if r == 0 else
                  f"s{i}" if r == 1 else
                  {"k": i, "v": [1.5, None]} if r == 2 else
                  rng.standard_normal((2, int(rng.integers(0, 4)))).astype(">f4"))
    return out


# --------------------------------------------------------------------------- fixed dtypes


@once
@pytest.mark.parametrize("case", ["c", "fortran", "bigendian-structured", "zero-d", "empty"])
def test_fixed_npy_matches_np_load(client, tmp_path, case):
    a = {
        "c": np.arange(600, dtype=np.int64).reshape(20, 30),
        "fortran": np.asfortranarray(np.arange(600, dtype="<f4").reshape(20, 30)),
        "bigendian-structured": np.array([(i, i / 3) for i in range(50)], dtype=[("a", ">i4"), ("b", ">f8")]),
        "zero-d": np.array(7.5),
        "empty": np.zeros((0, 4), dtype=np.int16),
    }[case]
    p = tmp_path / "a.npy"
    np.save(p, a)
    x = npystream.to_dask(p, chunks=(7, 11)[: a.ndim] if a.ndim else ())
    assert isinstance(x, da.Array)
    got = x.compute()
    want = np.load(p)
    assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)


@once
def test_memmap_views_any_strides(client, tmp_path):
    a = np.arange(2400, dtype=np.float64).reshape(40, 60)
    p = tmp_path / "a.npy"
    np.save(p, a)
    m = npystream.open(p)
    for key in [np.s_[3:31:2, ::-5], np.s_[::-1], np.s_[5], np.s_[:, 7:8]]:
        x = npystream.to_dask(m[key], chunks=4)
        np.testing.assert_array_equal(x.compute(), a[key])
    x = npystream.to_dask(m.T, chunks=(13, 9))
    np.testing.assert_array_equal((x + 1).sum(axis=0).compute(), (a.T + 1).sum(axis=0))
    mm = np.load(p, mmap_mode="r")  # numpy's own memmap: its .filename and .offset
    np.testing.assert_array_equal(npystream.to_dask(mm[7:, 1::4], chunks=5).compute(), a[7:, 1::4])


@once
def test_in_memory_array_refused(tmp_path):
    with pytest.raises(TypeError, match="from_array"):
        npystream.to_dask(np.arange(3))


@once
def test_npz_members(client, tmp_path):
    p = tmp_path / "z.npz"
    x, y = np.arange(100.0).reshape(10, 10), np.ones(7, ">i2")
    o = np.empty(2, dtype=object)
    o[:] = ["a", 1]
    np.savez(p, x=x, y=y, o=o)
    got = npystream.to_dask(f"{p}:x", chunks=3)
    np.testing.assert_array_equal(got.compute(), x)
    with npystream.open(p) as archive:
        with pytest.raises(UnsupportedError, match="Python objects"):
            npystream.to_dask(archive)
        np.testing.assert_array_equal(npystream.to_dask(archive["y"]).compute(), y)
    q = tmp_path / "c.npz"
    np.savez_compressed(q, x=x)
    with pytest.raises(UnsupportedError, match="deflated"):
        npystream.to_dask(f"{q}:x")


@once
def test_fixed_graph_holds_no_data(tmp_path):
    p = tmp_path / "big.npy"
    np.save(p, np.ones((50 << 20) // 8))
    x = npystream.to_dask(p, chunks=(1 << 20) + (1 << 18))
    size = _graph_bytes(x)
    assert size < (1 << 20)
    small = tmp_path / "small.npy"
    np.save(small, np.ones((5 << 20) // 8))
    y = npystream.to_dask(small, chunks=(1 << 17))  # the same number of blocks over a 10x smaller file
    assert x.npartitions == y.npartitions
    assert abs(_graph_bytes(y) - size) < 1000


@once
def test_fixed_file_changed_or_missing(client, tmp_path):
    p = tmp_path / "a.npy"
    np.save(p, np.arange(100))
    x = npystream.to_dask(p, chunks=10)
    np.save(p, np.arange(200))  # size differs
    with pytest.raises(NpyStreamError, match=r"block \[") as err:
        x.compute()
    assert str(p) in str(err.value) and "changed" in str(err.value)
    y = npystream.to_dask(p, chunks=50)
    os.unlink(p)
    with pytest.raises(StoreNotFoundError, match="missing on this worker"):
        y.compute()


# --------------------------------------------------------------------------- object .npy


def test_object_npy_bag_equals_iter_objects(client, tmp_path):
    a = _objects(400)
    p = tmp_path / "o.npy"
    np.save(p, a)
    bag = npystream.to_dask(p, partition_bytes=2000)
    assert isinstance(bag, db.Bag)
    assert bag.npartitions > 3
    assert os.path.exists(str(p) + ".nsidx")  # built once on the client, reused by the workers
    got = bag.compute()
    want = list(npystream.iter_objects(p))
    assert len(got) == len(want) == 400
    assert all(_same(g, w) for g, w in zip(got, want))
    sizes = bag.map(lambda x: len(x) if hasattr(x, "__len__") else 0).sum().compute()
    assert sizes == sum(len(x) if hasattr(x, "__len__") else 0 for x in want)


def test_object_empty_and_zero_d(client, tmp_path):
    p = tmp_path / "e.npy"
    np.save(p, np.empty(0, dtype=object))
    assert npystream.to_dask(p).compute() == []
    q = tmp_path / "z.npy"
    np.save(q, np.array({"a": 1}, dtype=object))
    assert npystream.to_dask(q).compute() == [{"a": 1}]


@once
def test_object_graph_grows_with_partitions_not_bytes(tmp_path):
    p = tmp_path / "big.npy"
    a = np.empty(12_500, dtype=object)
    a[:] = [np.full(1000, i, dtype=np.int32) for i in range(len(a))]  # 50 MB of pickle
    np.save(p, a)
    assert os.path.getsize(p) > 50e6
    few = npystream.to_dask(p, partition_bytes=8 << 20)
    many = npystream.to_dask(p, partition_bytes=1 << 20)
    assert _graph_bytes(few) < (1 << 20)
    assert many.npartitions > 5 * few.npartitions
    assert _graph_bytes(many) > _graph_bytes(few)
    q = tmp_path / "small.npy"
    np.save(q, a[:1250])  # 10x fewer bytes, the same partition count
    small = npystream.to_dask(q, partition_bytes=(1 << 20) // 10)
    assert abs(small.npartitions - many.npartitions) <= 1
    assert abs(_graph_bytes(small) - _graph_bytes(many)) < 64 * 20 + 200


def test_object_hostile_partition_same_error_on_client(client, tmp_path):
    a = _objects(300)
    a[250] = fractions.Fraction(1, 3)
    p = tmp_path / "h.npy"
    np.save(p, a)
    with pytest.raises(UnsafePickleError) as single:
        list(npystream.iter_objects(p))
    bag = npystream.to_dask(p, partition_bytes=2000)
    with pytest.raises(UnsafePickleError) as err:
        bag.compute()
    assert str(err.value) == str(single.value)
    assert err.value.index == 250 and err.value.path == single.value.path
    # the safety options travel with the tasks
    ok = npystream.to_dask(p, partition_bytes=2000, allowed_globals=["fractions.Fraction"]).compute()
    assert ok[250] == fractions.Fraction(1, 3)


@once
def test_object_file_changed_names_partition(client, tmp_path):
    p = tmp_path / "o.npy"
    np.save(p, _objects(200))
    bag = npystream.to_dask(p, partition_bytes=1000)
    np.save(p, _objects(201))
    with pytest.raises(NpyStreamError, match=r"partition \d+ \(elements") as err:
        bag.compute()
    assert str(p) in str(err.value)
    bag = npystream.to_dask(p, partition_bytes=1000)
    os.unlink(p)
    with pytest.raises(StoreNotFoundError, match=r"partition \d+ \(elements"):
        bag.compute()


@once
def test_object_stream_refused(tmp_path):
    p = tmp_path / "o.npy"
    np.save(p, _objects(5))
    with open(p, "rb") as f, npystream.ObjectArray(f.read()) as arr:
        with pytest.raises(UnsupportedError, match="by path"):
            npystream.to_dask(arr)


# --------------------------------------------------------------------------- ragged stores


@once
def test_ragged_bag_and_arrays(client, tmp_path):
    elems = [np.arange(i % 7, dtype="<u2") for i in range(300)]
    r = npystream.save_ragged(tmp_path / "r.ragged", elems)
    bag = npystream.to_dask(tmp_path / "r.ragged", partition_bytes=100)
    assert bag.npartitions > 3
    got = bag.compute()
    assert all(_same(np.asarray(g), e) for g, e in zip(got, elems)) and len(got) == 300
    view = npystream.to_dask(r[10:50], partition_bytes=30).compute()
    assert all(np.array_equal(g, e) for g, e in zip(view, elems[10:50])) and len(view) == 40
    values, offsets = nd.ragged_arrays(r, chunks=64)
    np.testing.assert_array_equal(values.compute(), np.concatenate(elems))
    np.testing.assert_array_equal(offsets.compute(), np.concatenate([[0], np.cumsum([len(e) for e in elems])]))
    s = npystream.save_ragged(tmp_path / "s.ragged", ["a", "bé", ""])
    assert npystream.to_dask(s).compute() == ["a", "bé", ""]


@once
def test_ragged_fixed_shape_as_array(client, tmp_path):
    elems = [np.full((3, 2), i, dtype=np.float32) for i in range(25)]
    r = npystream.save_ragged(tmp_path / "r.ragged", elems)
    x = nd.ragged_to_array(r)
    np.testing.assert_array_equal(x.compute(), np.stack(elems))
    q = npystream.save_ragged(tmp_path / "q.ragged", [np.ones(2), np.ones(2), np.ones(3)])
    with pytest.raises(ValueError, match="element 2"):
        nd.ragged_to_array(q)


# --------------------------------------------------------------------------- writers


@once
@pytest.mark.parametrize("kind", ["int32", "2d", "str", "object"])
def test_to_ragged_byte_identical_to_save_ragged(client, tmp_path, kind):
    n = 333
    elems = {
        "int32": [np.arange(i % 11, dtype=np.int32) for i in range(n)],
        "2d": [np.full((i % 3, 2), i, dtype=">f8") for i in range(n)],
        "str": [f"é{i}" * (i % 4) for i in range(n)],
        "object": [{"i": i} for i in range(n)],
    }[kind]
    options = {"kind": "object"} if kind == "object" else {}
    bag = db.from_sequence(elems, npartitions=9)
    out = nd.to_ragged(bag, tmp_path / "par.ragged", **options)
    npystream.save_ragged(tmp_path / "seq.ragged", elems, durable=False, **options)
    assert_same_store(tmp_path / "par.ragged", tmp_path / "seq.ragged")
    assert len(out) == n
    assert sorted(os.listdir(tmp_path)) == ["par.ragged", "seq.ragged"]  # nothing left behind


@once
def test_to_ragged_empty_partitions_and_empty_bag(client, tmp_path):
    bag = db.from_sequence(range(40), npartitions=8).filter(lambda i: i < 5 or i > 33).map(
        lambda i: np.arange(i, dtype=np.int16))
    nd.to_ragged(bag, tmp_path / "a.ragged")
    npystream.save_ragged(tmp_path / "b.ragged", [np.arange(i, dtype=np.int16) for i in range(40) if i < 5 or i > 33],
                          durable=False)
    assert_same_store(tmp_path / "a.ragged", tmp_path / "b.ragged")
    empty = db.from_sequence(range(10), npartitions=3).filter(lambda i: False)
    nd.to_ragged(empty, tmp_path / "e.ragged")
    npystream.save_ragged(tmp_path / "f.ragged", [], durable=False)
    assert_same_store(tmp_path / "e.ragged", tmp_path / "f.ragged")


@once
def test_to_ragged_cast_error_names_partition_and_element(client, tmp_path):
    elems = [np.arange(3, dtype=np.int32)] * 50 + [np.arange(3, dtype=np.int64)] * 50
    with pytest.raises(CastError) as seq:
        npystream.save_ragged(tmp_path / "seq.ragged", elems)
    bag = db.from_sequence(elems, npartitions=4)  # partition 2 starts with float64 elements
    with pytest.raises(CastError, match="partition 2") as err:
        nd.to_ragged(bag, tmp_path / "par.ragged")
    assert err.value.index == seq.value.index == 50
    mixed = db.from_sequence(elems, npartitions=3)  # the float64 elements start inside partition 1
    with pytest.raises(CastError, match="partition 1, element 16 of the partition"):
        nd.to_ragged(mixed, tmp_path / "par.ragged")
    assert not os.path.exists(tmp_path / "par.ragged")
    nd.to_ragged(bag, tmp_path / "cast.ragged", cast="same_kind")
    npystream.save_ragged(tmp_path / "cast-seq.ragged", elems, cast="same_kind", durable=False)
    assert_same_store(tmp_path / "cast.ragged", tmp_path / "cast-seq.ragged")


def _fail_at(i):
    if i == 77:
        raise RuntimeError("task failed on purpose")
    return np.arange(i % 5)


@once
def test_to_ragged_failed_task_leaves_nothing(client, tmp_path):
    bag = db.from_sequence(range(100), npartitions=5).map(_fail_at)
    with pytest.raises(RuntimeError, match="on purpose"):
        nd.to_ragged(bag, tmp_path / "x.ragged")
    assert os.listdir(tmp_path) == []
    (tmp_path / "x.ragged").mkdir()
    with pytest.raises(FileExistsError):
        nd.to_ragged(db.from_sequence([np.ones(1)]), tmp_path / "x.ragged")


@once
def test_to_npy_equals_np_save(client, tmp_path):
    a = np.arange(5 * 7 * 3, dtype=">i4").reshape(5, 7, 3)
    x = da.from_array(a, chunks=(2, 3, 2)) * 3
    out = nd.to_npy(x, tmp_path / "x.npy")
    np.save(tmp_path / "ref.npy", a * 3)
    with open(out, "rb") as f, open(tmp_path / "ref.npy", "rb") as g:
        assert f.read() == g.read()
    # from a file, through the workers, to a file
    y = npystream.to_dask(tmp_path / "ref.npy", chunks=(3, 3, 3))
    nd.to_npy(y.T + 1, tmp_path / "t.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "t.npy"), (a * 3).T + 1)


@once
def test_to_npy_failed_task_leaves_nothing(client, tmp_path):
    def boom(block):
        if block.min() >= 40:
            raise RuntimeError("block failed on purpose")
        return block

    x = da.arange(60, chunks=10).map_blocks(boom)
    with pytest.raises(RuntimeError, match="on purpose"):
        nd.to_npy(x, tmp_path / "x.npy")
    assert os.listdir(tmp_path) == []
    with pytest.raises(TypeError, match="objects"):
        nd.to_npy(da.from_array(np.array([None, 1], dtype=object), chunks=1), tmp_path / "o.npy")


def test_errors_round_trip_pickle():
    e = UnsafePickleError("refused x.y", path="/a.npy", offset=9, index=4)
    f = pickle.loads(pickle.dumps(e))
    assert type(f) is UnsafePickleError and str(f) == str(e) and (f.path, f.offset, f.index) == ("/a.npy", 9, 4)


@once
def test_module_doctests():
    import doctest

    result = doctest.testmod(nd)
    assert result.attempted > 5 and result.failed == 0


# --------------------------------------------------------------------------- lazy expressions, concatenations


@once
def test_lazy_expression_and_concat(request, tmp_path):
    deferred = pytest.importorskip("npystream.deferred")
    concatenation = pytest.importorskip("npystream.concatenation")
    request.getfixturevalue("client")  # the cluster only when there is something to run on it
    a = np.arange(1000.0).reshape(100, 10)
    b = np.full((100, 10), 3.0)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    ma, mb = np.load(tmp_path / "a.npy", mmap_mode="r"), np.load(tmp_path / "b.npy", mmap_mode="r")
    x = deferred.lazy(ma) * 2 + np.sqrt(deferred.lazy(mb))
    got = nd.to_dask(x, chunks=30)
    assert isinstance(got, da.Array)
    np.testing.assert_allclose(got.compute(), a * 2 + np.sqrt(b))
    np.testing.assert_allclose(x.to_dask().compute(), a * 2 + np.sqrt(b))
    for axis in (0, 1):
        c = concatenation.concat([ma, mb], axis=axis)
        np.testing.assert_array_equal(nd.to_dask(c, chunks=30).compute(), np.concatenate([a, b], axis=axis))
    y = deferred.lazy(concatenation.concat([ma, mb])) + np.arange(10.0)  # a small in-memory operand rides along
    np.testing.assert_allclose(nd.to_dask(y).compute(), np.concatenate([a, b]) + np.arange(10.0))
    with pytest.raises(TypeError, match="in-memory array"):
        nd.to_dask(deferred.lazy(ma) + np.ones((200, 100, 10)))
