"""ByteSource.release_pages and iter_elements(release_behind=True): pages dropped behind a reader."""

from __future__ import annotations

import mmap

import numpy as np
import pytest
from objcases import save_float32_arrays

import npystream.formats.pickle_walk as pw
from npystream.formats.npy import read_header
from npystream.formats.pickle_walk import SafetyPolicy, iter_elements
from npystream.sources import open_source


def _rss_file_kb() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssFile:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def test_release_pages_keeps_views_valid_and_drops_the_mapping(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 8 << 20, dtype=np.uint8)
    p = tmp_path / "f.bin"
    p.write_bytes(data.tobytes())
    src = open_source(str(p))
    try:
        view = np.frombuffer(src.map(), dtype=np.uint8)
        assert int(view.sum(dtype=np.int64)) == int(data.sum(dtype=np.int64))  # every page touched
        before = _rss_file_kb()
        src.release_pages(0, len(data))
        after = _rss_file_kb()
        if before is not None and after is not None:
            assert before - after >= 6 << 10  # about 8 MiB of mapped file pages dropped (KiB)
        assert np.array_equal(view, data)  # mapped again on access: same bytes
        # partial pages, empty and reversed ranges: never an error
        src.release_pages(1, mmap.PAGESIZE + 1)
        src.release_pages(100, 100)
        src.release_pages(200, 100)
        src.release_pages(0, 10 * len(data))
        assert np.array_equal(view[: mmap.PAGESIZE + 5], data[: mmap.PAGESIZE + 5])
    finally:
        del view
        src.close()


def test_release_pages_is_a_no_op_where_nothing_is_mapped(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(bytes(range(256)) * 40)
    src = open_source(str(p))  # never mapped
    src.release_pages(0, 10240)
    assert src.read_at(300, 4) == bytes([44, 45, 46, 47])  # still reads, nothing was mapped by it
    src.close()
    mem = open_source(p.read_bytes())  # bytes: a memory source
    mem.release_pages(0, 10240)
    assert bytes(mem.map()[:3]) == b"\x00\x01\x02"


@pytest.mark.parametrize("zero_copy", [True, False])
def test_release_behind_yields_the_same_elements(tmp_path, monkeypatch, zero_copy):
    """Pages dropped behind the reader every 8 KiB: the same elements as np.load, and views kept
    from the start (their pages dropped since) still hold their values."""
    monkeypatch.setattr(pw, "RELEASE_STEP", 8192)
    rng = np.random.default_rng(1)
    arr = np.empty(300, dtype=object)
    for i in range(300):
        kind = i % 4
        arr[i] = (rng.standard_normal(int(rng.integers(0, 3000))).astype("<f4") if kind < 2
                  else "s" * int(rng.integers(0, 50)) if kind == 2 else {"i": i})
    arr[150] = arr[3]  # a memo reference back across released pages
    p = tmp_path / "o.npy"
    np.save(p, arr, allow_pickle=True)
    want = np.load(p, allow_pickle=True)
    src = open_source(str(p))
    kept = list(iter_elements(src, read_header(src), SafetyPolicy.make(), zero_copy=zero_copy,
                              release_behind=True, _on_close=src.close))
    assert len(kept) == len(want)
    for got, exp in zip(kept, want):
        if isinstance(exp, np.ndarray):
            assert np.array_equal(got, exp)
        else:
            assert got == exp


def test_release_behind_in_conversion_matches_the_source(tmp_path, monkeypatch):
    import npystream

    monkeypatch.setattr(pw, "RELEASE_STEP", 4096)
    p = tmp_path / "o.npy"
    arr = save_float32_arrays(p, 500, 5000, seed=2)
    npystream.convert(str(p), str(tmp_path / "s.ragged"), progress=False)
    r = npystream.RaggedArray(str(tmp_path / "s.ragged"))
    assert len(r) == 500 and all(np.array_equal(a, b) for a, b in zip(arr, r))


@pytest.mark.parametrize("zero_copy", [False, True])
def test_many_elements_stream_without_an_index(tmp_path, monkeypatch, zero_copy, index_builds):
    """Above STREAM_ABOVE elements iter_objects reads a seekable file front to back (no offset index)
    and gives np.load's elements; zero_copy (which needs the map) keeps the indexed path."""
    import npystream

    monkeypatch.setattr(pw, "STREAM_ABOVE", 100)
    built = index_builds
    rng = np.random.default_rng(3)
    arr = np.empty(2100, dtype=object)
    arr[:] = [rng.standard_normal(int(n)).astype("<f4") if i % 3 else f"s{i}"
              for i, n in enumerate(rng.integers(0, 40, 2100))]
    arr[1500] = arr[7]  # a memo reference across batches
    p = tmp_path / "o.npy"
    np.save(p, arr, allow_pickle=True)
    want = np.load(p, allow_pickle=True)
    got = list(npystream.iter_objects(str(p), zero_copy=zero_copy))
    assert bool(built) == zero_copy
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (np.array_equal(a, b) if isinstance(b, np.ndarray) else a == b)
    with open(p, "rb") as fh:  # a caller's seekable file object, read part-way
        it = npystream.iter_objects(fh)
        assert str(next(it)) == str(want[0])
