"""``npystream convert SRC DST --workers N``: object ``.npy`` -> ragged store on N local processes.

Plan (the same partitioning as :func:`npystream.to_dask`):

1. the client builds the offset index of SRC (or loads ``SRC.nsidx``; it
   writes none beside the source) and cuts the pickle into partitions of
   about ``size / (4 N)`` bytes (4 per worker evens out their speeds; at
   least 1 MiB, at most 128 MiB), at element boundaries;
2. each partition decodes its elements through the index (zero-copy views of
   the mapped file) and appends them to a part store of its own, in the
   hidden staging directory ``.DST.parts.npystream-tmp/`` beside DST;
3. the client checks the parts agree (kind, dtype, ndim), assembles them
   into one store under a temporary name (:mod:`npystream.formats.ragged_parts`;
   the copies run on the workers too) and renames it into place.

Workers are forked processes (a ``concurrent.futures`` process pool with the
``fork`` start method): they start in milliseconds and inherit the opened
array with its index, so no task carries more than a few numbers; a worker
that dies fails the conversion with a clear error (never a hang), and
workers die with the client.  A Dask ``LocalCluster`` (``executor='dask'``,
for measurements; ``benchmarks/bench_dask.py``) takes seconds to start,
more than the whole conversion of a few hundred MB: see ``docs/scaling.md``.

Atomicity and resume are those of the sequential converter: DST appears
only complete; on an error or interrupt the staging directory is removed,
unless ``resume=True``, which keeps it.  Its ``plan.json`` records the
source (path, size, mtime), the options and the partition boundaries; a
resumed run with the same record keeps every part's committed prefix (a
part store commits every few MB) and continues each part from there.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from npystream._atomic import refuse_existing, remove_path, temp_name
from npystream.errors import CastError, FormatError, NpyStreamError
from npystream.formats.ragged import KindMismatch, check_kind

__all__ = ["convert_object_parallel", "PARTS_TAG"]

PARTS_TAG = "parts"
PLAN = "plan.json"
_PER_WORKER = 4
_MIN_PARTITION = 1 << 20
_MAX_PARTITION = 128 << 20
_WRITER_BUFFER = 1 << 20
_HINT = ("in `npystream convert` pass --kind object to store each element pickled, or --cast same_kind "
         "to unify dtypes")

# The opened source, set in the client before the pool forks: workers inherit it (and its index).
_SOURCE: Any = None


def _part_path(staging: str, k: int) -> str:
    return os.path.join(staging, f"part-{k:06d}.ragged")


def _source_array(path: str, stamp: tuple[int, int], options: dict[str, Any]) -> Any:
    src = _SOURCE
    if src is not None and src.path == path:
        return src
    from npystream.dask import check_stamp, open_cached

    check_stamp(path, stamp, "a worker")
    return open_cached(path, stamp, dict(options, zero_copy="always"))  # views even when unaligned: the writer copies them (as convert does)


def _convert_part(task: tuple[Any, ...]) -> tuple[int, int]:
    """One partition: elements ``[lo, hi)`` of the source appended to part store ``k`` (resumed if present)."""
    from npystream.dask import run_task
    from npystream.formats.ragged_parts import write_part

    path, stamp, options, k, lo, hi, part, writer_options = task

    writer_options = dict(writer_options)
    kind_given = writer_options.pop("kind_given", True)

    def items(arr: Any, start: int) -> Any:
        kind = writer_options.get("kind")
        for i, x in enumerate(arr.iter_range(start, hi), start):
            check_kind(x, i - lo, kind, path=path, given=kind_given)  # the one-process rule; write_part adds lo
            yield x

    def body() -> int:
        arr = _source_array(path, stamp, options)
        return write_part(lambda done: items(arr, lo + done), part, where=f"partition {k}", first=lo,
                          mode="a", **writer_options)

    return k, run_task(body)


def _copy_part(task: tuple[Any, ...]) -> int:
    from npystream.formats.ragged_parts import copy_part

    plan, k, tmp = task
    copy_part(plan, k, tmp)
    return k


def _quiet_worker() -> None:
    """Forked workers leave Ctrl-C to the client (which stops them), die on SIGTERM and with the client."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):  # a killed client (SIGKILL) takes its workers with it
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _collect(jobs: list[Any], on_done: Callable[[Any], None], dead: Any = ()) -> list[Any]:
    """Every job's result in order (``on_done`` called on each), or the exception it raised.

    ``dead`` is the pool's "a worker process died" exception: that job gets a
    clear :class:`~npystream.errors.NpyStreamError` instead.
    """
    out: list[Any] = []
    for job in jobs:
        try:
            value = job.result()
        except dead:
            out.append(NpyStreamError(
                "a worker process died (killed, or out of memory?) before its partition was written; run "
                "again (with --resume to keep the finished partitions), or with fewer --workers"))
            continue
        except Exception as exc:  # noqa: BLE001 - handed back to the caller, which picks one
            out.append(exc)
            continue
        on_done(value)
        out.append(value)
    return out


