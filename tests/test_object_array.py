"""ObjectArray: random access equals iteration equals np.load, zero-copy views, the saved .nsidx, streams."""

from __future__ import annotations

import gzip
import io
import os
import random
import stat
import threading
import zipfile

import numpy as np
import pytest
from objcases import (
    CASE_NAMES,
    assert_same_element,
    assert_same_elements,
    case,
    case_bytes,
    expected_elements,
    obj_array,
    write_case,
)

import npystream
from npystream import FormatError, NotSeekableError
from npystream.object_array import ObjectArray, index_path_for

ZERO_COPY_KINDS = set("biufcmMSV")




def _worker_read(job):
    """Runs in a spawned process: the ObjectArray arrives pickled (re-opened by path)."""
    arr, i = job
    return repr(arr[i])


def _is_plain_array(x) -> bool:
    return type(x) is np.ndarray and not x.dtype.hasobject


# ---------------------------------------------------------------------------
# the whole corpus: iteration == random access == np.load


@pytest.mark.parametrize("name", CASE_NAMES)
def test_corpus_iteration_and_random_access(tmp_path, name):
    c = case(name)
    path = tmp_path / f"{name}.npy"
    loaded = write_case(c, path)
    expected = expected_elements(loaded)
    with npystream.open(path) as arr:
        assert isinstance(arr, ObjectArray)
        assert arr.shape == loaded.shape
        assert arr.dtype == loaded.dtype
        assert arr.size == loaded.size
        assert arr.fortran_order == bool(loaded.flags.f_contiguous and not loaded.flags.c_contiguous)
        if loaded.ndim:
            assert len(arr) == len(loaded)
        else:
            with pytest.raises(TypeError):
                len(arr)
        assert_same_elements(arr.flat, expected)
        if loaded.ndim:  # iteration over the first axis, like numpy: elements or rows
            for got_row, want_row in zip(arr, loaded, strict=True):
                assert_same_element(got_row, want_row) if loaded.ndim == 1 else _same_rows(got_row, want_row)
        order = list(range(loaded.size))
        random.Random(name).shuffle(order)
        originals = expected_elements(c.make())  # seeded: the arrays as saved, before numpy's unpickling
        for i in order:
            idx = np.unravel_index(i, loaded.shape) if loaded.ndim else ()
            got = arr[tuple(int(k) for k in idx)]
            assert_same_element(got, expected[i])
            orig = originals[i]
            if (
                _is_plain_array(got)
                and got.nbytes
                and got.dtype.kind in ZERO_COPY_KINDS
                and orig.dtype.isnative
                and c.protocol in (None, 3, 4)
            ):
                # zero-copy default on a file: plain native array payloads are read-only views
                # when aligned for their dtype, else aligned copies (what np.load gives)
                assert got.flags.aligned, f"element {i} should be aligned"
                if not got.flags.writeable:  # a view of the file, never a read-only copy
                    assert not got.flags.owndata
        # iteration again (a file can be iterated many times) equals the first
        assert_same_elements(list(arr.flat), expected)


def _same_rows(got, want):
    """An object ndarray row equals numpy's row: type, dtype, shape, every element."""
    assert type(got) is np.ndarray and got.dtype == want.dtype and got.shape == want.shape
    for g, w in zip(got.flat, want.flat, strict=True):
        assert_same_element(g, w)


@pytest.mark.parametrize("name", ["many_2500", "nd_fortran_3d", "structured_nested_object", "memo_backrefs"])
def test_slices_lists_masks_return_object_arrays(tmp_path, name):
    path = tmp_path / "a.npy"
    loaded = write_case(case(name), path)
    positions = np.arange(loaded.size).reshape(loaded.shape)
    expected = expected_elements(loaded)
    rng = np.random.default_rng(7)

    def check(key):
        want = positions[key]
        got = arr[key]
        if not isinstance(want, np.ndarray):  # numpy gives the element itself
            assert_same_element(got, expected[int(want)])
            return
        _same_rows(got, loaded[key])  # numpy gives an object ndarray of this shape
        assert got.shape == want.shape

    with npystream.open(path) as arr:
        n0 = loaded.shape[0]
        for key in [
            slice(None),
            slice(1, 5),
            slice(None, None, -3),
            slice(-2, None),
            [0, -1, 0],
            list(rng.integers(-n0, n0, 10)),
            rng.random(n0) < 0.3,
            -1,
            Ellipsis,
        ]:
            check(key)
        if loaded.ndim > 1:
            check((0, slice(None)))
            check((slice(None), -1))
            check((Ellipsis, 0))
            check(rng.random(loaded.shape) < 0.5)


