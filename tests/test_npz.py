"""Lazy .npz archives: stored members are memmaps into the zip, deflated ones stream; ZIP64."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import npystream
from npystream import NpzArchive
from npystream.errors import (
    FormatError,
    NotSeekableError,
    NpyStreamError,
    StoreNotFoundError,
    TruncatedError,
    UnsupportedError,
)
from npystream.formats.npy import read_header
from npystream.sources import StreamSource, WindowSource

ARRAYS = {
    "f": np.arange(12, dtype="<f4").reshape(3, 4),
    "big_endian": np.arange(5, dtype=">i8"),
    "fortran": np.asfortranarray(np.arange(6, dtype="<f8").reshape(2, 3)),
    "scalar": np.array(2.5),
    "empty": np.zeros((0, 3), dtype="<u2"),
    "rec": np.zeros(4, dtype=[("a", "<i4"), ("b", "S3"), ("c", "<f8", (2,))]),
    "text": np.array(["ab", "\u512a"], dtype="<U2"),
}


def assert_same(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert got.flags.f_contiguous == ref.flags.f_contiguous
    assert got.tobytes(order="A") == ref.tobytes(order="A")


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


@pytest.fixture
def stored(tmp_path):
    path = tmp_path / "s.npz"
    np.savez(path, np.arange(3), **ARRAYS)
    return path


@pytest.fixture
def deflated(tmp_path):
    path = tmp_path / "c.npz"
    np.savez_compressed(path, np.arange(3), **ARRAYS)
    return path


def test_stored_members_are_memmaps_in_the_zip(stored):
    ref = np.load(stored)
    with npystream.open(stored) as archive:
        assert isinstance(archive, NpzArchive)
        assert list(archive) == ref.files == archive.files
        assert len(archive) == len(ref.files)
        for name in ref.files:
            got = archive[name]
            assert isinstance(got, np.memmap), name
            assert not got.flags.writeable
            assert got.filename == str(stored)  # mapped from the archive itself: nothing extracted
            assert_same(got, ref[name])
            info = archive.member_info(name)
            assert info.can_memmap and info.compression == "stored"
            assert got.offset == info.data_offset
            raw = stored.read_bytes()
            assert raw[info.data_offset : info.data_offset + got.nbytes] == ref[name].tobytes(order="A")
    ref.close()


def test_member_names_follow_numpy(stored):
    with NpzArchive(stored) as archive:
        assert "arr_0" in archive and "arr_0.npy" in archive
        assert "nope" not in archive and 3 not in archive
        assert_same(archive["arr_0.npy"], np.arange(3))
        with pytest.raises(KeyError, match="'nope' is not a member.*'arr_0'"):
            archive["nope"]


def test_deflated_members_error_names_both_ways_out(deflated):
    ref = np.load(deflated)
    with NpzArchive(deflated) as archive:
        for name in ref.files:
            with pytest.raises(NotSeekableError) as info:
                archive[name]
            msg = str(info.value)
            assert f"archive.load({name!r})" in msg
            assert f"archive.iter_batches({name!r}, batch_size)" in msg
            assert not archive.member_info(name).can_memmap
            loaded = archive.load(name)
            assert not isinstance(loaded, np.memmap)
            assert_same(loaded, ref[name])
            if ref[name].ndim == 0:
                continue
            axis = -1 if ref[name].flags.f_contiguous and not ref[name].flags.c_contiguous else 0
            blocks = list(archive.iter_batches(name, 2, axis=axis))
            if blocks:
                joined = np.concatenate(blocks, axis=axis).astype(ref[name].dtype)
                assert np.array_equal(joined, ref[name])
    ref.close()


def test_iter_batches_stored_gives_views(stored):
    with NpzArchive(stored) as archive:
        blocks = list(archive.iter_batches("f", 2))
    assert [b.shape for b in blocks] == [(2, 4), (1, 4)]
    assert all(isinstance(b, np.memmap) for b in blocks)
    assert_same(np.concatenate(blocks), ARRAYS["f"])


def test_deflated_streaming_memory_is_bounded(tmp_path):
    import tracemalloc

    path = tmp_path / "z.npz"
    np.savez_compressed(path, z=np.zeros((4 << 20,), dtype="<f8"))  # 32 MiB of zeros, tiny zip
    with NpzArchive(path) as archive:
        tracemalloc.start()
        try:
            total = sum(b.size for b in archive.iter_batches("z", batch_bytes=1 << 20))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert total == 4 << 20
    # the block being filled + the caller's previous block (alive during the read) + zlib
    # temporaries of one 256 KiB read: about 2.7 MiB, whatever the member size (here 32 MiB)
    assert peak < 3 << 20, peak


def test_object_members_become_object_arrays(tmp_path):
    from npystream.object_array import ObjectArray

    objs = np.array([1, "two", None, {"k": [1, 2]}], dtype=object)
    for saver, seekable in ((np.savez, True), (np.savez_compressed, False)):
        path = tmp_path / f"{saver.__name__}.npz"
        saver(path, o=objs, x=np.arange(2))
        with NpzArchive(path) as archive:
            info = archive.member_info("o")
            assert info.header is not None and info.header.pickled and not info.can_memmap
            member = archive["o"]
            assert isinstance(member, ObjectArray) and member.seekable == seekable
            assert list(member) == list(objs)
            member.close()
            loaded = archive.load("o")
            assert loaded.dtype == object and list(loaded) == list(objs)
            with pytest.raises(UnsupportedError, match="iter_objects"):
                archive.iter_batches("o", 1)
            assert_same(archive.load("x"), np.arange(2))  # other members unaffected


def test_object_member_options_are_checked_and_passed_on(tmp_path):
    path = tmp_path / "o.npz"
    np.savez(path, o=np.array([np.float64(1.5), None], dtype=object))
    with pytest.raises(TypeError, match="unexpected options"):
        NpzArchive(path, bogus=1)
    with npystream.open(path, trusted=True, zero_copy=False) as archive:
        member = archive["o"]
        assert member.zero_copy is False
        member.close()


def test_object_members_without_the_object_reader(tmp_path):
    """The format-level archive does not unpickle: a clear error pointing at npystream.NpzArchive."""
    from npystream.formats import npz

    path = tmp_path / "o.npz"
    np.savez(path, o=np.array([1, "a"], dtype=object), f=np.arange(3))
    with npz.NpzArchive(path) as archive:
        assert archive["f"].tolist() == [0, 1, 2]
        for call in (lambda a: a["o"], lambda a: a.load("o")):
            with pytest.raises(UnsupportedError, match=r"npystream.NpzArchive\(path\)"):
                call(archive)
    assert issubclass(NpzArchive, npz.NpzArchive)


def test_member_source_hook(stored, deflated):
    """What the object-array reader builds on: a byte source over each member's .npy bytes."""
    with NpzArchive(stored) as archive, archive.member_source("rec") as src:
        assert isinstance(src, WindowSource) and src.seekable and src.mappable
        assert src.size == len(_npy_bytes(ARRAYS["rec"]))
        assert bytes(src.map()) == _npy_bytes(ARRAYS["rec"])
        h = read_header(src)
        assert h.shape == (4,)
    with NpzArchive(deflated) as archive, archive.member_source("rec") as src:
        assert isinstance(src, StreamSource) and not src.seekable
        assert src.size == len(_npy_bytes(ARRAYS["rec"]))
        assert src.read(1 << 20) == _npy_bytes(ARRAYS["rec"])


