"""save_objects: byte-identical to np.save for the same elements, read back by np.load, streaming."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npystream.formats.objwriter import object_npy_header, save_objects
from npystream.verification import equal


def _obj_array(items):
    arr = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):
        arr[i] = x
    return arr


def _np_bytes(items, protocol=4):
    arr = _obj_array(items)
    buf = io.BytesIO()
    if protocol == 4:
        np.save(buf, arr, allow_pickle=True)
    else:  # what numpy 1.x (protocol 3) and older writers produce: same header, other protocol
        np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(arr))
        pickle.dump(arr, buf, protocol=protocol)
    return buf.getvalue()


def _np_loaded(items):
    """numpy as the oracle: what np.load gives for np.save of the same elements."""
    return np.load(io.BytesIO(_np_bytes(items)), allow_pickle=True)


_SHARED = np.arange(5)
CASES = {
    "empty": [],
    "one": [np.arange(3, dtype=np.float32)],
    "two": [1, "a"],
    "float32": [np.random.default_rng(0).standard_normal(n).astype(np.float32)
                for n in (0, 1, 10, 16384, 20000, 70000)],
    "kinds": [None, True, 1, 2**70, -5, 1.5, float("nan"), 1 + 2j, "héllo", b"by", bytearray(b"x"),
              [1, [2]], (1, 2), {"a": 1, "b": [2]}, {1, 2}, frozenset([3]), range(3), slice(1, 2),
              np.float64(3), np.int8(2), np.arange(6).reshape(2, 3).T, np.zeros((), ">i4"),
              np.array(["ab", "c"]), np.array([{"x": 1}, None], dtype=object),
              np.zeros(3, dtype=[("a", "<i4"), ("b", ">f8", (2,))]),
              np.array(["2020-01-01"], dtype="M8[D]")],
    "big_arrays_every_layout": [  # >= 256 bytes: written from the array's memory
        np.arange(300, dtype=">i4"), np.arange(600.0).reshape(20, 30).T, np.asfortranarray(np.ones((40, 9), "<c8")),
        np.zeros(500, dtype=[("a", "<i4"), ("b", ">f8", (2,))]), np.arange(400).astype("M8[s]"),
        np.array(["x" * 30] * 20), np.ones(300, dtype=bool), np.arange(500, dtype=np.float16),
        np.arange(70_000, dtype=np.uint8), np.arange(20_000, dtype=np.float64)[::2],  # strided: generic path
        np.arange(64, dtype="<i4"), np.arange(63, dtype="<i4"), np.zeros((0, 500), "<f8"),
        np.arange(1000, dtype=np.float32).reshape(10, 10, 10)[:, :, 0],
    ],
    "batches_2501": [np.arange(i % 7, dtype=np.int32) for i in range(2501)],
    "exactly_1000": [str(i) for i in range(1000)],
    "batch_of_one_at_end": list(range(1001)),
    "nested_batches": [{i: i for i in range(1001)}, list(range(1001)), [5], {7: 8}],
    "same_object_twice": [_SHARED, _SHARED, "x", _SHARED],
}


@pytest.mark.parametrize("protocol", [4, 3, 2, 5])
@pytest.mark.parametrize("name", list(CASES))
def test_byte_identical_to_np_save(tmp_path, name, protocol):
    items = CASES[name]
    p = tmp_path / "x.npy"
    n = save_objects(p, iter(items), length=len(items), protocol=protocol)
    assert n == len(items)
    assert p.read_bytes() == _np_bytes(items, protocol)


@pytest.mark.parametrize("protocol", [4, 3, 2])
@pytest.mark.parametrize("name", list(CASES))
def test_unknown_length_loads_equal(tmp_path, name, protocol):
    items = CASES[name]
    p = tmp_path / "x.npy"
    assert save_objects(p, iter(items), protocol=protocol) == len(items)
    back = np.load(p, allow_pickle=True)
    assert back.shape == (len(items),) and back.dtype == object
    assert all(equal(a, b) for a, b in zip(back, _np_loaded(items)))
    # The only difference from np.save: extra header padding absorbing the count's shorter encoding.
    ref = _np_bytes(items, protocol)
    got = p.read_bytes()
    hlen_ref = 10 + int.from_bytes(ref[8:10], "little")
    hlen_got = 10 + int.from_bytes(got[8:10], "little")
    assert hlen_got >= hlen_ref
    assert got[hlen_ref:hlen_got].strip(b" \n") == b""
    if protocol < 4 or len(ref) - hlen_ref < 60_000:  # framing can only differ past the first frame
        assert got[hlen_got:] == ref[hlen_ref:]


def test_header_matches_numpy_for_many_lengths():
    for n in (0, 1, 9, 10, 255, 256, 65535, 65536, 10**9, 2**31, 10**20):
        arr_hdr = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            arr_hdr, {"descr": "|O", "fortran_order": False, "shape": (n,)}
        )
        assert object_npy_header(n) == arr_hdr.getvalue()
        assert len(object_npy_header(n)) % 64 == 0


def test_length_mismatch_leaves_nothing(tmp_path):
    p = tmp_path / "x.npy"
    with pytest.raises(ValueError, match="yielded 2 elements"):
        save_objects(p, [1, 2], length=3)
    assert os.listdir(tmp_path) == []


def test_error_in_iterable_leaves_nothing(tmp_path):
    p = tmp_path / "x.npy"

    def gen():
        yield np.arange(3)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_objects(p, gen())
    assert os.listdir(tmp_path) == []


def test_overwrite_false_refuses(tmp_path):
    p = tmp_path / "x.npy"
    save_objects(p, [1])
    with pytest.raises(FileExistsError):
        save_objects(p, [2], overwrite=False)
    assert np.load(p, allow_pickle=True).tolist() == [1]


@pytest.mark.parametrize("bad", [1, 6, "4", True])
def test_bad_protocol(tmp_path, bad):
    with pytest.raises(ValueError, match="protocol"):
        save_objects(tmp_path / "x.npy", [1], protocol=bad)


@pytest.mark.parametrize("bad", [-1, 1.0, "3"])
def test_bad_length(tmp_path, bad):
    with pytest.raises(ValueError, match="length"):
        save_objects(tmp_path / "x.npy", [1], length=bad)


def test_unpicklable_element_leaves_nothing(tmp_path):
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_objects(tmp_path / "x.npy", [1, lambda: 0])
    assert os.listdir(tmp_path) == []


_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20),
    st.binary(max_size=20),
    st.lists(st.integers(-1000, 1000), max_size=30).map(lambda v: np.array(v, dtype=np.int32)),
    st.lists(st.floats(width=32, allow_nan=False), max_size=30).map(lambda v: np.array(v, np.float32)),
)
_elem = st.recursive(_leaf, lambda c: st.one_of(st.lists(c, max_size=4), st.tuples(c, c),
                                                st.dictionaries(st.text(max_size=5), c, max_size=3)),
                     max_leaves=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(_elem, max_size=40))
def test_hypothesis_identical_to_np_save(tmp_path, items):
    p = tmp_path / "h.npy"
    save_objects(p, items, length=len(items))
    assert p.read_bytes() == _np_bytes(items)
    save_objects(p, iter(items))
    back = np.load(p, allow_pickle=True)
    assert len(back) == len(items) and all(equal(a, b) for a, b in zip(back, _np_loaded(items)))


_MEM_CHILD = textwrap.dedent("""
    import sys, threading, time
    import numpy as np
    from npystream.formats.objwriter import save_objects
    from npystream.demo import rss_anon
    peak = [0]
    def sample():
        while True:
            peak[0] = max(peak[0], rss_anon()); time.sleep(0.002)
    threading.Thread(target=sample, daemon=True).start()
    n = int(sys.argv[2])
    def gen():
        rng = np.random.default_rng(0)
        for i in range(n):
            yield rng.standard_normal(int(rng.integers(10_000, 40_000)), dtype=np.float32)
    base = rss_anon()
    save_objects(sys.argv[1], gen(), length=None)
    time.sleep(0.01)
    print(peak[0] - base)
""")


@pytest.mark.slow
def test_memory_bounded_independent_of_count(tmp_path):
    growth = []
    for n in (300, 1500):  # ~30 MB and ~150 MB of payload
        out = subprocess.run([sys.executable, "-c", _MEM_CHILD, str(tmp_path / f"m{n}.npy"), str(n)],
                             capture_output=True, text=True, check=True)
        growth.append(int(out.stdout.strip().splitlines()[-1]))
        assert len(np.load(tmp_path / f"m{n}.npy", mmap_mode=None, allow_pickle=True)) == n
        os.unlink(tmp_path / f"m{n}.npy")
    # one element is at most 160 KB; buffers a few MB; 5x more elements must not grow memory
    assert growth[0] < 40 * 2**20 and growth[1] < 40 * 2**20, growth
