"""convert object .npy -> ragged with large zero-copy elements copied file to file (copy_file_range).

The store must be byte-identical to the buffered path's (every element through the
writer's buffer, ``conversion._COPY_RANGES = False``), whatever the elements are, when
copy_file_range fails (fallback), and after an interrupted, resumed conversion.
"""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

pytest.importorskip("npystream.objects", reason="iter_objects (issue 3) not in the tree yet")

import npystream  # noqa: E402
import npystream.conversion as conversion  # noqa: E402
from npystream.conversion import convert  # noqa: E402
from npystream.object_array import ObjectArray  # noqa: E402

needs_cfr = pytest.mark.skipif(not hasattr(os, "copy_file_range"), reason="no os.copy_file_range")
pytestmark = needs_cfr


def _save(path, items):
    arr = np.empty(len(items), object)
    for i, x in enumerate(items):
        arr[i] = x
    np.save(path, arr, allow_pickle=True)
    return path


def _mixed_f32(n=41, seed=0):
    """float32 arrays of 0..30,000 items: most above the copy threshold (16 KiB), some below."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 30_000, n)
    lengths[[3, 7, 11]] = [0, 1, 4095]  # empty, tiny, just under 16 KiB
    return [rng.standard_normal(int(k), dtype=np.float32) for k in lengths]


def _store_bytes(path):
    return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


class _Counting:
    """Wraps os.copy_file_range: counts calls, optionally fails on a given call."""

    def __init__(self, fail_at=None, exc=None, partial=False):
        self.real = os.copy_file_range
        self.calls = 0
        self.fail_at = fail_at
        self.exc = exc
        self.partial = partial

    def __call__(self, src, dst, count, offset_src=None, offset_dst=None):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            if self.partial and self.calls == self.fail_at:
                return self.real(src, dst, max(1, count // 2), offset_src, offset_dst)
            raise self.exc
        return self.real(src, dst, count, offset_src, offset_dst)


def _buffered(monkeypatch, src, dst, **kw):
    with monkeypatch.context() as m:
        m.setattr(conversion, "_COPY_RANGES", False)
        m.setattr(os, "copy_file_range", _Counting(fail_at=1, exc=AssertionError("not buffered")))
        return convert(src, dst, **kw)


def _ranged(monkeypatch, src, dst, counting=None, **kw):
    counting = counting or _Counting()
    with monkeypatch.context() as m:
        m.setattr(os, "copy_file_range", counting)
        res = convert(src, dst, **kw)
    return res, counting


def test_copy_ranges_byte_identical_to_buffered_path(tmp_path, monkeypatch):
    items = _mixed_f32()
    src = _save(tmp_path / "a.npy", items)
    _buffered(monkeypatch, src, tmp_path / "buf.ragged")
    res, counting = _ranged(monkeypatch, src, tmp_path / "cfr.ragged")
    big = sum(x.nbytes >= conversion._RANGE_MIN for x in items[1:])  # items[0] creates the store
    assert big >= 30 and counting.calls >= big  # the kernel copy really ran, once per large element
    assert res.elements == len(items)
    assert _store_bytes(tmp_path / "cfr.ragged") == _store_bytes(tmp_path / "buf.ragged")
    r = npystream.open(tmp_path / "cfr.ragged")
    for x, y in zip(np.load(src, allow_pickle=True), r):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    assert sorted(os.listdir(tmp_path)) == ["a.npy", "buf.ragged", "cfr.ragged"]


def test_every_element_through_copy_ranges(tmp_path, monkeypatch):
    """With no size threshold, tiny and empty elements take the kernel-copy path too."""
    items = _mixed_f32(n=30, seed=1)
    src = _save(tmp_path / "a.npy", items)
    _buffered(monkeypatch, src, tmp_path / "buf.ragged")
    monkeypatch.setattr(conversion, "_RANGE_MIN", 0)
    _, counting = _ranged(monkeypatch, src, tmp_path / "cfr.ragged")
    nonempty = sum(x.nbytes > 0 for x in items)
    assert counting.calls >= nonempty - 1  # the first element creates the store through append()
    assert _store_bytes(tmp_path / "cfr.ragged") == _store_bytes(tmp_path / "buf.ragged")


def test_nd_and_fortran_ordered_elements(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    items = []
    for i in range(12):
        x = rng.standard_normal((int(rng.integers(700, 2000)), 3))  # float64, >= 16 KiB
        items.append(np.asfortranarray(x) if i % 3 == 1 else x)  # Fortran: not a plain view
    src = _save(tmp_path / "a.npy", items)
    _buffered(monkeypatch, src, tmp_path / "buf.ragged")
    _, counting = _ranged(monkeypatch, src, tmp_path / "cfr.ragged")
    assert counting.calls >= 7
    got = _store_bytes(tmp_path / "cfr.ragged")
    assert "shapes.npy" in got and got == _store_bytes(tmp_path / "buf.ragged")
    r = npystream.open(tmp_path / "cfr.ragged")
    for x, y in zip(items, r):
        assert x.shape == y.shape and np.array_equal(x, y)


def test_elements_that_are_not_plain_views(tmp_path, monkeypatch):
    """Casts, other byte orders, lists and small arrays between kernel-copied elements."""
    rng = np.random.default_rng(3)
    items = []
    for i in range(30):
        n = int(rng.integers(5_000, 9_000))
        x = rng.standard_normal(n, dtype=np.float32)
        kind = i % 6
        if kind == 1:
            x = x.astype("<f8")  # cast into the float32 store
        elif kind == 2:
            x = x.astype(">f4")  # swapped: decoded as a copy, not a view of the file
        elif kind == 3:
            x = [float(v) for v in x[:50]]  # a list
        elif kind == 4:
            x = x[:10]  # small
        items.append(x)
    src = _save(tmp_path / "a.npy", items)
    _buffered(monkeypatch, src, tmp_path / "buf.ragged", cast="same_kind")
    _, counting = _ranged(monkeypatch, src, tmp_path / "cfr.ragged", cast="same_kind")
    assert counting.calls >= 9
    assert _store_bytes(tmp_path / "cfr.ragged") == _store_bytes(tmp_path / "buf.ragged")
    r = npystream.open(tmp_path / "cfr.ragged")
    assert r.dtype == np.dtype("<f4")
    for x, y in zip(items, r):
        assert np.array_equal(np.asarray(x, dtype="<f4"), y)


def test_without_cast_the_mismatch_is_still_refused(tmp_path, monkeypatch):
    items = _mixed_f32(n=12, seed=4) + [np.ones(9000, "<f8")]
    src = _save(tmp_path / "a.npy", items)
    with pytest.raises(npystream.CastError) as info:
        _ranged(monkeypatch, src, tmp_path / "cfr.ragged")
    assert info.value.index == 12
    assert not (tmp_path / "cfr.ragged").exists()
    assert [n for n in os.listdir(tmp_path) if "npystream-tmp" in n] == []


@pytest.mark.parametrize("code", [errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP])
def test_falls_back_where_copy_file_range_is_unsupported(tmp_path, monkeypatch, code):
    items = _mixed_f32(n=20, seed=5)
    src = _save(tmp_path / "a.npy", items)
    _buffered(monkeypatch, src, tmp_path / "buf.ragged")
    counting = _Counting(fail_at=1, exc=OSError(code, os.strerror(code)))
    _ranged(monkeypatch, src, tmp_path / "cfr.ragged", counting)
    assert counting.calls == 1  # tried once, then never again for this conversion
    assert _store_bytes(tmp_path / "cfr.ragged") == _store_bytes(tmp_path / "buf.ragged")


def test_falls_back_after_a_partial_copy(tmp_path, monkeypatch):
    items = _mixed_f32(n=20, seed=6)
    src = _save(tmp_path / "a.npy", items)
    _buffered(monkeypatch, src, tmp_path / "buf.ragged")
    counting = _Counting(fail_at=4, exc=OSError(errno.EXDEV, "cross-device"), partial=True)
    _ranged(monkeypatch, src, tmp_path / "cfr.ragged", counting)
    assert counting.calls == 5  # 3 whole copies, half of the 4th, the failing call; then pwrite
    assert _store_bytes(tmp_path / "cfr.ragged") == _store_bytes(tmp_path / "buf.ragged")


def test_a_real_write_error_stops_the_conversion(tmp_path, monkeypatch):
    src = _save(tmp_path / "a.npy", _mixed_f32(n=20, seed=7))
    counting = _Counting(fail_at=3, exc=OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OSError) as info:
        _ranged(monkeypatch, src, tmp_path / "cfr.ragged", counting)
    assert info.value.errno == errno.ENOSPC
    assert sorted(os.listdir(tmp_path)) == ["a.npy"]  # nothing at DST, no temporaries


def test_resume_after_an_interrupted_copy(tmp_path, monkeypatch):
    items = _mixed_f32(n=40, seed=8)
    src = _save(tmp_path / "a.npy", items)
    _buffered(monkeypatch, src, tmp_path / "buf.ragged")
    # Ctrl-C lands inside the 10th kernel copy of a --resume run: the partial store is kept
    # with every element appended before it committed
    counting = _Counting(fail_at=10, exc=KeyboardInterrupt(), partial=True)
    with pytest.raises(KeyboardInterrupt):
        _ranged(monkeypatch, src, tmp_path / "cfr.ragged", counting, resume=True)
    assert not (tmp_path / "cfr.ragged").exists()
    partial = [n for n in os.listdir(tmp_path) if n.endswith(".partial.npystream-tmp")]
    assert len(partial) == 1
    kept = len(npystream.open(tmp_path / partial[0]))
    # items[0] creates the store through append(); later large ones are kernel-copied
    copied = [i for i, x in enumerate(items) if i and x.nbytes >= conversion._RANGE_MIN]
    assert kept == copied[9]  # everything before the interrupted element
    res, again = _ranged(monkeypatch, src, tmp_path / "cfr.ragged", resume=True)
    assert res.resumed_from == kept and res.elements == len(items) and again.calls > 0
    assert _store_bytes(tmp_path / "cfr.ragged") == _store_bytes(tmp_path / "buf.ragged")
    assert sorted(os.listdir(tmp_path)) == ["a.npy", "buf.ragged", "cfr.ragged"]


def test_file_mapping_locates_zero_copy_views(tmp_path):
    items = _mixed_f32(n=12, seed=9)
    src = _save(tmp_path / "a.npy", items)
    data = src.read_bytes()
    with ObjectArray(src, zero_copy=True) as arr:
        where, base, address, size = arr.file_mapping()
        assert os.path.samefile(where, src) and base == 0 and size == len(data)
        for i in range(len(items)):
            x = arr[i]
            if not x.nbytes:
                continue
            p = x.__array_interface__["data"][0]
            assert address <= p and p + x.nbytes <= address + size
            offset = base + p - address
            assert data[offset : offset + x.nbytes] == items[i].tobytes()
    with ObjectArray(src, zero_copy=False) as arr:
        assert arr.file_mapping() is None