def test_close_and_context_manager(stored):
    archive = NpzArchive(stored)
    kept = archive["f"]
    archive.close()
    archive.close()  # idempotent
    assert_same(kept, ARRAYS["f"])  # arrays outlive the archive
    with pytest.raises(ValueError, match="closed"):
        archive["f"]
    assert "closed" in repr(archive)


def test_reads_only_the_central_directory(tmp_path):
    """Garbage in one member's data does not stop opening, listing, or reading other members."""
    path = tmp_path / "g.npz"
    np.savez(path, good=np.arange(4), bad=np.arange(4))
    with NpzArchive(path) as archive:
        start = archive.member_info("bad").data_offset
    raw = bytearray(path.read_bytes())
    hdr = raw.index(b"\x93NUMPY", raw.index(b"bad.npy"))
    raw[hdr : hdr + 6] = b"JUNK!!"
    path.write_bytes(bytes(raw))
    with NpzArchive(path) as archive:
        assert list(archive) == ["good", "bad"]
        assert_same(archive["good"], np.arange(4))
        with pytest.raises(FormatError, match="magic"):
            archive["bad"]
    assert start > hdr


def test_non_npy_member(tmp_path):
    path = tmp_path / "m.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("notes.txt", b"hello")
        zf.writestr("a.npy", _npy_bytes(np.arange(3)))
    with NpzArchive(path) as archive:
        assert list(archive) == ["notes.txt", "a"]
        with pytest.raises(FormatError, match="not a .npy"):
            archive["notes.txt"]
        assert archive.member_info("notes.txt").error is not None


