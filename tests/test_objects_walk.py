"""iter_objects / pickle_walk against np.load as the oracle: every corpus case, every source kind.

The corpus is ``tests/objcases.py`` (shared with the ObjectArray tests).  These
tests exercise the walker's own API: ``iter_elements`` (indexed, streamed,
start/stop), ``scan_index`` + ``ElementDecoder`` (random access, decode_many,
zero-copy), ``PickleIndex`` serialisation, ``SafetyPolicy`` validation, and the
parity of the C accelerator with the pure-Python loops.
"""

from __future__ import annotations

import gzip
import io
import os
import random
import subprocess
import sys

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
)
from short_reads import ShortReads

import npystream
from npystream import FormatError, NotSeekableError, UnsafePickleError, UnsupportedError
from npystream.formats import pickle_walk as pw
from npystream.formats.npy import read_header
from npystream.formats.pickle_walk import (
    ElementDecoder,
    PickleIndex,
    SafetyPolicy,
    iter_elements,
    scan_index,
)
from npystream.sources import MemorySource, StreamSource

SAFE = SafetyPolicy.make()


_Pipe = ShortReads


def _loaded(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=True, encoding="latin1")


@pytest.fixture(scope="module")
def corpus():
    out = {}
    for name in CASE_NAMES:
        data = case_bytes(case(name))
        out[name] = (data, expected_elements(_loaded(data)))
    return out


@pytest.mark.parametrize("name", CASE_NAMES)
def test_corpus_file_pipe_gzip(tmp_path, corpus, name):
    data, expected = corpus[name]
    path = tmp_path / "a.npy"
    path.write_bytes(data)
    assert_same_elements(npystream.iter_objects(path), expected)
    assert_same_elements(npystream.iter_objects(_Pipe(data)), expected)
    assert_same_elements(npystream.iter_objects(io.BytesIO(gzip.compress(data))), expected)
    assert_same_elements(npystream.iter_objects(data), expected)  # bytes -> MemorySource
    assert_same_elements(npystream.iter_objects(io.BytesIO(data)), expected)  # seekable, not mappable


@pytest.mark.parametrize("name", CASE_NAMES)
def test_corpus_random_access_and_ranges(corpus, name):
    data, expected = corpus[name]
    src = MemorySource(data, "mem.npy")
    header = read_header(src)
    index = scan_index(src, header, SAFE)
    assert index.count == len(expected)
    assert np.all(index.ends > index.starts)
    dec = ElementDecoder(src, header, SAFE, index)
    order = list(range(len(expected)))
    random.Random(name).shuffle(order)
    for i in order[:200]:
        assert_same_element(dec.decode(i), expected[i])
    if expected:
        picks = order[:50] + order[:3]
        for i, got in zip(picks, dec.decode_many(picks)):
            assert_same_element(got, expected[i])
        n = len(expected)
        a, b = n // 3, n // 3 + min(n, 40)
        assert_same_elements(dec.decode_many(range(a, min(b, n))), expected[a:b])
        # a fresh source over the same bytes, iteration from the middle
        other = MemorySource(data, "mem2.npy")
        read_header(other)
        assert_same_elements(iter_elements(other, header, SAFE, index=index, start=a, stop=b), expected[a:b])


def test_index_round_trip_and_validation(corpus):
    data, expected = corpus["many_2500"]
    src = MemorySource(data)
    header = read_header(src)
    index = scan_index(src, header, SAFE)
    again = PickleIndex.from_arrays(index.to_arrays(), header)
    for key, arr in index.to_arrays().items():
        np.testing.assert_array_equal(arr, again.to_arrays()[key], err_msg=key)
    nb = index.batch_ends.size
    assert index.nbytes == 16 * index.count + 8 + 16 * nb + 8 + 16 * index.live_memo.size
    assert int(index.batch_first[-1]) == index.count and nb == 3  # 1000 + 1000 + 500
    assert [index.end_of(i) for i in range(index.count)] == index.ends.tolist()
    bad = index.to_arrays()
    bad["starts"] = bad["starts"][::-1].copy()
    with pytest.raises(FormatError):
        PickleIndex.from_arrays(bad, header)
    bad = index.to_arrays()
    bad["meta"] = bad["meta"].copy()
    bad["meta"][0] = 99
    with pytest.raises(FormatError, match="rebuild"):
        PickleIndex.from_arrays(bad, header)
    with pytest.raises(FormatError):
        PickleIndex.from_arrays({"meta": bad["meta"]}, header)


def test_wrong_but_monotonic_index_is_a_clear_error(corpus):
    """A forged .nsidx (offsets shifted into payloads) must give FormatError, never a crash or garbage."""
    data, expected = corpus["float32_arrays"]
    src = MemorySource(data)
    header = read_header(src)
    index = scan_index(src, header, SAFE)
    arrays = index.to_arrays()
    for shift in (1, 3, 17):
        forged = dict(arrays)
        forged["starts"] = arrays["starts"] + shift
        forged["batch_ends"] = arrays["batch_ends"] + shift
        bad = PickleIndex.from_arrays(forged, header)
        dec = ElementDecoder(src, header, SAFE, bad)
        for i in (0, 1, len(expected) - 1):
            try:
                got = dec.decode(i)
            except (FormatError, UnsafePickleError):
                continue
            assert_same_element(got, expected[i])  # an accidental valid parse must still be right


