"""npystream.batches: coverage, values, order, shards, collate, bucket, pack, resume, bad input.

The oracle is the list of elements the store was written from (numpy arrays),
and torch's DistributedSampler rule for sharding (re-derived here in numpy).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import npystream
from npystream import loader as L
from npystream.errors import CastError, NpyStreamError, UnsupportedError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_elems(n: int, seed: int = 0, lo: int = 0, hi: int = 20, dtype=np.int32) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 1000, rng.integers(lo, hi + 1)).astype(dtype) for _ in range(n)]


@pytest.fixture
def store(tmp_path):
    elems = make_elems(203, seed=1)
    path = str(tmp_path / "t.ragged")
    npystream.save_ragged(path, elems)
    return path, elems


def check_padded(batch, elems, pad=0):
    vals, lens, idx = batch["values"], batch["lengths"], batch["index"]
    assert vals.shape[0] == len(lens) == len(idx)
    assert vals.shape[1] == (max(lens.tolist()) if len(lens) else 0)
    for j, i in enumerate(idx.tolist()):
        n = int(lens[j])
        assert n == len(elems[i])
        np.testing.assert_array_equal(vals[j, :n], elems[i])
        assert (vals[j, n:] == pad).all()


def ids_of(loader):
    return [b["index"].tolist() for b in loader]


def distributed_sampler_positions(n, world, rank, drop_last):
    """torch.utils.data.DistributedSampler's index rule, re-derived (over an identity order)."""
    order = list(range(n))
    num = n // world if drop_last else -(-n // world)
    total = num * world
    while len(order) < total:  # padding repeats the head of the order
        order += order[: total - len(order)]
    return order[:total][rank:total:world]


# --------------------------------------------------------------------------- coverage / values


