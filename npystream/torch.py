"""PyTorch adapters over :mod:`npystream.loader` (``pip install 'npystream[torch]'``; torch imported on first use).

``BatchDataset(source, batch_size, **options)``
    A ``torch.utils.data.IterableDataset`` of whole batches (the options of
    :func:`npystream.batches`).  Use it with ``DataLoader(ds, batch_size=None,
    num_workers=k)``: worker w of k reads this rank's batches p + w, p + w + k,
    ... (p: the position the dataset starts from, 0 unless resumed), so
    workers never overlap and the DataLoader, which takes one batch from each
    worker in turn, yields batches p, p + 1, ... in order, each exactly once.
    Arrays become tensors with ``torch.from_numpy`` (zero-copy from the batch
    buffer; non-native byte orders are converted); from a worker, a batch travels
    as its pickled arrays (:class:`WorkerBatch`) and becomes tensors on arrival.  ``state_dict`` /
    ``load_state_dict`` make it a ``Stateful`` dataset for
    ``torchdata.stateful_dataloader.StatefulDataLoader``, which saves and
    restores each worker's position: resuming continues with exactly the next
    batch (same ``num_workers`` required).  ``set_epoch(e)`` as with
    ``DistributedSampler``.

``ElementDataset(source)``
    A map-style ``torch.utils.data.Dataset``: ``ds[i]`` is element i (an
    ndarray, a copy, so default collate makes writable tensors; a dict for dict
    sources) for users with their own sampler and collate.  Picklable: the
    source is reopened lazily in each process that reads it (spawned or
    forked DataLoader workers map the files themselves).

Both are built on first attribute access, so ``import npystream.torch`` does
not import torch.
"""

from __future__ import annotations

import operator
import os
from typing import Any

__all__ = ["BatchDataset", "ElementDataset", "WorkerBatch", "to_tensors"]  # noqa: F822 - built on first access


def to_tensors(batch: Any) -> Any:
    """numpy arrays in ``batch`` (dicts and lists walked) -> tensors (zero-copy when writable)."""
    import numpy as np
    import torch

    if isinstance(batch, np.ndarray):
        if not batch.dtype.isnative:
            batch = batch.astype(batch.dtype.newbyteorder("="))
        elif not batch.flags.writeable:
            batch = batch.copy()
        return torch.from_numpy(batch)
    if isinstance(batch, dict):
        return {k: to_tensors(v) for k, v in batch.items()}
    if isinstance(batch, list):
        return [to_tensors(v) for v in batch]
    return batch


class WorkerBatch:
    """A batch on its way from a DataLoader worker: pickles as its numpy arrays, unpickles as tensors.

    torch sends a tensor from a worker as a shared-memory file whose descriptor the main
    process fetches from the worker in a round trip per tensor; on a busy machine those
    round trips cost milliseconds per batch, far more than reading it.  A batch's arrays
    pickled by value go through the worker's result pipe in the same message as the rest:
    two memory copies, no round trip.  The main process gets the plain dict of tensors
    (``torch.from_numpy`` of the received arrays, zero-copy).
    """

    __slots__ = ("batch",)

    def __init__(self, batch: Any) -> None:
        self.batch = batch

    def __reduce__(self) -> Any:
        return (to_tensors, (self.batch,))