def test_nd_index_and_errors_like_numpy(tmp_path):
    path = tmp_path / "nd.npy"
    loaded = write_case(case("nd_fortran"), path)
    with npystream.open(path) as arr:
        assert arr.ndim == 2 and arr.shape == (3, 4)
        assert_same_element(arr[2, 3], loaded[2, 3])
        assert_same_element(arr[-1, -4], loaded[-1, -4])
        assert_same_element(arr[np.int64(1), np.uint8(2)], loaded[1, 2])
        for key in [(3, 0), (0, 4), (-4, 0), (0, 0, 0), 5, "x", 1.5]:
            with pytest.raises(IndexError) as want:
                loaded[key]
            with pytest.raises(IndexError) as got:
                arr[key]
            assert str(got.value) == str(want.value)
        row = arr[1]
        assert type(row) is np.ndarray and row.dtype == object and row.shape == (4,)
        for j in range(4):
            assert_same_element(row[j], loaded[1, j])
        _same_rows(arr[1:3], loaded[1:3])
        _same_rows(arr[..., 2], loaded[..., 2])
        _same_rows(arr[[2, 0]], loaded[[2, 0]])
        rows = list(arr)
        assert len(rows) == 3
        for got_row, want_row in zip(rows, loaded, strict=True):
            _same_rows(got_row, want_row)


def test_zero_d(tmp_path):
    path = tmp_path / "d.npy"
    loaded = write_case(case("zero_d_dict"), path)
    with npystream.open(path) as arr:
        assert arr.shape == () and arr.size == 1 and arr.ndim == 0
        assert_same_element(arr[()], loaded[()])
        _same_rows(arr[...], loaded[...])  # numpy: a 0-d object array, not the element
        with pytest.raises(IndexError, match="0-dimensional"):
            arr[0]
        with pytest.raises(TypeError, match="0-d"):
            iter(arr)
        assert_same_elements(arr.flat, [loaded[()]])
        assert_same_element(arr.tolist(), loaded[()])


def test_empty(tmp_path):
    path = tmp_path / "e.npy"
    write_case(case("empty_2d"), path)
    with npystream.open(path) as arr:
        assert arr.shape == (0, 3) and len(arr) == 0
        assert list(arr) == []
        got = arr[:]
        assert type(got) is np.ndarray and got.dtype == object and got.shape == (0, 3)
        with pytest.raises(IndexError):
            arr[0]
        arr.build_index()
        assert arr.index_built


# ---------------------------------------------------------------------------
# zero-copy


def test_zero_copy_views_read_only_and_correct(tmp_path):
    rng = np.random.default_rng(0)
    items = [rng.standard_normal(n).astype(dt) for n, dt in [(10, "<f4"), (100_000, "<f8"), (7, ">i4"), (0, "<f4")]]
    items += [np.asfortranarray(rng.standard_normal((30, 20))), "not an array", obj_array([np.arange(3)])]
    arr_in = obj_array(items)
    path = tmp_path / "z.npy"
    np.save(path, arr_in)
    loaded = np.load(path, allow_pickle=True)
    # numpy unpickles the big-endian element into native order: a copy, not a view
    assert loaded[2].dtype.isnative
    with npystream.open(path, zero_copy="always") as arr:  # views whatever their alignment
        assert arr.zero_copy == "always"
        assert_same_element(arr[2], loaded[2])
        for i in (1, 0, 4):
            view = arr[i]
            assert_same_element(view, items[i])
            assert not view.flags.writeable and not view.flags.owndata
            with pytest.raises(ValueError):
                view[...] = 0
            # a writable copy is one call away and independent
            copy = np.array(view)
            assert copy.flags.writeable
            copy[...] = 0
            assert_same_element(arr[i], items[i])
        kept = arr[1]
    # views outlive the ObjectArray (they keep the mapping alive)
    assert_same_element(kept, items[1])
    with npystream.open(path, zero_copy=False) as arr:
        assert not arr.zero_copy
        for i in (0, 1, 2, 4):
            got = arr[i]
            assert_same_element(got, loaded[i])
            assert got.flags.writeable
        # iteration yields copies, like np.load
        for got, exp in zip(arr, loaded):
            assert_same_element(got, exp)
            if _is_plain_array(got):
                assert got.flags.writeable