def test_zero_copy_views(tmp_path, corpus):
    data, expected = corpus["float32_arrays"]
    path = tmp_path / "z.npy"
    path.write_bytes(data)
    got = list(npystream.iter_objects(path, zero_copy="always"))
    assert_same_elements(got, expected)
    for arr in got:
        assert isinstance(arr, np.ndarray)
        assert not arr.flags.writeable
        assert arr.base is not None  # a view of the mapped file
        with pytest.raises(ValueError):
            arr[...] = 0
    # non-native byte order: numpy returns a native copy; so do we
    big = obj_array([np.arange(6, dtype=">i4"), np.arange(3.0)])
    p2 = tmp_path / "big.npy"
    np.save(p2, big)
    out = list(npystream.iter_objects(p2, zero_copy=True))
    ref = np.load(p2, allow_pickle=True)
    assert_same_elements(out, list(ref.flat))
    assert out[0].dtype.isnative and out[0].flags.writeable
    assert not out[1].flags.writeable
    with pytest.raises(NotSeekableError):
        npystream.iter_objects(_Pipe(data), zero_copy=True)


def test_policy_validation():
    with pytest.raises(TypeError):
        SafetyPolicy.make(trusted="yes")
    with pytest.raises(ValueError, match="codec"):
        SafetyPolicy.make(encoding="no-such-codec")
    with pytest.raises(TypeError):
        SafetyPolicy.make(allowed_globals="collections.OrderedDict")
    with pytest.raises(ValueError):
        SafetyPolicy.make(allowed_globals=["nodot"])
    p = SafetyPolicy.make(allowed_globals=["collections.OrderedDict", ("a.b", "C.D")], encoding="bytes")
    assert p.allowed_globals == frozenset({"collections:OrderedDict", "a.b:C.D"})
    with pytest.raises(TypeError):  # eagerly, at call time
        npystream.iter_objects(b"", fix_imports=1)


def test_header_errors_at_call_time(tmp_path):
    p = tmp_path / "f.npy"
    np.save(p, np.arange(3))
    with pytest.raises(ValueError, match="no Python objects"):
        npystream.iter_objects(p)
    with pytest.raises(FormatError):
        npystream.iter_objects(b"not a npy file at all")


def test_stream_memory_policy_documented_limit():
    """Streaming keeps small shared objects across batches, releases big ones (documented)."""
    small = obj_array([np.arange(5.0), "s", {"k": [1]}, None] * 600)
    buf = io.BytesIO()
    np.save(buf, small)
    assert_same_elements(npystream.iter_objects(_Pipe(buf.getvalue())), list(small.flat))
    big = np.arange(200_000, dtype=np.float64)  # 1.6 MB: more than one retained value may hold
    arr = obj_array([big] + [None] * 1500 + [big])
    buf = io.BytesIO()
    np.save(buf, arr)
    got = []
    with pytest.raises(UnsupportedError, match="seekable"):
        for x in npystream.iter_objects(_Pipe(buf.getvalue())):
            got.append(x)
    assert len(got) == 1501
    # the same file from a seekable source is exact
    out = list(npystream.iter_objects(buf.getvalue()))
    assert out[0] is out[-1]
    np.testing.assert_array_equal(out[-1], big)


def test_iter_elements_arguments(corpus):
    data, expected = corpus["strings_3000"]
    src = MemorySource(data)
    header = read_header(src)
    assert list(iter_elements(src, header, SAFE, start=2990)) == expected[2990:]
    assert list(iter_elements(src, header, SAFE, start=5, stop=3)) == []
    with pytest.raises(ValueError):
        iter_elements(src, header, SAFE, start=-1)
    with pytest.raises(TypeError):
        iter_elements(src, header, "policy")  # type: ignore[arg-type]
    stream = StreamSource(_Pipe(data), "pipe", owned=False)
    h2 = read_header(stream)
    with pytest.raises(NotSeekableError):
        iter_elements(stream, h2, SAFE, start=1)
    with pytest.raises(NotSeekableError):
        scan_index(stream, h2, SAFE)


def test_numpy_testdata(numpy_testdata):
    for name in ("py2-objarr.npy", "py2-np0-objarr.npy", "py3-objarr.npy"):
        path = numpy_testdata / name
        for enc in ("latin1", "bytes"):
            ref = np.load(path, allow_pickle=True, encoding=enc)
            assert_same_elements(npystream.iter_objects(path, encoding=enc), list(ref.flat))
            assert_same_elements(npystream.iter_objects(path, encoding=enc, trusted=True), list(ref.flat))
        if name.startswith("py2"):
            with pytest.raises(UnicodeError):
                list(npystream.iter_objects(path))
            with pytest.raises(ImportError):
                list(npystream.iter_objects(path, encoding="latin1", fix_imports=False))


