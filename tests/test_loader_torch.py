"""npystream.torch: BatchDataset through DataLoader workers, StatefulDataLoader resume, ElementDataset."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

import npystream  # noqa: E402
from npystream.torch import BatchDataset, ElementDataset, WorkerBatch  # noqa: E402


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(3)
    elems = [rng.integers(0, 1000, rng.integers(1, 30)).astype(np.int32) for _ in range(157)]
    path = str(tmp_path / "t.ragged")
    npystream.save_ragged(path, elems)
    return path, elems


def check(batch, elems):
    assert isinstance(batch["values"], torch.Tensor) and batch["values"].dtype == torch.int32
    for j, i in enumerate(batch["index"].tolist()):
        n = int(batch["lengths"][j])
        assert np.array_equal(batch["values"][j, :n].numpy(), elems[i])
        assert not batch["values"][j, n:].any()


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_dataloader_workers_yield_the_loaders_batches(store, workers):
    path, elems = store
    want = [b["index"].tolist() for b in npystream.batches(path, 16, shuffle=True, seed=2)]
    ds = BatchDataset(path, 16, shuffle=True, seed=2)
    got = []
    for b in DataLoader(ds, batch_size=None, num_workers=workers):
        check(b, elems)
        got.append(b["index"].tolist())
    assert got == want  # same batches, same order: workers take turns, none overlaps
    assert len(ds) == len(want)
    again = [b["index"].tolist() for b in DataLoader(ds, batch_size=None, num_workers=workers)]
    assert again == want  # a finished epoch runs again from its first batch


def test_shards_equal_distributed_sampler(store):
    path, elems = store

    class Idx(torch.utils.data.Dataset):
        def __len__(self):
            return len(elems)

        def __getitem__(self, i):
            return i

    for world, drop_last in ((3, False), (3, True), (4, False)):
        for rank in range(world):
            ref = list(DistributedSampler(Idx(), num_replicas=world, rank=rank, shuffle=False,
                                          drop_last=drop_last))
            loader = npystream.batches(path, 1, world_size=world, rank=rank, drop_last=drop_last)
            assert [int(b["index"][0]) for b in loader] == ref


@pytest.mark.parametrize("workers", [0, 2])
def test_stateful_dataloader_resumes_exactly(store, workers):
    sdl = pytest.importorskip("torchdata.stateful_dataloader")
    path, elems = store

    def make():
        ds = BatchDataset(path, 8, shuffle=True, seed=5)
        ds.set_epoch(1)
        return sdl.StatefulDataLoader(ds, batch_size=None, num_workers=workers)

    full = [b["index"].tolist() for b in make()]
    dl = make()
    got = []
    for b in dl:
        got.append(b["index"].tolist())
        if len(got) == 7:
            state = dl.state_dict()
            break
    resumed = make()
    resumed.load_state_dict(pickle.loads(pickle.dumps(state)))
    rest = [b["index"].tolist() for b in resumed]
    assert got + rest == full and len(rest) == len(full) - 7


def test_element_dataset_pickles_and_reopens(store):
    path, elems = store
    ds = ElementDataset(path)
    assert len(ds) == len(elems)
    np.testing.assert_array_equal(ds[5], elems[5])
    np.testing.assert_array_equal(ds[-1], elems[-1])
    with pytest.raises(IndexError):
        ds[len(elems)]
    again = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(again[7], elems[7])
    assert ds[3].flags.writeable

    def collate(xs):
        return [torch.from_numpy(x) for x in xs]

    seen = []
    for batch in DataLoader(ds, batch_size=10, num_workers=2, collate_fn=collate):
        seen.extend(t.numpy().tolist() for t in batch)
    assert seen == [e.tolist() for e in elems]
    labels = np.arange(len(elems)) * 2
    d = ElementDataset({"tokens": path, "label": labels})
    item = d[4]
    assert item["label"] == 8 and np.array_equal(item["tokens"], elems[4])


def test_worker_batch_arrives_as_tensors():
    batch = {"values": np.arange(12, dtype=">i4").reshape(3, 4), "lengths": np.array([4, 2, 0]),
             "f": {"x": np.ones((2, 2), dtype=np.float16)}, "list": [np.arange(3, dtype=np.uint8)],
             "n": 3}
    out = pickle.loads(pickle.dumps(WorkerBatch(batch)))
    assert out["values"].dtype == torch.int32 and out["values"].tolist() == batch["values"].tolist()
    assert torch.equal(out["lengths"], torch.tensor([4, 2, 0]))
    assert out["f"]["x"].dtype == torch.float16 and out["list"][0].tolist() == [0, 1, 2]
    assert out["n"] == 3


def test_spawned_workers_reopen_the_store(store):
    path, elems = store
    ds = BatchDataset(npystream.RaggedArray(path), 32, shuffle=True, seed=1)
    want = [b["index"].tolist() for b in npystream.batches(path, 32, shuffle=True, seed=1)]
    dl = DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context="spawn")
    got = []
    for b in dl:
        check(b, elems)
        got.append(b["index"].tolist())
    assert got == want


def test_element_dataset_pickles_memmaps_as_maps(tmp_path, store):
    path, elems = store
    rows = np.arange((len(elems) + 1) * 3, dtype=np.float32).reshape(-1, 3)
    rpath = str(tmp_path / "rows.npy")
    np.save(rpath, rows)
    ds = ElementDataset({"tokens": path, "rows": np.load(rpath, mmap_mode="r")[1:]})
    again = pickle.loads(pickle.dumps(ds))
    assert isinstance(again._spec["rows"], np.memmap)  # mapped again, not copied
    item = again[4]
    np.testing.assert_array_equal(item["rows"], rows[5])
    np.testing.assert_array_equal(item["tokens"], elems[4])