def test_zero_copy_refused_on_streams_and_memory(tmp_path):
    data = case_bytes(case("float32_arrays"))
    with pytest.raises(NotSeekableError, match="zero_copy"):
        ObjectArray(io.BytesIO(data), zero_copy=True)
    with ObjectArray(io.BytesIO(data)) as arr:
        assert not arr.zero_copy and arr.seekable
        assert arr[3].flags.writeable


# ---------------------------------------------------------------------------
# sources


def test_file_object_and_bytes_sources(tmp_path):
    path = tmp_path / "f.npy"
    loaded = write_case(case("many_2500"), path)
    expected = expected_elements(loaded)
    with open(path, "rb") as f:
        with ObjectArray(f) as arr:
            assert arr.zero_copy  # a real file object can be mapped
            assert_same_element(arr[2499], expected[2499])
            assert_same_elements(arr, expected)
            assert_same_element(arr[-2], expected[-2])
        assert not f.closed  # the caller's file stays open
        f.seek(0)
        assert f.read(6) == b"\x93NUMPY"
    with ObjectArray(path.read_bytes()) as arr:
        assert_same_element(arr[1234], expected[1234])
        assert_same_elements(arr[10:20], expected[10:20])


def test_iterations_and_indexing_interleave(tmp_path):
    path = tmp_path / "i.npy"
    loaded = write_case(case("many_2500"), path)
    expected = expected_elements(loaded)
    with npystream.open(path) as arr:
        it1, it2 = iter(arr), iter(arr)
        for k in range(1500):
            assert_same_element(next(it1), expected[k])
            if k % 3 == 0:
                assert_same_element(next(it2), expected[k // 3])
            if k % 100 == 0:
                assert_same_element(arr[-k - 1], expected[-k - 1])


def _gzip_file(tmp_path, name="many_2500"):
    data = case_bytes(case(name))
    path = tmp_path / "g.npy.gz"
    with gzip.open(path, "wb") as f:
        f.write(data)
    return path, data


def test_gzip_streams_only(tmp_path):
    path, data = _gzip_file(tmp_path)
    expected = expected_elements(np.load(io.BytesIO(data), allow_pickle=True))
    arr = npystream.open(path)
    try:
        assert isinstance(arr, ObjectArray)
        assert arr.shape == (2500,) and len(arr) == 2500 and not arr.seekable and not arr.zero_copy
        assert "stream only" in repr(arr)
        for key in (0, -1, slice(0, 3), [1, 2]):
            with pytest.raises(NotSeekableError, match=r"read forward.*iterate"):
                arr[key]
        with pytest.raises(NotSeekableError, match="index"):
            arr.build_index()
        assert_same_elements(arr, expected)
        with pytest.raises(NotSeekableError, match="only once"):
            iter(arr)
    finally:
        arr.close()
    with pytest.raises(NotSeekableError):
        npystream.open(path, zero_copy=True)


def test_pipe_streams_only(tmp_path):
    data = case_bytes(case("large_payloads"))
    expected = expected_elements(np.load(io.BytesIO(data), allow_pickle=True))
    rfd, wfd = os.pipe()

    def feed():
        with os.fdopen(wfd, "wb") as w:
            w.write(data)

    t = threading.Thread(target=feed)
    t.start()
    try:
        with os.fdopen(rfd, "rb") as r, ObjectArray(r) as arr:
            assert not arr.seekable
            with pytest.raises(NotSeekableError):
                arr[0]
            assert_same_elements(arr, expected)
    finally:
        t.join()


# ---------------------------------------------------------------------------
# the saved index


def test_nsidx_saved_reused_and_invalidated(tmp_path):
    path = tmp_path / "n.npy"
    loaded = write_case(case("many_2500"), path)
    expected = expected_elements(loaded)
    ipath = index_path_for(path)
    with npystream.open(path) as arr:
        assert not arr.index_built and not os.path.exists(ipath)
        assert_same_element(arr[5], expected[5])  # builds lazily, saves
        assert arr.index_built and os.path.exists(ipath)
        assert arr.index_path == ipath
    with np.load(ipath, allow_pickle=False) as z:  # a plain .npz, no pickles
        assert "nsidx_meta" in z.files and any(f.startswith("i_") for f in z.files)
    with npystream.open(path) as arr:
        arr.build_index()
        assert "loaded" in repr(arr)
        assert_same_element(arr[2000], expected[2000])
    # same path, different content (different size): the old index is ignored
    other = obj_array([f"other-{i}" for i in range(3000)])
    np.save(path, other)
    with npystream.open(path) as arr:
        arr.build_index()
        assert "loaded" not in repr(arr)
        assert arr[2999] == "other-2999"
    # same size, new mtime: rebuilt too
    np.save(path, obj_array([f"OTHER-{i}" for i in range(3000)]))
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with npystream.open(path) as arr:
        arr.build_index()
        assert "loaded" not in repr(arr)
        assert arr[2999] == "OTHER-2999"
    # and the fresh index is reused
    with npystream.open(path) as arr:
        arr.build_index()
        assert "loaded" in repr(arr)


def test_nsidx_same_size_and_mtime_but_different_header_is_rebuilt(tmp_path):
    path = tmp_path / "h.npy"
    np.save(path, obj_array(["ab", "cd"]))
    with npystream.open(path) as arr:
        arr.build_index()
    st = os.stat(path)
    data = bytearray(path.read_bytes())
    # the same pickle under an equivalent header whose bytes differ (same length)
    end = data.index(b"\n") + 1
    assert b"(2,), }" in data[:end]
    data[:end] = data[:end].replace(b"(2,), }", b"(2,)}  ")
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with npystream.open(path) as arr:
        arr.build_index()
        assert "loaded" not in repr(arr)
        assert arr[1] == "cd"


@pytest.mark.parametrize("garbage", [b"", b"not a zip", b"PK\x03\x04" + b"\x00" * 50], ids=["empty", "text", "badzip"])
def test_nsidx_garbage_is_ignored(tmp_path, garbage):
    path = tmp_path / "g.npy"
    loaded = write_case(case("exactly_1001"), path)
    with open(index_path_for(path), "wb") as f:
        f.write(garbage)
    with npystream.open(path) as arr:
        assert_same_element(arr[1000], expected_elements(loaded)[1000])
        assert "loaded" not in repr(arr)
    with npystream.open(path) as arr:
        arr.build_index()
        assert "loaded" in repr(arr)  # replaced by a good one


def test_nsidx_forged_offsets_do_not_give_garbage(tmp_path):
    """An index whose metadata matches but whose offsets were tampered with: an error or the right answer."""
    path = tmp_path / "t.npy"
    loaded = write_case(case("many_2500"), path)
    expected = expected_elements(loaded)
    with npystream.open(path) as arr:
        arr.build_index()
    ipath = index_path_for(path)
    with np.load(ipath) as z:
        arrays = {k: z[k] for k in z.files}
    starts = arrays["i_starts"].copy()
    starts[10:20] += 1  # shifted element starts
    arrays["i_starts"] = starts
    np.savez(ipath, **arrays)
    with npystream.open(path) as arr:
        for i in range(5, 25):
            try:
                got = arr[i]
            except (FormatError, npystream.UnsafePickleError):
                continue
            assert_same_element(got, expected[i])


def test_nsidx_read_only_directory(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "r.npy"
    loaded = write_case(case("exactly_1000"), path)
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(folder, os.W_OK):  # running as root: simulate the refusal instead
            from npystream import _atomic

            def refuse(*a, **k):
                raise PermissionError(13, "Permission denied")

            monkeypatch.setattr(_atomic, "temp_name", refuse)
        with npystream.open(path) as arr:
            assert_same_element(arr[999], expected_elements(loaded)[999])
            assert "in memory" in repr(arr)
        assert sorted(os.listdir(folder)) == ["r.npy"]
    finally:
        folder.chmod(stat.S_IRWXU)


def test_nsidx_write_failure_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "w.npy"
    loaded = write_case(case("exactly_1000"), path)

    def broken_savez(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", broken_savez)
    with npystream.open(path) as arr:
        assert_same_element(arr[3], expected_elements(loaded)[3])
    assert sorted(os.listdir(tmp_path)) == ["w.npy"]


def test_nsidx_disabled(tmp_path):
    path = tmp_path / "x.npy"
    write_case(case("exactly_1000"), path)
    with npystream.open(path, nsidx=False) as arr:
        arr.build_index()
        assert arr.index_path is None
    assert not os.path.exists(index_path_for(path))
    with npystream.open(path) as arr:
        arr.build_index(save=False)
    assert not os.path.exists(index_path_for(path))
    with npystream.open(path) as arr:
        arr.build_index(save=True)
    assert os.path.exists(index_path_for(path))


# ---------------------------------------------------------------------------
# lifetime, repr, safety options


def test_close_and_repr(tmp_path):
    path = tmp_path / "c.npy"
    write_case(case("exactly_1001"), path)
    arr = npystream.open(path)
    first = arr[0]
    text = repr(arr)
    assert "c.npy" in text and "(1001,)" in text and "object" in text and "random access" in text
    arr.close()
    arr.close()  # idempotent
    assert "closed" in repr(arr)
    assert first == 0
    with pytest.raises(ValueError, match="closed"):
        arr[0]
    with pytest.raises(ValueError, match="closed"):
        iter(arr)


def test_safety_options_reach_the_engine(tmp_path):
    from hostile_pickles import envelope, glob, integer, npy_file

    path = tmp_path / "od.npy"
    path.write_bytes(npy_file(envelope([integer(1), glob("collections", "OrderedDict") + b")R"]), (2,)))
    with npystream.open(path) as arr:
        # the index scan checks every global of the file: no element is served from it
        with pytest.raises(npystream.UnsafePickleError, match="OrderedDict"):
            arr[0]
    with npystream.open(path) as arr:
        got = []
        with pytest.raises(npystream.UnsafePickleError, match="OrderedDict"):
            for x in arr:
                got.append(x)
        assert got == [1]
    with npystream.open(path, allowed_globals=[("collections", "OrderedDict")]) as arr:
        assert type(arr[1]).__name__ == "OrderedDict"
    with npystream.open(path, trusted=True) as arr:
        assert list(arr)[1] == {}
    with pytest.raises(TypeError):
        npystream.open(path, trusted="yes")


def test_array_protocol_materialises_like_np_load(tmp_path):
    for name in ("nd_fortran", "structured_object_fields", "zero_d_dict"):
        path = tmp_path / f"{name}.npy"
        loaded = write_case(case(name), path)
        with npystream.open(path) as arr:
            got = np.asarray(arr)
        assert_same_element(got, loaded)


# ---------------------------------------------------------------------------
# .npz object members


def _npz(tmp_path, compressed: bool):
    objs = [x for i in range(300) for x in (np.arange(i % 7, dtype="<f8"), f"s{i}", {"k": [i]}, None)]
    items = {"obj": obj_array(objs), "num": np.arange(4)}
    path = tmp_path / ("c.npz" if compressed else "s.npz")
    (np.savez_compressed if compressed else np.savez)(path, **items)
    return path, items


def test_npz_stored_object_member_random_access(tmp_path):
    path, items = _npz(tmp_path, compressed=False)
    expected = list(items["obj"].flat)
    with npystream.open(path) as z:
        member = z["obj"]
        assert isinstance(member, ObjectArray) and member.seekable
        assert_same_element(member[1199], expected[1199])
        assert_same_element(member[0], expected[0])
        x = member[8]  # zero-copy into the .npz when aligned, else an aligned copy
        assert x.size == 2 and x.flags.aligned and (x.flags.writeable or not x.flags.owndata)
        assert_same_elements(member, expected)
        assert_same_element(np.asarray(z["num"]), np.arange(4))
        member.close()
    assert sorted(os.listdir(tmp_path)) == ["s.npz"]  # no index files beside archives


def test_npz_deflated_object_member_streams(tmp_path):
    path, items = _npz(tmp_path, compressed=True)
    expected = list(items["obj"].flat)
    with npystream.open(path) as z:
        with zipfile.ZipFile(path) as raw:
            assert raw.getinfo("obj.npy").compress_type == zipfile.ZIP_DEFLATED
        member = z["obj"]
        assert isinstance(member, ObjectArray) and not member.seekable
        with pytest.raises(NotSeekableError):
            member[0]
        assert_same_elements(member, expected)
        member.close()


def test_nsidx_not_written_when_the_file_changes_during_the_scan(tmp_path, monkeypatch):
    from npystream.formats import pickle_walk

    path = tmp_path / "m.npy"
    loaded = write_case(case("exactly_1000"), path)
    real_scan = pickle_walk.scan_index

    def scan_then_touch(*args, **kwargs):
        index = real_scan(*args, **kwargs)
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
        return index

    monkeypatch.setattr(pickle_walk, "scan_index", scan_then_touch)
    with npystream.open(path) as arr:
        assert_same_element(arr[999], expected_elements(loaded)[999])
        assert arr.index_state == "unsaved"
    assert not os.path.exists(index_path_for(path))


# ---------------------------------------------------------------------------
# property test: random contents, shapes and orders


def _elements():
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp

    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=True)
        | st.complex_numbers()
        | st.text(max_size=20)
        | st.binary(max_size=20)
    )
    arrays = hnp.arrays(
        dtype=st.sampled_from(["<f4", "<f8", "<i8", "|u1", "|b1", "<c16", "<M8[s]", "|S3", "<U2"]),
        shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
    )
    return st.recursive(
        scalars | arrays,
        lambda inner: st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=5) | st.integers(), inner, max_size=3),
        max_leaves=8,
    )


