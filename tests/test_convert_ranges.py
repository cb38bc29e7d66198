"""convert object .npy -> ragged reading large zero-copy elements from the file (switchable).

Elements that are views of the source's map are read with preadv into the writer's
buffer, or copied file to file with copy_file_range when larger than the buffer
(RaggedWriter.append_from_file).  The store must be byte-identical to the path that
copies every element out of the map (``conversion._READ_RANGES = False``), whatever the
elements are, when copy_file_range fails (fallback), and after an interrupted, resumed
conversion.  The path is off by default (``conversion._READ_RANGES``; measured slower on
the development VM) and switched on here; the tests shrink the writer's buffer to 64 KiB
so that both calls run.
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

pytestmark = pytest.mark.skipif(not (hasattr(os, "copy_file_range") and hasattr(os, "preadv")),
                                reason="no os.copy_file_range / os.preadv")


def _save(path, items):
    arr = np.empty(len(items), object)
    for i, x in enumerate(items):
        arr[i] = x
    np.save(path, arr, allow_pickle=True)
    return path


def _mixed_f32(n=41, seed=0):
    """float32 arrays of 0..30,000 items (0-120 KB): below, between and above the thresholds."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 30_000, n)
    lengths[[3, 7, 11]] = [0, 1, 1023]  # empty, tiny, just under 4 KiB
    return [rng.standard_normal(int(k), dtype=np.float32) for k in lengths]


def _store_bytes(path):
    return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


class _Counting:
    """Wraps an os function: counts calls, optionally fails from a given call on."""

    def __init__(self, real, fail_at=None, exc=None, partial=False):
        self.real = real
        self.calls = 0
        self.fail_at = fail_at
        self.exc = exc
        self.partial = partial

    def __call__(self, fd, *args):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            if self.partial and self.calls == self.fail_at:
                self.real(fd, *_half(args))
            raise self.exc
        return self.real(fd, *args)