def test_chunks_split_large_batches(corpus, monkeypatch):
    """Runs are cut at ~CHUNK_BYTES; results do not depend on the chunk size."""
    data, expected = corpus["large_payloads"]
    for size in (1, 100, 1 << 16):
        monkeypatch.setattr(pw, "CHUNK_BYTES", size)
        assert_same_elements(npystream.iter_objects(data), expected)
        assert_same_elements(npystream.iter_objects(_Pipe(data)), expected)


def _scan_all(data: bytes, impl) -> tuple:
    src = MemorySource(data)
    header = read_header(src)
    st = pw.ScanState(header.count, None)
    st.data_end = len(data)
    pos = header.data_offset
    batches = []
    while True:
        try:
            pos = impl(memoryview(data), pos, len(data), 0, st)
        except pw.ScanError as err:
            return batches, ("error", err.kind, err.offset, err.index)
        if st.status == pw.ST_BATCH:
            batches.append((tuple(st.starts), tuple(st.memo_at), st.batch_end))
            st.starts.clear()
            st.memo_at.clear()
        elif st.status == pw.ST_DONE:
            return batches, ("done", pos, dict(st.reads), st.memo, st.body_start, st.body_memo)
        else:
            return batches, ("more", pos)


def _rewrite_all(data: bytes, impl, live, zero_copy: bool) -> tuple:
    src = MemorySource(data)
    header = read_header(src)
    index = scan_index(src, header, SAFE)
    rw = pw.RewriteState(live if live is not None else dict(zip(index.live_memo.tolist(), index.live_last.tolist())), zero_copy=zero_copy)
    out = bytearray()
    impl(memoryview(data), header.data_offset, index.body_start, 0, rw, out)
    assert rw.status == pw.RW_OK
    for i in range(index.count):
        rw.memo = int(index.memo_at[i])
        impl(memoryview(data), int(index.starts[i]), int(index.ends[i]), 0, rw, out)
        assert rw.status == pw.RW_OK
    return bytes(out), dict(rw.slot_of), list(rw.free), rw.nslots, list(rw.freed), list(rw.fresh)


@pytest.mark.skipif(not pw.speedups_active(), reason="C accelerator not built or disabled")
@pytest.mark.parametrize("name", CASE_NAMES)
def test_c_and_python_loops_agree(corpus, name):
    from npystream import _speedups

    data, _ = corpus[name]
    assert _scan_all(data, _speedups.scan_ops) == _scan_all(data, pw.scan_ops)
    for zc in (False, True):
        assert _rewrite_all(data, _speedups.rewrite_ops, None, zc) == _rewrite_all(data, pw.rewrite_ops, None, zc)


@pytest.mark.skipif(not pw.speedups_active(), reason="C accelerator not built or disabled")
def test_c_and_python_agree_on_every_truncation(corpus):
    from npystream import _speedups

    data, _ = corpus["protocol4_mixed"]
    for cut in range(128, len(data), max(1, len(data) // 400)):
        piece = data[:cut]
        assert _scan_all(piece, _speedups.scan_ops) == _scan_all(piece, pw.scan_ops), cut


def test_pure_python_switch():
    code = "import npystream.formats.pickle_walk as pw; print(pw.speedups_active())"
    env = dict(os.environ, NPYSTREAM_PURE_PYTHON="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_truncation_stream_and_file_yield_elements_before_damage(tmp_path, corpus):
    """Every cut of a small file: TruncatedError after a prefix of the right elements, file or pipe."""
    data, expected = corpus["exactly_1001"]
    path = tmp_path / "t.npy"
    step = max(1, len(data) // 60)
    for cut in range(130, len(data), step):
        piece = data[:cut]
        for source in (lambda p=piece: _Pipe(p), lambda p=piece: p):
            got = []
            with pytest.raises(npystream.TruncatedError) as info:
                for x in npystream.iter_objects(source()):
                    got.append(x)
            assert info.value.offset is not None and info.value.offset <= cut
            assert_same_elements(got, expected[: len(got)])
    path.write_bytes(data[:-1])
    with pytest.raises(npystream.TruncatedError):
        list(npystream.iter_objects(path))


def test_doctest_of_iter_objects():
    import doctest

    import npystream.objects as mod

    assert doctest.testmod(mod).failed == 0


@pytest.mark.skipif(not pw.speedups_active(), reason="C accelerator not built or disabled")
def test_c_array_building_is_linked():
    """_speedups_build.c (Reconstructor, build_arrays) is part of the extension, and used."""
    from npystream.formats import pickle_safety as ps

    assert ps.build_arrays_c is not None and ps._FastReconstruct is not None
    arr = obj_array([np.arange(n, dtype=np.int32) for n in range(50)])
    buf = io.BytesIO()
    np.save(buf, arr)
    assert_same_elements(npystream.iter_objects(buf.getvalue()), list(arr.flat))
