"""``convert --workers N``: object .npy -> ragged store on forked processes, byte-identical to one process."""

from __future__ import annotations

import gzip
import os
import shutil

import numpy as np
import pytest
from objcases import assert_same_store

import npystream
from npystream import parallel_convert
from npystream.cli import main
from npystream.conversion import convert


@pytest.fixture
def small_partitions(monkeypatch):
    """Partitions of a few KB, so that test files split into many (forked workers inherit this)."""
    monkeypatch.setattr(parallel_convert, "_MIN_PARTITION", 1 << 12)
    monkeypatch.setattr(parallel_convert, "_PER_WORKER", 8)


def _save(path, elements) -> None:
    a = np.empty(len(elements), dtype=object)
    a[:] = elements
    np.save(path, a)


def _ints(n: int, seed: int = 0, dtype=np.int32) -> list:
    rng = np.random.default_rng(seed)
    return [np.arange(int(k), dtype=dtype) for k in rng.integers(0, 12, n)]


@pytest.mark.parametrize("elements", ["ints", "strings", "2d"])
def test_workers_byte_identical(tmp_path, small_partitions, elements, capsys):
    elems = {
        "ints": _ints(5000),
        "strings": [f"é{i}" * (i % 5) for i in range(3000)],
        "2d": [np.full((i % 3, 4), i, dtype=">f4") for i in range(2000)],
    }[elements]
    src = tmp_path / "o.npy"
    _save(src, elems)
    assert main(["convert", str(src), str(tmp_path / "seq.ragged"), "-q"]) == 0
    assert main(["convert", str(src), str(tmp_path / "par.ragged"), "--workers", "2"]) == 0
    assert "converted" in capsys.readouterr().err
    assert_same_store(tmp_path / "seq.ragged", tmp_path / "par.ragged")
    assert sorted(os.listdir(tmp_path)) == ["o.npy", "par.ragged", "seq.ragged"]  # no index, no leftovers


def test_workers_verify_and_empty(tmp_path, small_partitions):
    src = tmp_path / "o.npy"
    _save(src, _ints(700))
    res = convert(src, tmp_path / "v.ragged", workers=3, verify=True)
    assert res.elements == 700 and any("verified: 700" in n for n in res.notes)
    empty = tmp_path / "e.npy"
    np.save(empty, np.empty(0, dtype=object))
    convert(empty, tmp_path / "e1.ragged")
    convert(empty, tmp_path / "e2.ragged", workers=2)
    assert_same_store(tmp_path / "e1.ragged", tmp_path / "e2.ragged")


def test_workers_cast_error_same_element_as_one_process(tmp_path, small_partitions, capsys):
    elems = _ints(3000) + [np.arange(3, dtype=np.int64)] + _ints(10)
    src = tmp_path / "o.npy"
    _save(src, elems)
    with pytest.raises(npystream.CastError) as seq:
        convert(src, tmp_path / "a.ragged")
    with pytest.raises(npystream.CastError) as par:
        convert(src, tmp_path / "b.ragged", workers=2)
    assert par.value.index == seq.value.index == 3000
    assert "--cast same_kind" in str(par.value)
    assert main(["convert", str(src), str(tmp_path / "c.ragged"), "--workers", "2", "-q"]) == 1
    assert "element 3000" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["o.npy"]
    convert(src, tmp_path / "seq.ragged", cast="same_kind")
    convert(src, tmp_path / "par.ragged", cast="same_kind", workers=2)
    assert_same_store(tmp_path / "seq.ragged", tmp_path / "par.ragged")


def test_workers_cast_error_at_a_partition_start(tmp_path, small_partitions):
    # int32 arrays, then from some partition on int64 ones: that partition's first element is the error
    elems = _ints(3000) + _ints(3000, seed=1, dtype=np.int64)
    src = tmp_path / "o.npy"
    _save(src, elems)
    with pytest.raises(npystream.CastError) as seq:
        convert(src, tmp_path / "a.ragged")
    with pytest.raises(npystream.CastError) as par:
        convert(src, tmp_path / "b.ragged", workers=2)
    assert par.value.index == seq.value.index


def _fail_partition_2(task):
    if task[3] == 2:
        raise OSError("disk on fire (on purpose)")
    return _real_convert_part(task)


_real_convert_part = parallel_convert._convert_part


def test_workers_resume(tmp_path, small_partitions, monkeypatch, capsys):
    src = tmp_path / "o.npy"
    _save(src, _ints(6000))
    dst = tmp_path / "out.ragged"
    monkeypatch.setattr(parallel_convert, "_convert_part", _fail_partition_2)
    assert main(["convert", str(src), str(dst), "--workers", "2", "--resume", "-q"]) == 1
    err = capsys.readouterr().err
    assert "on purpose" in err and "rerun with --resume" in err
    assert not dst.exists()
    monkeypatch.setattr(parallel_convert, "_convert_part", _real_convert_part)
    res = convert(src, dst, workers=2, resume=True)
    assert 0 < res.resumed_from < res.elements == 6000
    convert(src, tmp_path / "seq.ragged")
    assert_same_store(dst, tmp_path / "seq.ragged")
    assert sorted(os.listdir(tmp_path)) == ["o.npy", "out.ragged", "seq.ragged"]