def _half(args):
    """The arguments of a copy_file_range / preadv call that does half the work."""
    if isinstance(args[1], int):  # copy_file_range(src, dst, count, offset_src, offset_dst)
        dst, count, *rest = args
        return (dst, max(1, count // 2), *rest)
    buffers, offset = args  # preadv(fd, buffers, offset)
    return ([memoryview(buffers[0])[: max(1, len(buffers[0]) // 2)]], offset)


_BUFFER = 64 << 10  # elements above it are copied with copy_file_range


def _buffered(monkeypatch, src, dst, **kw):
    with monkeypatch.context() as m:
        m.setattr(conversion, "_READ_RANGES", False)
        m.setattr(conversion, "_WRITER_BUFFER", _BUFFER)
        for name in ("copy_file_range", "preadv"):
            m.setattr(os, name, _Counting(getattr(os, name), 1, AssertionError(f"{name} called")))
        return convert(src, dst, **kw)


def _ranged(monkeypatch, src, dst, cfr=None, preadv=None, **kw):
    cfr = cfr or _Counting(os.copy_file_range)
    preadv = preadv or _Counting(os.preadv)
    with monkeypatch.context() as m:
        m.setattr(conversion, "_READ_RANGES", True)  # off by default (measured slower; see conversion.py)
        m.setattr(conversion, "_WRITER_BUFFER", _BUFFER)
        m.setattr(os, "copy_file_range", cfr)
        m.setattr(os, "preadv", preadv)
        res = convert(src, dst, **kw)
    return res, cfr, preadv


def _routes(items, least=None):
    """How many elements (after items[0], which creates the store) go to preadv / copy_file_range."""
    least = conversion._RANGE_MIN if least is None else least
    sizes = [x.nbytes for x in items[1:] if isinstance(x, np.ndarray)]
    return sum(least <= n <= _BUFFER for n in sizes), sum(n > _BUFFER for n in sizes)


def test_reads_byte_identical_to_copies_out_of_the_map(tmp_path, monkeypatch):
    items = _mixed_f32()
    src = _save(tmp_path / "a.npy", items)
    _buffered(monkeypatch, src, tmp_path / "buf.ragged")
    res, cfr, preadv = _ranged(monkeypatch, src, tmp_path / "cfr.ragged")
    small, large = _routes(items)
    assert small >= 10 and large >= 10  # both calls really ran, once per element they serve
    assert preadv.calls == small and cfr.calls >= large
    assert res.elements == len(items)
    assert _store_bytes(tmp_path / "cfr.ragged") == _store_bytes(tmp_path / "buf.ragged")
    r = npystream.open(tmp_path / "cfr.ragged")
    for x, y in zip(np.load(src, allow_pickle=True), r):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    assert sorted(os.listdir(tmp_path)) == ["a.npy", "buf.ragged", "cfr.ragged"]


def test_every_element_read_from_the_file(tmp_path, monkeypatch):
    """With no size threshold, tiny and empty elements are read from the file too."""
    items = _mixed_f32(n=30, seed=1)
    src = _save(tmp_path / "a.npy", items)
    _buffered(monkeypatch, src, tmp_path / "buf.ragged")
    monkeypatch.setattr(conversion, "_RANGE_MIN", 0)
    _, cfr, preadv = _ranged(monkeypatch, src, tmp_path / "cfr.ragged")
    assert (preadv.calls, cfr.calls > 0) == (_routes(items, 0)[0], True)
    assert _store_bytes(tmp_path / "cfr.ragged") == _store_bytes(tmp_path / "buf.ragged")


def test_nd_and_fortran_ordered_elements(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    items = []
    for i in range(12):
        x = rng.standard_normal((int(rng.integers(700, 2000)), 3))  # float64, >= 16 KiB
        items.append(np.asfortranarray(x) if i % 3 == 1 else x)  # Fortran: not a plain view
    src = _save(tmp_path / "a.npy", items)
    _buffered(monkeypatch, src, tmp_path / "buf.ragged")
    _, cfr, preadv = _ranged(monkeypatch, src, tmp_path / "cfr.ragged")
    assert preadv.calls + cfr.calls >= 7  # the 7 C-ordered ones after items[0]
    got = _store_bytes(tmp_path / "cfr.ragged")
    assert "shapes.npy" in got and got == _store_bytes(tmp_path / "buf.ragged")
    r = npystream.open(tmp_path / "cfr.ragged")
    for x, y in zip(items, r):
        assert x.shape == y.shape and np.array_equal(x, y)


def test_elements_that_are_not_plain_views(tmp_path, monkeypatch):
    """Casts, other byte orders and small arrays between kernel-copied elements."""
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
            x = np.array([float(v) for v in x[:50]], dtype="<f4")  # small, built anew
        elif kind == 4:
            x = x[:10]  # small
        items.append(x)
    src = _save(tmp_path / "a.npy", items)
    _buffered(monkeypatch, src, tmp_path / "buf.ragged", cast="same_kind")
    _, cfr, preadv = _ranged(monkeypatch, src, tmp_path / "cfr.ragged", cast="same_kind")
    assert preadv.calls == 9  # the float32 ones after items[0]; the others are no views of it
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
    cfr = _Counting(os.copy_file_range, 1, OSError(code, os.strerror(code)))
    _ranged(monkeypatch, src, tmp_path / "cfr.ragged", cfr)
    assert _routes(items)[1] >= 2 and cfr.calls == 1  # tried once, then never again
    assert _store_bytes(tmp_path / "cfr.ragged") == _store_bytes(tmp_path / "buf.ragged")


def test_falls_back_after_a_partial_copy(tmp_path, monkeypatch):
    items = _mixed_f32(n=20, seed=6)
    src = _save(tmp_path / "a.npy", items)
    _buffered(monkeypatch, src, tmp_path / "buf.ragged")
    cfr = _Counting(os.copy_file_range, 4, OSError(errno.EXDEV, "cross-device"), partial=True)
    _ranged(monkeypatch, src, tmp_path / "cfr.ragged", cfr)
    assert _routes(items)[1] >= 5 and cfr.calls == 4  # 3 whole copies, then half of one; pwrite
    assert _store_bytes(tmp_path / "cfr.ragged") == _store_bytes(tmp_path / "buf.ragged")


@pytest.mark.parametrize("name", ["copy_file_range", "preadv"])
def test_a_real_io_error_stops_the_conversion(tmp_path, monkeypatch, name):
    src = _save(tmp_path / "a.npy", _mixed_f32(n=20, seed=7))
    failing = _Counting(getattr(os, name), 3, OSError(errno.EIO, "Input/output error"))
    with pytest.raises(OSError) as info:
        _ranged(monkeypatch, src, tmp_path / "cfr.ragged", **{name.replace("copy_file_range", "cfr"): failing})
    assert info.value.errno == errno.EIO and failing.calls == 3
    assert sorted(os.listdir(tmp_path)) == ["a.npy"]  # nothing at DST, no temporaries


@pytest.mark.parametrize("name", ["copy_file_range", "preadv"])
def test_resume_after_an_interrupted_read(tmp_path, monkeypatch, name):
    items = _mixed_f32(n=41, seed=8)
    src = _save(tmp_path / "a.npy", items)
    _buffered(monkeypatch, src, tmp_path / "buf.ragged")
    # Ctrl-C lands inside the 5th call of a --resume run, half-way through an element: the
    # partial store is kept with every element appended before it, committed
    failing = _Counting(getattr(os, name), 5, KeyboardInterrupt(), partial=True)
    with pytest.raises(KeyboardInterrupt):
        _ranged(monkeypatch, src, tmp_path / "cfr.ragged", resume=True,
                **{name.replace("copy_file_range", "cfr"): failing})
    assert not (tmp_path / "cfr.ragged").exists()
    partial = [n for n in os.listdir(tmp_path) if n.endswith(".partial.npystream-tmp")]
    assert len(partial) == 1
    kept = len(npystream.open(tmp_path / partial[0]))
    # items[0] creates the store through append(); then each size goes to its call
    if name == "preadv":
        served = [i for i, x in enumerate(items) if i and conversion._RANGE_MIN <= x.nbytes <= _BUFFER]
    else:
        served = [i for i, x in enumerate(items) if i and x.nbytes > _BUFFER]
    assert kept == served[4]  # everything before the interrupted element
    res, cfr, preadv = _ranged(monkeypatch, src, tmp_path / "cfr.ragged", resume=True)
    assert res.resumed_from == kept and res.elements == len(items) and cfr.calls and preadv.calls
    assert _store_bytes(tmp_path / "cfr.ragged") == _store_bytes(tmp_path / "buf.ragged")
    assert sorted(os.listdir(tmp_path)) == ["a.npy", "buf.ragged", "cfr.ragged"]


def test_file_mapping_locates_zero_copy_views(tmp_path):
    items = _mixed_f32(n=12, seed=9)
    src = _save(tmp_path / "a.npy", items)
    data = src.read_bytes()
    with ObjectArray(src, zero_copy="always") as arr:  # views, aligned or not
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


def test_off_by_default(tmp_path, monkeypatch):
    src = _save(tmp_path / "a.npy", _mixed_f32(n=12, seed=10))
    assert conversion._READ_RANGES is False
    _buffered(monkeypatch, src, tmp_path / "a.ragged")  # asserts neither call is made
    with monkeypatch.context() as m:
        for name in ("copy_file_range", "preadv"):
            m.setattr(os, name, _Counting(getattr(os, name), 1, AssertionError(f"{name} called")))
        convert(src, tmp_path / "b.ragged")
    assert _store_bytes(tmp_path / "a.ragged") == _store_bytes(tmp_path / "b.ragged")


def test_read_ranges_path_keeps_types_too(tmp_path, monkeypatch):
    """The file-range path decides the kind from the first element and refuses a list among arrays."""
    src = _save(tmp_path / "a.npy", _mixed_f32(n=12) + [[1.0, 2.0]])
    with pytest.raises(npystream.CastError, match="--kind object") as info:
        _ranged(monkeypatch, src, tmp_path / "a.ragged")
    assert info.value.index == 12 and not (tmp_path / "a.ragged").exists()
    src = _save(tmp_path / "b.npy", [[1.0], (2, 3), np.float32(4)])
    res, _, _ = _ranged(monkeypatch, src, tmp_path / "b.ragged")
    assert res.elements == 3 and npystream.open(tmp_path / "b.ragged").kind == "object"
    assert npystream.verify(src, tmp_path / "b.ragged").equal