def test_bad_archives(tmp_path):
    with pytest.raises(StoreNotFoundError):
        NpzArchive(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError):
        NpzArchive(tmp_path / "missing.npz")
    path = tmp_path / "cut.npz"
    np.savez(path, a=np.arange(1000))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # the central directory is gone
    with pytest.raises(FormatError, match="not a valid .npz"):
        npystream.open(path)
    with NpzArchive(io.BytesIO(raw)) as z:  # file objects work too (see test_file_objects_like_np_load)
        np.testing.assert_array_equal(z["a"], np.arange(1000))
    with pytest.raises(TypeError, match="file object"):
        NpzArchive(object())
    with pytest.raises(ValueError, match="read-only"):
        npystream.open(tmp_path / "cut.npz", mode="r+")


def test_truncated_stored_member(tmp_path):
    """A central directory promising more member bytes than the file holds."""
    import struct

    path = tmp_path / "t.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.npy", _npy_bytes(np.arange(100, dtype="<i8")))
    raw = bytearray(path.read_bytes())
    for sig, size_at in ((b"PK\x03\x04", 18), (b"PK\x01\x02", 20)):  # local and central records
        pos = raw.index(sig) + size_at
        (csize,) = struct.unpack_from("<I", raw, pos)
        struct.pack_into("<II", raw, pos, csize + 400, csize + 400)
    path.write_bytes(bytes(raw))
    with NpzArchive(path) as archive, pytest.raises(TruncatedError, match="needs bytes up to"):
        archive["a"]


def test_directory_pointing_outside_the_file(tmp_path):
    path = tmp_path / "o.npz"
    np.savez(path, a=np.arange(100, dtype="<i8"))
    raw = path.read_bytes()
    cd = raw.index(b"PK\x01\x02")
    path.write_bytes(raw[: cd - 400] + raw[cd:])  # zipfile re-bases offsets: this one goes negative
    with NpzArchive(path) as archive, pytest.raises(FormatError, match="outside"):
        archive["a"]


def _write_zip64(path, arrays, *, limits: bool, monkeypatch=None, start: int = 0):
    """Write members the way np.savez does (force_zip64=True), optionally after a sparse hole."""
    if limits:
        # Make zipfile treat everything as over its 32/16-bit limits: it then writes ZIP64
        # sizes, offsets and end records for small members, exactly as for > 4 GiB ones.
        monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 16)
        monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 1)
    with open(path, "wb") as f:
        f.seek(start)
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, arr in arrays.items():
                with zf.open(name + ".npy", "w", force_zip64=True) as member:
                    member.write(_npy_bytes(arr))
    if limits:
        monkeypatch.undo()


def test_zip64_structures(tmp_path, monkeypatch):
    path = tmp_path / "z64.npz"
    _write_zip64(path, ARRAYS, limits=True, monkeypatch=monkeypatch)
    raw = path.read_bytes()
    assert b"PK\x06\x06" in raw and b"PK\x06\x07" in raw  # ZIP64 end record and locator
    assert b"\xff\xff\xff\xff" in raw[raw.index(b"PK\x01\x02") :]  # sizes/offsets in extras
    ref = np.load(path)
    with NpzArchive(path) as archive:
        for name in ARRAYS:
            got = archive[name]
            assert isinstance(got, np.memmap)
            assert_same(got, ref[name])
    ref.close()