def test_workers_stale_parts(tmp_path, small_partitions, monkeypatch):
    src = tmp_path / "o.npy"
    _save(src, _ints(3000))
    dst = tmp_path / "out.ragged"
    monkeypatch.setattr(parallel_convert, "_convert_part", _fail_partition_2)
    with pytest.raises(OSError, match="on purpose"):
        convert(src, dst, workers=2, resume=True)
    monkeypatch.setattr(parallel_convert, "_convert_part", _real_convert_part)
    other = tmp_path / "p.npy"
    _save(other, _ints(3000, seed=5))
    with pytest.raises(npystream.FormatError, match="different source"):
        convert(other, dst, workers=2, resume=True)
    res = convert(src, dst, workers=2)  # no --resume: the parts are dropped
    assert res.resumed_from == 0 and any("stale partial" in n for n in res.notes)
    assert npystream.verify(src, dst).equal


def test_workers_other_sources_run_in_one_process(tmp_path):
    src = tmp_path / "o.npy"
    _save(src, _ints(50))
    with open(src, "rb") as f, gzip.open(tmp_path / "o.npy.gz", "wb") as g:
        g.write(f.read())
    res = convert(tmp_path / "o.npy.gz", tmp_path / "g.ragged", workers=2)
    assert any("one process" in n for n in res.notes)
    assert npystream.verify(src, tmp_path / "g.ragged").equal


def test_workers_flag_validation(tmp_path, capsys):
    assert main(["convert", "a.npy", "b.ragged", "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err
    with pytest.raises(ValueError, match="workers"):
        convert(tmp_path / "a.npy", tmp_path / "b.ragged", workers=0)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("NPYSTREAM_PURE_PYTHON") == "1", reason="backend-independent: runs once")
def test_dask_executor_same_bytes(tmp_path, small_partitions):
    pytest.importorskip("distributed")
    src = tmp_path / "o.npy"
    _save(src, _ints(3000))
    info = npystream.conversion.describe_source(str(src))
    parallel_convert.convert_object_parallel(
        str(src), str(tmp_path / "d.ragged"), workers=2, identity=info.identity, overwrite=False, resume=False,
        safety={"trusted": False, "allowed_globals": ()}, kind="array", cast=None, durable=False,
        label=str(src), executor="dask")
    convert(src, tmp_path / "seq.ragged")
    assert_same_store(tmp_path / "d.ragged", tmp_path / "seq.ragged")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("NPYSTREAM_PURE_PYTHON") == "1", reason="backend-independent: runs once")
def test_workers_sigterm_leaves_nothing(tmp_path):
    """SIGTERM while the workers write: exit 130, no DST, no staging directory, no worker left running."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    src = tmp_path / "o.npy"
    _save(src, _ints(150_000))
    dst = tmp_path / "out.ragged"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [os.path.dirname(os.path.dirname(npystream.__file__)), os.environ.get("PYTHONPATH")])))
    for _attempt in range(3):  # a fast machine may finish before the signal lands: try again
        proc = subprocess.Popen([sys.executable, "-m", "npystream", "convert", str(src), str(dst), "--workers", "2",
                                 "-q"], env=env, stderr=subprocess.PIPE)
        parts = None
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            parts = next((p for p in tmp_path.iterdir() if p.name.endswith(".parts.npystream-tmp")), None)
            if parts is not None and any(q.name.startswith("part-") for q in parts.iterdir()):
                break
            time.sleep(0.01)
        kids = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        if proc.returncode != 0:
            break
        shutil.rmtree(dst, ignore_errors=True)
    else:
        pytest.skip("every conversion finished before the signal landed")
    assert proc.returncode == 130, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.npy"]
    gone, alive = psutil.wait_procs(kids, timeout=10)
    assert not alive


def _die_in_partition_1(task):
    if task[3] == 1:
        os._exit(9)  # a worker killed mid-task (the OOM killer, kill -9)
    return _real_convert_part(task)


def test_workers_dead_worker_is_an_error_not_a_hang(tmp_path, small_partitions, monkeypatch):
    src = tmp_path / "o.npy"
    _save(src, _ints(3000))
    monkeypatch.setattr(parallel_convert, "_convert_part", _die_in_partition_1)
    with pytest.raises(npystream.NpyStreamError, match="worker process died"):
        convert(src, tmp_path / "out.ragged", workers=2)
    assert sorted(os.listdir(tmp_path)) == ["o.npy"]


def test_workers_refuse_a_changed_element_as_one_process(tmp_path, small_partitions):
    """A list among arrays: the same KindMismatch (class, element, message) with and without workers."""
    from npystream.formats.ragged import KindMismatch

    elems = _ints(2500) + [[1, 2]] + _ints(10)
    src = tmp_path / "o.npy"
    _save(src, elems)
    with pytest.raises(KindMismatch) as seq:
        convert(src, tmp_path / "a.ragged")
    with pytest.raises(KindMismatch) as par:
        convert(src, tmp_path / "b.ragged", workers=2)
    assert par.value.index == seq.value.index == 2500
    assert par.value.message.endswith(seq.value.message)  # the same text, after the partition's name
    assert sorted(os.listdir(tmp_path)) == ["o.npy"]