def _build() -> dict[str, type]:
    import numpy as np
    from torch.utils.data import Dataset, IterableDataset, get_worker_info

    from npystream.errors import StateMismatchError, StoreNotFoundError
    from npystream.loader import batches, make_field, portable

    class BatchDataset(IterableDataset):
        """Batches of :func:`npystream.batches` split among DataLoader workers (see the module docstring)."""

        def __init__(self, source: Any, batch_size: int, **options: Any) -> None:
            self.loader = batches(source, batch_size, **options)
            self._resume: dict[str, Any] | None = None
            self._next: int | None = None
            self._worker = (0, 1)

        def set_epoch(self, epoch: int) -> None:
            """Use epoch ``epoch``'s order (the same epoch again keeps a resumed position)."""
            if epoch != self.loader.epoch:
                self._resume = None
            self.loader.set_epoch(epoch)

        def __len__(self) -> int:
            return len(self.loader)

        def __iter__(self) -> Any:
            info = get_worker_info()
            w, k = (0, 1) if info is None else (info.id, info.num_workers)
            self._worker = (w, k)
            resume, self._resume = self._resume, None
            if resume is not None:
                if resume["num_workers"] != k or resume["worker"] != w:
                    raise StateMismatchError(
                        f"the state was saved by worker {resume['worker']} of {resume['num_workers']}, "
                        f"this is worker {w} of {k}; resume with num_workers={resume['num_workers']}")
                first = resume["next"]
            else:  # a finished epoch starts again from batch 0, as the loader's own loop does
                pos = self.loader.position
                first = (pos if pos < len(self.loader) else 0) + w
            loader = self.loader
            convert = to_tensors if info is None else WorkerBatch
            self._next = first
            if k == 1:  # the loader's own loop: it keeps its position (and restarts a finished epoch)
                for batch in loader:
                    self._next = loader.position
                    yield convert(batch)
                return
            for b in range(first, len(loader), k):
                batch = convert(loader.read_batch(b))
                self._next = b + k
                yield batch

        def state_dict(self) -> dict[str, Any]:
            """This worker's position: the loader's state plus the next batch it reads."""
            w, k = self._worker
            nxt = self._next if self._next is not None else self.loader.position + w
            return {"loader": self.loader.state_dict(), "next": nxt, "worker": w, "num_workers": k}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            """Continue from ``state`` (checked against this source and options)."""
            if not isinstance(state, dict) or not {"loader", "next", "worker", "num_workers"} <= set(state):
                raise StateMismatchError(f"not a BatchDataset state: {state!r:.200}")
            self.loader.load_state_dict(state["loader"])
            self._resume = dict(state)
            self._next = state["next"]
            self._worker = (state["worker"], state["num_workers"])

    class ElementDataset(Dataset):
        """Element i of ``source`` (a dict of elements for dict sources); see the module docstring."""

        def __init__(self, source: Any) -> None:
            self._spec = source
            self._fields: Any = None
            self._pid: int | None = None
            fields = self._open()
            lengths = {name or "source": f.n for name, f in fields.items()}
            if len(set(lengths.values())) > 1:
                raise ValueError(f"the fields of a dict source must have equal lengths (aligned "
                                 f"elements), got lengths {lengths}")
            self._n = next(iter(fields.values())).n

        def _open(self) -> dict[str, Any]:
            if self._fields is None or self._pid != os.getpid():
                spec = self._spec
                if isinstance(spec, dict):
                    self._fields = {k: make_field(v, f"source[{k!r}]") for k, v in spec.items()}
                else:
                    self._fields = {"": make_field(spec, str(getattr(spec, "path", "source")))}
                self._pid = os.getpid()
            return self._fields

        def __getstate__(self) -> dict[str, Any]:
            spec = self._spec
            if isinstance(spec, (str, os.PathLike)) and not os.path.exists(spec):
                raise StoreNotFoundError("no such file or ragged store", path=spec)
            return {"_spec": portable(spec), "_n": self._n, "_fields": None, "_pid": None}

        def __len__(self) -> int:
            return self._n

        def __getitem__(self, i: int) -> Any:
            n = self._n
            j = operator.index(i)
            if j < 0:
                j += n
            if not 0 <= j < n:
                raise IndexError(f"index {i} is out of range for {n} elements")
            ids = np.array([j], dtype=np.int64)
            out = {}
            for name, f in self._open().items():
                x = f.elements(ids)[0]
                out[name] = np.array(x) if isinstance(x, np.ndarray) else x
            return out[""] if "" in out else out

    for cls in (BatchDataset, ElementDataset):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
    return {"BatchDataset": BatchDataset, "ElementDataset": ElementDataset}


def __getattr__(name: str) -> Any:
    if name in ("BatchDataset", "ElementDataset"):
        built = _build()
        globals().update(built)
        return built[name]
    raise AttributeError(f"module 'npystream.torch' has no attribute {name!r}")