class _ForkPool:
    """``run(fn, tasks)`` on forked processes; every task runs even if one fails (errors returned).

    A worker that dies (killed, out of memory) fails its task with
    :class:`~npystream.errors.NpyStreamError` instead of leaving the client
    waiting for a result that never comes.
    """

    def __init__(self, workers: int) -> None:
        from concurrent.futures import ProcessPoolExecutor

        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                        initializer=_quiet_worker)

    def run(self, fn: Callable[[Any], Any], tasks: list[Any], on_done: Callable[[Any], None]) -> list[Any]:
        from concurrent.futures.process import BrokenProcessPool

        return _collect([self.pool.submit(fn, t) for t in tasks], on_done, dead=BrokenProcessPool)

    def close(self, ok: bool) -> None:
        if ok:
            self.pool.shutdown(wait=True)
            return
        self.pool.shutdown(wait=False, cancel_futures=True)
        terminate = getattr(self.pool, "terminate_workers", None)  # Python >= 3.14
        if terminate is not None:
            terminate()
            return
        for proc in list((getattr(self.pool, "_processes", None) or {}).values()):
            proc.terminate()
        for proc in list((getattr(self.pool, "_processes", None) or {}).values()):
            proc.join()


class _DaskPool:
    """The same over a ``dask.distributed.LocalCluster`` of worker processes (one thread each)."""

    def __init__(self, workers: int) -> None:
        from dask.distributed import Client, LocalCluster

        self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                    dashboard_address=None)
        self.client = Client(self.cluster)

    def run(self, fn: Callable[[Any], Any], tasks: list[Any], on_done: Callable[[Any], None]) -> list[Any]:
        return _collect([self.client.submit(fn, t, pure=False) for t in tasks], on_done)

    def close(self, ok: bool) -> None:
        self.client.close()
        self.cluster.close()