def test_zip64_member_beyond_4gib(tmp_path):
    """A member whose local header sits past 4 GiB (a sparse hole before it): real 64-bit offsets."""
    path = tmp_path / "far.npz"
    start = (5 << 30) + 12345
    try:
        _write_zip64(path, {"a": ARRAYS["f"], "b": ARRAYS["rec"]}, limits=False, start=start)
    except OSError as exc:  # pragma: no cover - a filesystem without sparse files
        pytest.skip(f"cannot create a sparse 5 GiB file here: {exc}")
    try:
        with NpzArchive(path) as archive:
            info = archive.member_info("a")
            assert info.data_offset > 1 << 32
            got = archive["a"]
            assert isinstance(got, np.memmap) and got.offset == info.data_offset
            assert_same(got, ARRAYS["f"])
            assert_same(archive["b"], ARRAYS["rec"])
    finally:
        path.unlink()


@pytest.mark.slow
def test_zip64_more_than_65535_members(tmp_path):
    path = tmp_path / "many.npz"
    payload = _npy_bytes(np.arange(2, dtype="<u1"))
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(65540):
            zf.writestr(f"arr_{i}.npy", payload)
    with NpzArchive(path) as archive:
        assert len(archive) == 65540
        assert_same(archive["arr_65539"], np.arange(2, dtype="<u1"))


@settings(max_examples=30, deadline=None)
@given(
    arrays=st.dictionaries(
        st.text(alphabet="abcxyz_\u00e9", min_size=1, max_size=6),
        hnp.arrays(
            dtype=st.one_of(hnp.scalar_dtypes(), hnp.byte_string_dtypes(min_len=1),
                            hnp.unicode_string_dtypes(min_len=1)),
            shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
        ),
        min_size=1,
        max_size=4,
    ),
    compressed=st.booleans(),
)
def test_random_archives_match_np_load(tmp_path_factory, arrays, compressed):
    path = tmp_path_factory.mktemp("npz") / "r.npz"
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    with np.load(path) as ref, NpzArchive(path) as archive:
        assert list(archive) == ref.files
        for name in ref.files:
            expected = ref[name]
            got = archive.load(name) if compressed else archive[name]
            assert isinstance(got, np.memmap) != compressed
            assert_same(got, expected)


@pytest.mark.parametrize("compressed", [False, True])
def test_file_objects_like_np_load(tmp_path, compressed: bool) -> None:
    """npystream.open / NpzArchive on file objects: a real file maps its stored members; BytesIO reads them."""
    save = np.savez_compressed if compressed else np.savez
    arrays = {"a": np.arange(10, dtype=np.int32), "b": np.ones((3, 4)), "o": np.array([np.arange(3), "x"], dtype=object)}
    path = tmp_path / "f.npz"
    save(path, **arrays)
    data = path.read_bytes()
    with open(path, "rb") as f:
        with npystream.open(f) as z:
            assert isinstance(z, NpzArchive)
            assert sorted(z) == ["a", "b", "o"]
            for k in ("a", "b"):
                np.testing.assert_array_equal(z.load(k), arrays[k])
            if not compressed:
                assert isinstance(z["a"], np.memmap)
    bio = io.BytesIO(data)
    with npystream.open(bio) as z:
        assert isinstance(z, NpzArchive) and "BytesIO" in z.path
        for k in ("a", "b"):
            np.testing.assert_array_equal(z.load(k), arrays[k])
            if not compressed:
                got = z[k]
                np.testing.assert_array_equal(got, arrays[k])
                assert not got.flags.writeable
        objs = z["o"]
        try:
            got_o = list(objs)
        finally:
            objs.close()
        np.testing.assert_array_equal(got_o[0], arrays["o"][0])
        assert got_o[1] == "x"
    assert not bio.closed  # the caller's file object stays open
    with pytest.raises(TypeError, match="seekable binary file object"):
        NpzArchive(12345)


def test_bytesio_truncated_archive_is_a_clear_error() -> None:
    buf = io.BytesIO()
    np.savez(buf, a=np.arange(1000))
    cut = io.BytesIO(buf.getvalue()[:500])
    with pytest.raises(NpyStreamError):
        NpzArchive(cut)