@pytest.mark.parametrize("shuffle", [False, True, "block"])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_epoch_covers_every_element(store, shuffle, world, drop_last):
    path, elems = store
    n = len(elems)
    seen = []
    per_rank = []
    for rank in range(world):
        loader = npystream.batches(path, 8, shuffle=shuffle, seed=3, rank=rank, world_size=world,
                                   drop_last=drop_last, block_size=10)
        ids = []
        for b in loader:
            check_padded(b, elems)
            ids.extend(b["index"].tolist())
        assert len(loader) == -(-len(ids) // 8)
        per_rank.append(ids)
        seen.extend(ids)
    lens = {len(x) for x in per_rank}
    assert len(lens) == 1  # equal shards
    if drop_last:
        assert len(set(seen)) == len(seen)  # disjoint
        assert len(per_rank[0]) == (n // world) // 8 * 8
    else:
        assert set(seen) == set(range(n))
        assert len(seen) == -(-n // world) * world  # DistributedSampler padding
        assert len(seen) - len(set(seen)) == -(-n // world) * world - n


@pytest.mark.parametrize("world,drop_last", [(1, False), (3, False), (3, True), (4, False), (5, True),
                                             (300, False)])
def test_unshuffled_shards_follow_distributed_sampler(store, world, drop_last):
    path, elems = store
    for rank in sorted({0, min(1, world - 1), world - 1}):
        loader = npystream.batches(path, 4, world_size=world, rank=rank, drop_last=drop_last)
        want = distributed_sampler_positions(len(elems), world, rank, drop_last)
        assert loader.num_samples == len(want)
        assert loader._order().ids(np.arange(loader.num_samples)).tolist() == want
        got = sum(ids_of(loader), [])
        assert got == (want[: len(want) // 4 * 4] if drop_last else want)


def test_order_is_deterministic_per_seed_and_epoch(store):
    path, _ = store
    a = npystream.batches(path, 16, shuffle=True, seed=5)
    b = npystream.batches(path, 16, shuffle=True, seed=5)
    e0 = ids_of(a)
    assert e0 == ids_of(b)
    assert e0 == ids_of(a)  # a finished epoch starts again from batch 0
    a.set_epoch(1)
    e1 = ids_of(a)
    assert e1 != e0 and sorted(sum(e1, [])) == sorted(sum(e0, []))
    c = npystream.batches(path, 16, shuffle=True, seed=6)
    assert ids_of(c) != e0
    b.set_epoch(1)
    assert ids_of(b) == e1


def test_unshuffled_is_in_order(store):
    path, elems = store
    assert sum(ids_of(npystream.batches(path, 7)), []) == list(range(len(elems)))


def test_block_shuffle_is_a_permutation_with_locality(tmp_path):
    n = 5000
    path = str(tmp_path / "b.ragged")
    npystream.save_ragged(path, [np.arange(k % 3 + 1) for k in range(n)])
    loader = npystream.batches(path, 100, shuffle="block", block_size=64, seed=1)
    order = sum(ids_of(loader), [])
    assert sorted(order) == list(range(n))
    assert order != list(range(n))
    # each window holds the ids of exactly 16 whole blocks (fewer in the last window)
    starts = loader._order()._win_starts.tolist()
    nblocks = -(-n // 64)
    assert starts[0] == 0 and starts[-1] == n and len(starts) == -(-nblocks // 16) + 1
    for lo, hi in zip(starts, starts[1:]):
        blocks = {i // 64 for i in order[lo:hi]}
        assert len(blocks) <= L.WINDOW_BLOCKS
        assert sum(min(64, n - 64 * k) for k in blocks) == hi - lo
    loader.set_epoch(1)
    assert sum(ids_of(loader), []) != order


# --------------------------------------------------------------------------- collate


def test_max_len_and_truncate(store):
    path, elems = store
    with pytest.raises(ValueError, match="max_len=5"):
        next(iter(npystream.batches(path, 50, max_len=5)))
    for b in npystream.batches(path, 50, max_len=5, truncate=True, pad_value=-1):
        assert b["values"].shape[1] == 5
        for j, i in enumerate(b["index"].tolist()):
            n = min(len(elems[i]), 5)
            assert b["lengths"][j] == n
            np.testing.assert_array_equal(b["values"][j, :n], elems[i][:5])
            assert (b["values"][j, n:] == -1).all()
    b = next(iter(npystream.batches(path, 4, max_len=64)))
    assert b["values"].shape == (4, 64)


def test_nd_elements_pad_along_first_axis(tmp_path):
    rng = np.random.default_rng(2)
    elems = [rng.random((k, 3, 2)).astype(np.float32) for k in rng.integers(0, 7, 40)]
    path = str(tmp_path / "nd.ragged")
    npystream.save_ragged(path, elems)
    for b in npystream.batches(path, 6, shuffle=True, pad_value=np.nan):
        assert b["values"].shape[2:] == (3, 2)
        for j, i in enumerate(b["index"].tolist()):
            k = len(elems[i])
            np.testing.assert_array_equal(b["values"][j, :k], elems[i])
            assert np.isnan(b["values"][j, k:]).all()


def test_nd_elements_with_different_trailing_shapes_refused(tmp_path):
    path = str(tmp_path / "nd.ragged")
    npystream.save_ragged(path, [np.zeros((2, 3)), np.zeros((2, 4))])
    with pytest.raises(CastError, match="other axes must agree"):
        next(iter(npystream.batches(path, 2)))
    b = next(iter(npystream.batches(path, 2, collate="list")))
    assert [v.shape for v in b["values"]] == [(2, 3), (2, 4)]


def test_list_and_callable_collate(store):
    path, elems = store
    for b in npystream.batches(path, 9, collate="list", shuffle=True):
        assert len(b["values"]) == len(b["index"])
        for v, i in zip(b["values"], b["index"].tolist()):
            np.testing.assert_array_equal(v, elems[i])
    sizes = [x for x in npystream.batches(path, 9, collate=lambda xs: sum(len(x) for x in xs))]
    assert sum(sizes) == sum(len(e) for e in elems)


def test_big_endian_and_pad_value_checked(tmp_path):
    elems = [np.arange(k, dtype=">i2") for k in (1, 4, 2)]
    path = str(tmp_path / "be.ragged")
    npystream.save_ragged(path, elems)
    b = next(iter(npystream.batches(path, 3, pad_value=7)))
    assert b["values"].dtype == np.dtype(">i2")
    check_padded(b, elems, pad=7)
    u8 = str(tmp_path / "u8.ragged")
    npystream.save_ragged(u8, [np.arange(3, dtype=np.uint8)])
    with pytest.raises(ValueError, match="pad_value=-1"):
        next(iter(npystream.batches(u8, 1, pad_value=-1)))


def test_dict_of_aligned_sources(tmp_path, store):
    path, elems = store
    n = len(elems)
    labels = np.arange(n, dtype=np.int64) * 10
    lab_path = str(tmp_path / "labels.npy")
    np.save(lab_path, labels)
    feats = [np.full((len(e), 2), i, dtype=np.float32) for i, e in enumerate(elems)]
    fpath = str(tmp_path / "f.ragged")
    npystream.save_ragged(fpath, feats)
    loader = npystream.batches({"tokens": path, "feats": fpath, "label": lab_path}, 10, shuffle=True)
    seen = []
    for b in loader:
        idx = b["index"]
        seen.extend(idx.tolist())
        check_padded({**b["tokens"], "index": idx}, elems)
        np.testing.assert_array_equal(b["label"]["values"], labels[idx])
        np.testing.assert_array_equal(b["feats"]["lengths"], b["tokens"]["lengths"])
        for j, i in enumerate(idx.tolist()):
            np.testing.assert_array_equal(b["feats"]["values"][j, :len(elems[i])], feats[i])
    assert sorted(seen) == list(range(n))
    rows = [x for x in npystream.batches({"t": path, "y": labels}, 5, collate=lambda xs: xs)]
    assert rows[0][1]["y"] == 10 and len(rows[0][1]["t"]) == len(elems[1])


def test_object_npy_source(tmp_path):
    elems = make_elems(30, seed=4, lo=1)
    arr = np.empty(len(elems), dtype=object)
    arr[:] = elems
    p = str(tmp_path / "o.npy")
    np.save(p, arr, allow_pickle=True)
    seen = []
    for b in npystream.batches(p, 7, shuffle=True):
        check_padded(b, elems)
        seen.extend(b["index"].tolist())
    assert sorted(seen) == list(range(30))
    with npystream.ObjectArray(p) as oa:
        b = next(iter(npystream.batches(oa, 30)))
        check_padded(b, elems)
    with pytest.raises(UnsupportedError, match="bucket="):
        npystream.batches(p, 4, bucket=2)


def test_strings_refused_by_pad(tmp_path):
    arr = np.empty(3, dtype=object)
    arr[:] = ["a", "bc", "def"]
    p = str(tmp_path / "s.npy")
    np.save(p, arr, allow_pickle=True)
    with pytest.raises(CastError, match="strings are not padded"):
        next(iter(npystream.batches(p, 2)))
    assert next(iter(npystream.batches(p, 2, collate="list")))["values"] == ["a", "bc"]
    sp = str(tmp_path / "s.ragged")
    npystream.save_ragged(sp, ["a", "bc", "def"])
    with pytest.raises(CastError, match="element 0 is a str"):
        next(iter(npystream.batches(sp, 2)))
    b = [x for x in npystream.batches(sp, 2, collate="list", bucket=2, shuffle=True)]
    assert sorted(v for x in b for v in x["values"]) == ["a", "bc", "def"]


def test_fixed_rows_and_row_sources(tmp_path):
    data = np.arange(60, dtype=np.float64).reshape(20, 3)
    p = str(tmp_path / "rows.npy")
    np.save(p, data)
    for src in (p, data, np.load(p, mmap_mode="r")):
        seen = []
        for b in npystream.batches(src, 6, shuffle=True, seed=2):
            np.testing.assert_array_equal(b["values"], data[b["index"]])
            seen.extend(b["index"].tolist())
        assert sorted(seen) == list(range(20))

    class Rows:  # a duck-typed row source (len, shape, dtype, int-array indexing)
        shape = data.shape
        dtype = data.dtype

        def __len__(self):
            return len(data)

        def __getitem__(self, key):
            return data[np.asarray(key)]

    b = next(iter(npystream.batches(Rows(), 4, shuffle=True)))
    np.testing.assert_array_equal(b["values"], data[b["index"]])


def test_stepped_view_reads_through_the_store(store):
    path, elems = store
    view = npystream.RaggedArray(path)[::3]
    want = elems[::3]
    for b in npystream.batches(view, 5):
        check_padded(b, want)


# --------------------------------------------------------------------------- bucket


def test_bucket_covers_everything_and_pads_less(tmp_path):
    elems = make_elems(1000, seed=7, lo=1, hi=200)
    path = str(tmp_path / "b.ragged")
    npystream.save_ragged(path, elems)

    def efficiency(bucket):
        real = padded = 0
        seen = []
        for b in npystream.batches(path, 16, shuffle=True, bucket=bucket, seed=1):
            check_padded(b, elems)
            real += int(b["lengths"].sum())
            padded += b["values"].size
            seen.extend(b["index"].tolist())
        assert sorted(seen) == list(range(1000))
        return real / padded

    assert efficiency(20) > 0.9 > efficiency(None)
    loader = npystream.batches(path, 16, shuffle=True, bucket=20, seed=1)
    first = ids_of(loader)
    loader.set_epoch(1)
    assert ids_of(loader) != first
    # batches of one window are not in length order (their order is shuffled)
    maxlens = [max(len(elems[i]) for i in b) for b in first[:20]]
    assert maxlens != sorted(maxlens)


# --------------------------------------------------------------------------- pack


def packed_tokens(loader):
    out = []
    for b in loader:
        v, s, pos = b["values"], b["segment_ids"], b["positions"]
        assert v.shape == s.shape == pos.shape == (loader._opts.batch_size, loader._opts.max_len)
        out.append(b)
    return out


@pytest.mark.parametrize("shuffle", [False, True])
def test_pack_loses_and_duplicates_no_token(tmp_path, shuffle):
    elems = make_elems(150, seed=9, lo=0, hi=40)
    path = str(tmp_path / "p.ragged")
    npystream.save_ragged(path, elems)
    loader = npystream.batches(path, 4, collate="pack", max_len=16, shuffle=shuffle, pad_value=-1)
    batches = packed_tokens(loader)
    check_packed(batches, elems, loader, 16)


def check_packed(batches, elems, loader, width, truncate=False):
    order = loader._pack_plan()[0].tolist()
    want = [elems[i][:width] if truncate else elems[i] for i in order]
    stream = np.concatenate([w for w in want] + [np.empty(0, np.int32)])
    got = []
    pieces: dict[int, list[np.ndarray]] = {}
    for k, b in enumerate(batches):
        v, s, pos, cu = (b["values"].reshape(-1), b["segment_ids"].reshape(-1),
                         b["positions"].reshape(-1), b["cu_seqlens"])
        real = int(cu[-1])
        assert (s[:real] > 0).all() and (s[real:] == 0).all()
        if k < len(batches) - 1:
            assert real == v.size  # only the last batch has padding
        assert (v[real:] == -1).all()
        got.append(v[:real])
        segs = np.split(np.arange(real), cu[1:-1])
        assert len(segs) == len(b["index"])
        for seg, eid in zip(segs, b["index"].tolist()):
            # a segment never crosses a row, numbers its row's segments 1, 2, ...; positions continue
            assert len({int(t) // width for t in seg}) == 1
            np.testing.assert_array_equal(pos[seg], np.arange(pos[seg[0]], pos[seg[0]] + len(seg)))
            pieces.setdefault(eid, []).append(v[seg])
            assert int(pos[seg[0]]) == sum(len(p) for p in pieces[eid][:-1])
    np.testing.assert_array_equal(np.concatenate(got) if got else stream[:0], stream)
    for eid, ps in pieces.items():
        np.testing.assert_array_equal(np.concatenate(ps), want[order.index(eid)])


def test_pack_truncate_and_drop_last(tmp_path):
    elems = make_elems(60, seed=10, lo=0, hi=50)
    path = str(tmp_path / "p.ragged")
    npystream.save_ragged(path, elems)
    loader = npystream.batches(path, 2, collate="pack", max_len=8, truncate=True, pad_value=-1)
    check_packed(packed_tokens(loader), elems, loader, 8, truncate=True)
    total = sum(min(len(e), 8) for e in elems)
    dl = npystream.batches(path, 2, collate="pack", max_len=8, truncate=True, drop_last=True)
    assert len(dl) == total // 16
    assert all(int(b["cu_seqlens"][-1]) == 16 for b in dl)


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(0, 30), min_size=1, max_size=60), batch=st.integers(1, 5),
       width=st.integers(1, 12), world=st.integers(1, 3), seed=st.integers(0, 3))
def test_pack_property(tmp_path_factory, lengths, batch, width, world, seed):
    elems = [np.arange(k, dtype=np.int32) + 100 * i for i, k in enumerate(lengths)]
    path = str(tmp_path_factory.mktemp("pk") / "p.ragged")
    npystream.save_ragged(path, elems)
    for rank in range(world):
        loader = npystream.batches(path, batch, collate="pack", max_len=width, shuffle=bool(seed),
                                   seed=seed, rank=rank, world_size=world, pad_value=-1)
        check_packed(packed_tokens(loader), elems, loader, width)


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 25), min_size=1, max_size=80), batch=st.integers(1, 9),
       world=st.integers(1, 4), drop_last=st.booleans(), shuffle=st.sampled_from([False, True, "block"]),
       bucket=st.sampled_from([None, 1, 3]))
def test_pad_property(tmp_path_factory, lengths, batch, world, drop_last, shuffle, bucket):
    elems = [np.arange(k, dtype=np.int64) * 3 + i for i, k in enumerate(lengths)]
    n = len(elems)
    path = str(tmp_path_factory.mktemp("pd") / "p.ragged")
    npystream.save_ragged(path, elems)
    shards = []
    for rank in range(world):
        loader = npystream.batches(path, batch, shuffle=shuffle, rank=rank, world_size=world,
                                   drop_last=drop_last, bucket=bucket, block_size=4, pad_value=-5)
        ids = []
        nb = 0
        for b in loader:
            check_padded(b, elems, pad=-5)
            assert len(b["index"]) == batch or not drop_last
            ids.extend(b["index"].tolist())
            nb += 1
        assert nb == len(loader)
        shards.append(ids)
    assert len({len(s) for s in shards}) == 1
    everything = sum(shards, [])
    if drop_last:
        assert len(set(everything)) == len(everything)
        assert len(shards[0]) == (n // world) // batch * batch
    else:
        assert set(everything) == set(range(n)) and len(everything) == -(-n // world) * world


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("opts", [dict(shuffle=True), dict(shuffle="block", block_size=16),
                                  dict(shuffle=True, bucket=3), dict(collate="pack", max_len=8),
                                  dict(shuffle=True, world_size=3, rank=2, prefetch=2)])
def test_resume_after_k_batches(store, opts):
    path, _ = store
    first = npystream.batches(path, 8, seed=11, **opts)
    first.set_epoch(2)
    full = ids_of(first)
    for k in (0, 1, 5, len(full) - 1, len(full)):
        loader = npystream.batches(path, 8, seed=11, **opts)
        loader.set_epoch(2)
        it = iter(loader)
        got = [next(it)["index"].tolist() for _ in range(k)]
        state = json.loads(json.dumps(loader.state_dict()))
        assert state["batch"] == k and state["epoch"] == 2
        resumed = npystream.batches(path, 8, seed=11, **opts)
        resumed.load_state_dict(state)
        resumed.set_epoch(2)  # the usual loop calls set_epoch: the same epoch keeps the position
        rest = ids_of(resumed)
        assert got + rest == full or (k == len(full) and rest == full)


def test_state_of_another_source_or_options_refused(store, tmp_path):
    path, elems = store
    state = npystream.batches(path, 8, shuffle=True).state_dict()
    other = str(tmp_path / "other.ragged")
    npystream.save_ragged(other, elems[:-1] + [np.arange(3, dtype=np.int32)])
    with pytest.raises(NpyStreamError, match="another source"):
        npystream.batches(other, 8, shuffle=True).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size=8"):
        npystream.batches(path, 9, shuffle=True).load_state_dict(state)
    with pytest.raises(npystream.StateMismatchError, match="seed"):
        npystream.batches(path, 8, shuffle=True, seed=1).load_state_dict(state)
    with pytest.raises(npystream.StateMismatchError, match="world_size"):
        npystream.batches(path, 8, shuffle=True, world_size=2).load_state_dict(state)
    with pytest.raises(npystream.StateMismatchError, match="version"):
        npystream.batches(path, 8, shuffle=True).load_state_dict({"batch": 3})
    # rank may differ: all ranks are at the same batch
    state["batch"] = 2
    r1 = npystream.batches(path, 8, shuffle=True, world_size=1)
    r1.load_state_dict(state)
    assert r1.position == 2


_CHILD = textwrap.dedent("""
    import json, os, signal, sys
    import npystream
    path, statefile, k, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    loader = npystream.batches(path, 8, shuffle=True, seed=4, prefetch=1)
    loader.set_epoch(1)
    if mode == "resume":
        with open(statefile) as fh:
            loader.load_state_dict(json.load(fh))
    seen = []
    for i, b in enumerate(loader):
        seen.append(b["index"].tolist())
        tmp = statefile + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(loader.state_dict(), fh)
        os.replace(tmp, statefile)
        if mode == "kill" and i + 1 == k:
            print(json.dumps(seen), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    print(json.dumps(seen), flush=True)
""")


def test_resume_in_a_new_process_after_sigkill(store, tmp_path):
    path, _ = store
    statefile = str(tmp_path / "state.json")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = [sys.executable, "-c", _CHILD, path, statefile, "5"]
    killed = subprocess.run(run + ["kill"], capture_output=True, text=True, env=env, timeout=60)
    assert killed.returncode == -signal.SIGKILL
    before = json.loads(killed.stdout)
    resumed = subprocess.run(run + ["resume"], capture_output=True, text=True, env=env, timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    after = json.loads(resumed.stdout)
    full = npystream.batches(path, 8, shuffle=True, seed=4)
    full.set_epoch(1)
    assert before + after == ids_of(full)
    assert len(before) == 5


def test_loader_pickles_for_spawned_workers(tmp_path, store):
    import pickle

    path, elems = store
    rows = np.arange(len(elems) * 2, dtype=np.int16).reshape(-1, 2)
    rpath = str(tmp_path / "rows.npy")
    np.save(rpath, rows)
    loader = npystream.batches({"t": npystream.RaggedArray(path), "r": np.load(rpath, mmap_mode="r")},
                               8, shuffle=True, seed=3)
    loader.set_epoch(4)
    next(iter(loader))
    again = pickle.loads(pickle.dumps(loader))
    assert again.state_dict() == loader.state_dict()
    for a, b in zip(again, loader):
        np.testing.assert_array_equal(a["t"]["values"], b["t"]["values"])
        np.testing.assert_array_equal(a["r"]["values"], rows[a["index"]])
    assert isinstance(again._fields["r"].source, np.memmap)  # reopened, not copied
    view = np.load(rpath, mmap_mode="r")[5:]
    again = pickle.loads(pickle.dumps(npystream.batches(view, 4)))
    assert isinstance(again._fields[""].source, np.memmap)
    np.testing.assert_array_equal(again._fields[""].source, rows[5:])


# --------------------------------------------------------------------------- prefetch, gathers


def test_prefetch_gives_the_same_batches_and_stops(store):
    path, elems = store
    plain = ids_of(npystream.batches(path, 8, shuffle=True))
    pre = npystream.batches(path, 8, shuffle=True, prefetch=3)
    assert ids_of(pre) == plain
    threads = threading.active_count()
    it = iter(pre)
    next(it)
    it.close()
    assert threading.active_count() == threads
    assert pre.position == 1


def test_prefetch_passes_errors_on(tmp_path):
    path = str(tmp_path / "s.ragged")
    npystream.save_ragged(path, [np.arange(2), np.arange(40)])
    with pytest.raises(ValueError, match="max_len=3"):
        list(npystream.batches(path, 1, max_len=3, prefetch=2))


@pytest.mark.skipif(L.speedups() is None, reason="C accelerator not built or disabled")
@pytest.mark.parametrize("dtype", [np.int8, np.int32, ">f8", np.dtype([("a", "<i2"), ("b", "u1")])])
def test_c_gathers_equal_numpy_twins(dtype):
    sp = L.speedups()
    rng = np.random.default_rng(0)
    src = np.frombuffer(rng.bytes(4000 * np.dtype(dtype).itemsize), dtype=dtype)
    for _ in range(20):
        b = int(rng.integers(0, 10))
        row = int(rng.integers(0, 50))
        counts = rng.integers(0, row + 1, b).astype(np.int64)
        starts = np.array([rng.integers(0, len(src) - c + 1) for c in counts], dtype=np.int64)
        pad = np.frombuffer(rng.bytes(np.dtype(dtype).itemsize), dtype=dtype)[0]
        pad = np.array(pad, dtype=dtype)
        a = np.empty((b, row), dtype=dtype)
        c = np.empty((b, row), dtype=dtype)
        L._gather_pad_py(src, a, starts, counts, row, pad)
        sp.gather_pad(src, c, starts, counts, row, src.dtype.itemsize, pad.tobytes())
        assert a.tobytes() == c.tobytes()
        dst_starts = np.cumsum(counts) - counts
        a = np.zeros(int(counts.sum()) + 3, dtype=dtype)
        c = np.zeros(int(counts.sum()) + 3, dtype=dtype)
        L._gather_runs_py(src, a, starts, counts, dst_starts)
        sp.gather_runs(src, c, starts, counts, dst_starts, src.dtype.itemsize)
        assert a.tobytes() == c.tobytes()


@pytest.mark.skipif(L.speedups() is None, reason="C accelerator not built or disabled")
def test_c_gathers_check_bounds():
    sp = L.speedups()
    src = np.arange(10, dtype=np.int32)
    dst = np.zeros((2, 4), dtype=np.int32)
    one = np.array([1, 1], dtype=np.int64)
    with pytest.raises(ValueError, match="outside"):
        sp.gather_pad(src, dst, np.array([0, 8], dtype=np.int64), np.array([1, 3], dtype=np.int64),
                      4, 4, b"\0" * 4)
    with pytest.raises(ValueError, match="longer than a row"):
        sp.gather_pad(src, dst, np.array([0, 0], dtype=np.int64), np.array([1, 5], dtype=np.int64),
                      4, 4, b"\0" * 4)
    with pytest.raises(ValueError, match="too small"):
        sp.gather_pad(src, dst, one, one, 5, 4, b"\0" * 4)
    with pytest.raises(ValueError, match="destination"):
        sp.gather_runs(src, dst, one, one, np.array([0, 8], dtype=np.int64), 4)
    with pytest.raises(TypeError, match="int64"):
        sp.gather_runs(src, dst, one.astype(np.int32), one, one, 4)
    assert (dst == 0).all()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(batch_size=0), ValueError, "batch_size must be >= 1, got batch_size=0"),
    (dict(batch_size=2.5), TypeError, "batch_size must be an int"),
    (dict(batch_size=True), TypeError, "batch_size must be an int"),
    (dict(rank=2, world_size=2), ValueError, r"rank must be in \[0, world_size\) = \[0, 2\), got rank=2"),
    (dict(rank=-1), ValueError, "rank must be >= 0"),
    (dict(world_size=0), ValueError, "world_size must be >= 1"),
    (dict(max_len=0), ValueError, "max_len must be >= 1, got max_len=0"),
    (dict(truncate=True), ValueError, "truncate=True cuts elements to max_len"),
    (dict(collate="stack"), ValueError, "collate must be 'pad', 'pack', 'list' or a callable, got collate='stack'"),
    (dict(collate="pack"), ValueError, "collate='pack' needs max_len"),
    (dict(collate="pack", max_len=4, bucket=2), ValueError, "bucket="),
    (dict(shuffle="yes"), ValueError, "shuffle must be True, False, 'full' or 'block', got shuffle='yes'"),
    (dict(bucket=0), ValueError, "bucket must be >= 1"),
    (dict(seed=-1), ValueError, "seed must be >= 0"),
    (dict(prefetch=-1), ValueError, "prefetch must be >= 0"),
])
def test_bad_arguments(store, kwargs, exc, match):
    path, _ = store
    kw = {"batch_size": 4, **kwargs}
    with pytest.raises(exc, match=match):
        npystream.batches(path, **kw)


def test_bad_sources(store, tmp_path):
    path, elems = store
    with pytest.raises(ValueError, match="equal lengths"):
        npystream.batches({"a": path, "b": np.arange(5)}, 4)
    with pytest.raises(ValueError, match="other than 'index'"):
        npystream.batches({"index": path}, 4)
    with pytest.raises(FileNotFoundError, match="no such file"):
        npystream.batches(str(tmp_path / "missing.ragged"), 4)
    with pytest.raises(TypeError, match="source must be"):
        npystream.batches(42, 4)
    with pytest.raises(UnsupportedError, match="collate='pack'"):
        npystream.batches({"a": path}, 4, collate="pack", max_len=4)
    with pytest.raises(IndexError, match="batch 99 is out of range"):
        npystream.batches(path, 4).read_batch(99)


def test_empty_store(tmp_path):
    path = str(tmp_path / "e.ragged")
    npystream.save_ragged(path, iter([]))
    loader = npystream.batches(path, 4, shuffle=True)
    assert len(loader) == 0 and list(loader) == []


def test_module_doctests():
    import doctest

    result = doctest.testmod(L)
    assert result.attempted >= 1 and result.failed == 0


def test_shuffle_true_switches_to_block_above_the_limit(store, monkeypatch):
    path, elems = store
    assert npystream.batches(path, 8, shuffle=True).state_dict()["shuffle"] == "full"
    monkeypatch.setattr(L, "FULL_SHUFFLE_LIMIT", 100)
    loader = npystream.batches(path, 8, shuffle=True, block_size=16)
    assert loader.state_dict()["shuffle"] == "block"
    assert sorted(sum(ids_of(loader), [])) == list(range(len(elems)))
    assert loader._order()._perm is None  # no O(N) permutation was drawn


def test_element_sources_pickle(tmp_path):
    import pickle

    sp = str(tmp_path / "s.ragged")
    npystream.save_ragged(sp, ["a", "bc", "def"])
    arr = np.empty(3, dtype=object)
    arr[:] = [np.arange(2), np.arange(3), np.arange(1)]
    op = str(tmp_path / "o.npy")
    np.save(op, arr, allow_pickle=True)
    for src, collate in ((sp, "list"), (arr, "pad"), (op, "pad")):
        loader = npystream.batches(src, 2, collate=collate, shuffle=True)
        again = pickle.loads(pickle.dumps(loader))
        for a, b in zip(again, loader):
            assert a["index"].tolist() == b["index"].tolist()
            assert [np.asarray(x).tolist() for x in a["values"]] == \
                [np.asarray(x).tolist() for x in b["values"]]