def _partition_bytes(size: int, workers: int) -> int:
    return int(min(_MAX_PARTITION, max(_MIN_PARTITION, size // (workers * _PER_WORKER) + 1)))


def _load_plan(staging: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(staging, PLAN), encoding="utf-8") as fh:
            plan = json.load(fh)
    except (OSError, ValueError):
        return None
    return plan if isinstance(plan, dict) else None


def convert_object_parallel(
    path: str,
    dst: str,
    *,
    workers: int,
    identity: dict[str, Any],
    overwrite: bool,
    resume: bool,
    safety: dict[str, Any],
    kind: str | None,
    kind_given: bool = True,
    cast: str | None,
    durable: bool,
    label: str,
    progress: Callable[[int], None] = lambda n: None,
    executor: str = "pool",
) -> tuple[int, int, list[str]]:
    """Convert the plain object ``.npy`` at ``path`` to the ragged store ``dst``; ``(elements, resumed_from, notes)``.

    ``identity`` (the source's path, size, mtime) is recorded for resume;
    ``progress(n)`` is called as partitions finish with their element counts.
    """
    global _SOURCE
    from npystream.formats.ragged_parts import (
        create_target,
        describe_part,
        find_mismatch,
        finish_assembly,
        plan_assembly,
    )
    from npystream.object_array import ObjectArray

    if executor not in ("pool", "dask"):
        raise ValueError(f"executor must be 'pool' or 'dask', got {executor!r}")
    refuse_existing(dst, overwrite)
    notes: list[str] = []
    staging = temp_name(dst, PARTS_TAG)
    safety = dict(safety, allowed_globals=tuple(sorted(map(str, safety.get("allowed_globals", ())))))
    record = dict(identity, kind=kind, cast=cast, **dict(safety, allowed_globals=list(safety["allowed_globals"])))
    arr = ObjectArray(path, **safety, zero_copy="always")  # the writer copies each element once
    pool: Any = None
    ok = False
    tmp = temp_name(dst)
    try:
        arr.build_index(save=executor == "dask")  # the workers of a cluster load it; forked ones inherit it
        stamp = (os.stat(path).st_size, os.stat(path).st_mtime_ns)
        old = _load_plan(staging) if os.path.lexists(staging) else None
        if os.path.lexists(staging):
            if resume:
                if old is None or old.get("source") != record:
                    raise FormatError(
                        f"the partial conversion at {staging} was made from a different source or with "
                        "other options (or its record is missing); remove it, or drop --resume to start over",
                        path=dst,
                    )
            else:
                remove_path(staging)
                old = None
                notes.append("removed a stale partial conversion (pass --resume to continue one)")
        if old is not None:
            bounds = np.asarray(old["bounds"], dtype=np.int64)
        else:
            size = stamp[0] - arr.header.data_offset
            bounds = arr.byte_partitions(_partition_bytes(size, workers))
            os.mkdir(staging)
            with open(os.path.join(staging, PLAN), "w", encoding="utf-8") as fh:
                json.dump({"source": record, "bounds": bounds.tolist()}, fh)
        nparts = max(len(bounds) - 1, 0)
        names = [_part_path(staging, k) for k in range(nparts)]
        resumed = 0
        for name in names:
            if os.path.isdir(name):
                resumed += _committed(name)
        progress(resumed)
        options = dict(safety)
        writer_options = {"kind": kind, "cast": cast, "durable": False, "buffer_size": _WRITER_BUFFER,
                          "kind_given": kind_given}
        _SOURCE = arr
        pool = _ForkPool(workers) if executor == "pool" else _DaskPool(workers)

        def run_parts(ks: list[int], wopts: dict[str, Any]) -> None:
            tasks = [(arr.path, stamp, options, k, int(bounds[k]), int(bounds[k + 1]), names[k], wopts) for k in ks]
            done = {k: _committed(names[k]) if os.path.isdir(names[k]) else 0 for k in ks}
            results = pool.run(_convert_part, tasks, lambda r: progress(r[1] - done[r[0]]))
            errors = [(k, r) for k, r in zip(ks, results) if isinstance(r, BaseException)]
            if errors:
                k, exc = min(errors, key=lambda e: e[0])
                if isinstance(exc, KindMismatch):  # says itself what to pass
                    raise KindMismatch(exc.message, path=label, index=exc.index) from None
                if isinstance(exc, CastError):
                    raise CastError(f"{exc.message}; {_HINT}", path=label, index=exc.index) from None
                raise exc

        run_parts(list(range(nparts)), writer_options)
        infos = [describe_part(n) for n in names]
        mismatch = find_mismatch(infos)
        if mismatch is not None and cast is not None and mismatch[2]:
            ref = next(p for p in infos if p.count)
            redo = [k for k, p in enumerate(infos) if p.count and p.dtype != ref.dtype]
            for k in redo:
                remove_path(names[k])
            run_parts(redo, dict(writer_options, dtype=ref.dtype, kind="array"))
            infos = [describe_part(n) for n in names]
            mismatch = find_mismatch(infos)
        if mismatch is not None:
            k, message, _ = mismatch
            raise CastError(f"the elements from here on {message}; {_HINT}", path=label, index=int(bounds[k]))
        total = sum(p.count for p in infos)
        if total != arr.size:  # pragma: no cover - every part is checked by its reader
            raise FormatError(f"the parts hold {total} elements, the header says {arr.size}", path=label)
        if infos:
            plan = plan_assembly(infos)
            create_target(plan, tmp)
            failed = [r for r in pool.run(_copy_part, [(plan, k, tmp) for k in range(len(infos))], lambda r: None)
                      if isinstance(r, BaseException)]
            if failed:
                raise failed[0]
            finish_assembly(plan, tmp, dst, overwrite=overwrite, durable=durable)
        else:  # an empty array: what the sequential converter writes
            from npystream._atomic import commit
            from npystream.formats.ragged import save_ragged

            save_ragged(tmp, [], kind=kind, durable=durable)
            commit(tmp, dst, overwrite=overwrite)
        ok = True
    except BaseException:
        remove_path(tmp)
        if resume and os.path.isdir(staging):
            notes.append(f"partial conversion kept at {staging}: rerun with --resume to continue")
            print(f"npystream convert: partial conversion kept at {staging}; rerun with --resume to continue",
                  file=sys.stderr)
        else:
            remove_path(staging)
        raise
    finally:
        _SOURCE = None
        if pool is not None:
            pool.close(ok)
        arr.close()
    remove_path(staging)
    return total, resumed, notes


def _committed(part: str) -> int:
    """Elements a part store has committed (0 when it has none yet or cannot be read)."""
    try:
        with open(os.path.join(part, "meta.json"), encoding="utf-8") as fh:
            return int(json.load(fh).get("count", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0