def test_random_contents_match_np_load(tmp_path_factory):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    folder = tmp_path_factory.mktemp("prop")

    @settings(max_examples=int(os.environ.get("NPYSTREAM_PROP_EXAMPLES", "40")), deadline=None)
    @given(
        items=st.lists(_elements(), min_size=0, max_size=30),
        ndim=st.sampled_from([1, 2]),
        order=st.sampled_from(["C", "F"]),
        protocol=st.sampled_from([None, 2, 3, 4, 5]),
        data=st.data(),
    )
    def check(items, ndim, order, protocol, data):
        arr_in = obj_array(items)
        if ndim == 2 and len(items) % 2 == 0 and items:
            arr_in = obj_array(items, shape=(2, len(items) // 2), order=order)
        path = folder / "p.npy"
        if protocol is None:
            np.save(path, arr_in)
        else:
            import pickle

            from objcases import npy_preamble

            path.write_bytes(npy_preamble(arr_in) + pickle.dumps(arr_in, protocol=protocol))
        loaded = np.load(path, allow_pickle=True)
        expected = expected_elements(loaded)
        with npystream.open(path, nsidx=False) as arr:
            assert arr.shape == loaded.shape
            assert_same_elements(arr.flat, expected)
            if expected:
                picks = data.draw(st.lists(st.integers(0, len(expected) - 1), max_size=10))
                for i in picks:
                    idx = np.unravel_index(i, loaded.shape)
                    assert_same_element(arr[tuple(int(k) for k in idx)], expected[i])
                assert_same_elements(arr.get(picks), [expected[i] for i in picks])

    check()


@pytest.mark.parametrize("zero_copy", [True, False])
def test_threads_share_one_object_array(tmp_path, zero_copy):
    """Several threads indexing one ObjectArray get the right elements (access is serialised)."""
    import sys
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "t.npy"
    loaded = write_case(case("many_2500"), path)
    expected = expected_elements(loaded)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        with npystream.open(path, zero_copy=zero_copy) as arr:

            def work(seed):
                rng = random.Random(seed)
                out = []
                for _ in range(300):
                    i = rng.randrange(len(expected))
                    out.append((i, arr[i]))
                    if rng.random() < 0.1:
                        a = rng.randrange(len(expected) - 5)
                        out.extend(zip(range(a, a + 5), arr[a : a + 5]))
                return out

            with ThreadPoolExecutor(4) as pool:
                results = list(pool.map(work, range(8)))
    finally:
        sys.setswitchinterval(old)
    for chunk in results:
        for i, got in chunk:
            assert_same_element(got, expected[i])


def test_forked_child_reads_correctly(tmp_path):
    """A DataLoader-style fork after the parent used the array: the child's reads are right."""
    import multiprocessing as mp

    path = tmp_path / "f.npy"
    loaded = write_case(case("many_2500"), path)
    expected = expected_elements(loaded)
    arr = npystream.open(path, zero_copy=False)
    assert_same_element(arr[10], expected[10])
    ctx = mp.get_context("fork")
    picks = list(range(0, 2500, 7))
    q = ctx.Queue()

    def child():
        try:
            q.put([repr(arr[i]) for i in picks])
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            q.put(exc)

    procs = [ctx.Process(target=child) for _ in range(2)]
    for p in procs:
        p.start()
    mine = [repr(arr[i]) for i in reversed(picks)]
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    arr.close()
    want = [repr(expected[i]) for i in picks]
    assert mine == want[::-1]
    for res in results:
        assert res == want


def test_pickles_as_reopen_for_spawned_workers(tmp_path):
    import pickle

    path = tmp_path / "p.npy"
    loaded = write_case(case("many_2500"), path)
    expected = expected_elements(loaded)
    with npystream.open(path, zero_copy=False, nsidx=False, allowed_globals=["collections.OrderedDict"]) as arr:
        arr[3]
        clone = pickle.loads(pickle.dumps(arr))
    with clone:
        assert isinstance(clone, ObjectArray) and clone.shape == (2500,)
        assert not clone.zero_copy and clone.index_path is None
        assert_same_element(clone[2499], expected[2499])
        assert_same_elements(clone, expected)
    with pytest.raises(TypeError, match="path"):
        pickle.dumps(ObjectArray(path.read_bytes()))
    closed = npystream.open(path)
    closed.close()
    with pytest.raises(TypeError, match="closed"):
        pickle.dumps(closed)


def test_spawned_worker_reads(tmp_path):
    import multiprocessing as mp

    path = tmp_path / "s.npy"
    loaded = write_case(case("exactly_1001"), path)
    expected = expected_elements(loaded)
    with npystream.open(path) as arr, mp.get_context("spawn").Pool(1) as pool:
        got = pool.map(_worker_read, [(arr, i) for i in (0, 500, 1000)])
    assert got == [repr(expected[i]) for i in (0, 500, 1000)]


def test_stream_with_back_references_across_batches(tmp_path):
    """Objects repeated across APPENDS batches (memo GETs far back), read from gzip (stream only)."""
    shared = [np.arange(5.0), "s", {"k": [1]}, None]
    data = case_bytes(case("memo_backrefs"))
    arr_in = obj_array(shared * 700)
    buf = io.BytesIO()
    np.save(buf, arr_in)
    for name, payload in (("a.npy.gz", buf.getvalue()), ("b.npy.gz", data)):
        path = tmp_path / name
        path.write_bytes(gzip.compress(payload))
        expected = expected_elements(np.load(io.BytesIO(payload), allow_pickle=True))
        with npystream.open(path) as arr:
            assert not arr.seekable
            assert_same_elements(arr, expected)


@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "deflated"])
def test_corpus_in_npz_members(tmp_path, compressed):
    """Every np.save-written corpus case as an .npz member: streamed (both) and indexed (stored)."""
    names = [n for n in CASE_NAMES if case(n).protocol is None]
    arrays = {n: case(n).make() for n in names}
    path = tmp_path / "corpus.npz"
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    with np.load(path, allow_pickle=True) as ref, npystream.open(path) as z:
        for n in names:
            expected = expected_elements(ref[n])
            member = z[n]
            try:
                assert isinstance(member, ObjectArray) and member.shape == ref[n].shape
                assert member.seekable is not compressed
                assert_same_elements(member.flat, expected)
                if not compressed and expected:
                    for i in (len(expected) - 1, 0, len(expected) // 2):
                        idx = np.unravel_index(i, ref[n].shape) if ref[n].ndim else ()
                        assert_same_element(member[tuple(int(k) for k in idx)], expected[i])
            except AssertionError as exc:
                raise AssertionError(f"member {n}: {exc}") from None
            finally:
                member.close()


def test_forged_nsidx_pointing_into_a_payload_runs_nothing(tmp_path):
    """A .nsidx whose element start points at pickle opcodes hidden in a bytes payload: refused, nothing runs."""
    marker = tmp_path / "PWNED"
    hidden = b"cos\nsystem\n" + b"X" + len(f"touch {marker}").to_bytes(4, "little") + f"touch {marker}".encode() + b"\x85R."
    path = tmp_path / "h.npy"
    np.save(path, obj_array([b"\x00" * 8 + hidden + b"\x00" * 8, "second", "third"]))
    with npystream.open(path) as arr:
        arr.build_index()
        assert arr.index_state == "saved"
    data = path.read_bytes()
    at = data.index(hidden)
    ipath = index_path_for(path)
    with np.load(ipath) as z:
        arrays = {k: z[k] for k in z.files}
    starts = arrays["i_starts"].copy()
    assert starts[0] < at < starts[1]
    starts[1] = at
    arrays["i_starts"] = starts
    np.savez(ipath, **arrays)
    for zero_copy in (True, False):
        with npystream.open(path, zero_copy=zero_copy) as arr:
            arr.build_index()
            assert arr.index_state == "loaded"  # the forged index is used, not rebuilt
            try:  # a refusal or the right answer; never the hidden call, never garbage
                assert arr[1] == "second"
            except (npystream.UnsafePickleError, FormatError):
                pass
            assert not marker.exists()
            assert arr[2] == "third"
    assert not marker.exists()


def test_iter_range_streams_a_shard(tmp_path):
    path = tmp_path / "r.npy"
    loaded = write_case(case("many_2500"), path)
    expected = expected_elements(loaded)
    with npystream.open(path, zero_copy="always") as arr:
        for lo, hi in [(0, 10), (990, 1010), (2400, None), (-5, None), (7, 7), (10, 3), (0, None)]:
            got = list(arr.iter_range(lo, hi))
            assert_same_elements(got, expected[lo:hi])
        views = [x for x in arr.iter_range(0, 50) if _is_plain_array(x) and x.size]
        assert views and all(not v.flags.writeable for v in views)
        it1, it2 = arr.iter_range(100, 200), arr.iter_range(1000, 1100)
        for k in range(100):  # two shards interleaved, and indexing in between
            assert_same_element(next(it1), expected[100 + k])
            assert_same_element(next(it2), expected[1000 + k])
            if k % 25 == 0:
                assert_same_element(arr[k], expected[k])
        with pytest.raises(TypeError):
            arr.iter_range(1.5)
    with npystream.open(path, zero_copy=False) as arr:
        assert all(x.flags.writeable for x in arr.iter_range(0, 50) if _is_plain_array(x))
    gz, _ = _gzip_file(tmp_path)
    with npystream.open(gz) as arr, pytest.raises(NotSeekableError, match="iter_range"):
        arr.iter_range(0, 10)


def test_index_saved_in_trusted_mode_does_not_trust_later_opens(tmp_path):
    """The .nsidx holds positions, not a verdict: a safe open still refuses what the policy refuses."""
    from hostile_pickles import envelope, glob, integer, npy_file

    path = tmp_path / "t.npy"
    path.write_bytes(npy_file(envelope([integer(1), glob("collections", "OrderedDict") + b")R", integer(3)]), (3,)))
    with npystream.open(path, trusted=True) as arr:
        assert type(arr[1]).__name__ == "OrderedDict"
        assert arr.index_state == "saved"
    with npystream.open(path) as arr:
        arr.build_index()
        assert arr.index_state == "loaded"
        with pytest.raises(npystream.UnsafePickleError, match="OrderedDict"):
            arr[1]


def test_nsidx_with_a_huge_declared_member_is_ignored_without_allocating(tmp_path):
    """A forged .nsidx member header claiming 10**11 int64s: ignored (rebuilt), nothing allocated."""
    import tracemalloc

    path = tmp_path / "b.npy"
    loaded = write_case(case("exactly_1001"), path)
    with npystream.open(path) as arr:
        arr.build_index()
    ipath = index_path_for(path)
    with np.load(ipath) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez(ipath, **arrays)
    with zipfile.ZipFile(ipath) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    raw = members["i_starts.npy"]
    end = raw.index(b"\n") + 1
    text = raw[:end].decode("latin1")
    forged = text.replace(f"({len(arrays['i_starts'])},)", "(100000000000,)")
    extra = len(forged) - len(text)
    assert forged[-1 - extra : -1] == " " * extra
    forged = forged[: -1 - extra] + "\n"
    assert len(forged) == end and forged != text
    members["i_starts.npy"] = forged.encode("latin1") + raw[end:]
    with zipfile.ZipFile(ipath, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    tracemalloc.start()
    try:
        with npystream.open(path) as arr:
            assert_same_element(arr[1000], expected_elements(loaded)[1000])
            assert arr.index_state == "saved"  # rebuilt, not loaded
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 << 20


def test_file_mapping_locates_zero_copy_views(tmp_path):
    """ObjectArray.file_mapping(): where zero-copy views live in the file (RaggedWriter.append_from_file's input)."""
    rng = np.random.default_rng(9)
    items = [rng.standard_normal(int(k), dtype=np.float32) for k in rng.integers(0, 30_000, 12)]
    items[3] = items[3][:0]
    src = tmp_path / "a.npy"
    arr = np.empty(len(items), object)
    for i, x in enumerate(items):
        arr[i] = x
    np.save(src, arr, allow_pickle=True)
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
