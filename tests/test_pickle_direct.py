"""Direct decoding (npystream.formats.pickle_direct and its C twin): same elements as np.load, both twins agree.

Three ways through every file: the C twin (when built), the Python twin, and
no direct decoding at all (every element through the unpickler).  All must
yield exactly ``np.load(path, allow_pickle=True).flat``; where the C twin is
built, every call is also replayed on the Python twin and the returned
``(j, m)`` and built elements compared.
"""

from __future__ import annotations

import io
import pickle
import random
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst
from objcases import (
    CASE_NAMES,
    assert_same_elements,
    case,
    case_bytes,
    expected_elements,
    obj_array,
    write_case,
)

import npystream
from npystream.errors import NpyStreamError
from npystream.formats import pickle_direct as pd
from npystream.formats import pickle_walk as pw

C_DIRECT = pw._direct_run is not pd.direct_run


def _replaying(monkeypatch: pytest.MonkeyPatch, calls: list[int]) -> None:
    """Route the engine through the C twin and check every call against the Python twin."""
    c_fn = pw._direct_run

    def both(buf: Any, base: int, sl: Any, el: Any, ml: Any, i: int, k: int, roles: Any, live: Any, hot: Any,
             view_fn: Any, out: list[Any]) -> tuple[int, int]:
        o_c: list[Any] = []
        o_py: list[Any] = []
        r_c = c_fn(buf, base, sl, el, ml, i, k, roles, live, hot, view_fn, o_c)
        r_py = pd.direct_run(buf, base, sl, el, ml, i, k, roles, live, hot, view_fn, o_py)
        assert r_c == r_py, (r_c, r_py, i, k)
        assert_same_elements(o_c, o_py)
        calls[0] += 1
        calls[1] += len(o_c)
        out.extend(o_c)
        return r_c

    monkeypatch.setattr(pw, "_direct_run", both)


MODES = ["c", "python", "off"]


def _set_mode(monkeypatch: pytest.MonkeyPatch, mode: str, calls: list[int]) -> None:
    if mode == "c":
        if not C_DIRECT:
            pytest.skip("C accelerator not built")
        _replaying(monkeypatch, calls)
    elif mode == "python":
        monkeypatch.setattr(pw, "_direct_run", pd.direct_run)
    else:
        monkeypatch.setattr(pw, "_DIRECT", False)


def _elements(path: Any, **kw: Any) -> list[Any]:
    return list(npystream.iter_objects(path, **kw))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CASE_NAMES)
def test_corpus_equals_np_load(tmp_path: Any, monkeypatch: pytest.MonkeyPatch, mode: str, name: str) -> None:
    calls = [0, 0]
    _set_mode(monkeypatch, mode, calls)
    c = case(name)
    path = tmp_path / "a.npy"
    loaded = write_case(c, path)
    assert_same_elements(_elements(path), expected_elements(loaded))
    if loaded.dtype == object and loaded.size:
        assert_same_elements(_elements(path, zero_copy=True), expected_elements(loaded))


def _kinds() -> list[Any]:
    rng = np.random.default_rng(3)
    items: list[Any] = []
    for n in (0, 1, 3, 255, 256, 300, 16383, 16384, 70000):  # payloads around the 64 KiB frame target
        items.append(rng.standard_normal(n).astype(np.float32))
    items += [
        np.arange(12, dtype=">i4"),  # big-endian: numpy copies, never views
        np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        np.arange(24, dtype=np.int16).reshape(2, 3, 4),
        np.arange(120, dtype=np.uint8).reshape(2, 3, 4, 5),  # 4-d: the shape is MARK ... TUPLE
        np.arange(2 * 3 * 2 * 2 * 2, dtype=np.int64).reshape(2, 3, 2, 2, 2),
        np.zeros((0, 5), dtype=np.float64),
        np.array(7.5),  # 0-d: shape ()
        np.zeros(300, dtype=np.complex64),
        np.zeros(70000, dtype=np.bool_),  # BININT for the dimension
        np.array([0, 1, 2], dtype="datetime64[s]"),
        np.array(["ab", "c"], dtype="U2"),
        np.array([b"x", b"yz"], dtype="S2"),
        np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")]),
        "plain", "", "é ü ☃", "\ud800 lone surrogate", "x" * 300, "y" * 70000,
        b"", b"bytes", b"z" * 300, bytearray(b"ba"),
        0, 1, 255, 256, 65535, 65536, -1, -(2**31), 2**31 - 1, 2**31, 2**70, -(2**70),
        0.0, -1.5, float("inf"), 1e300, True, False, None,
        (1, 2), [1, "a"], {"k": np.arange(2)},
    ]
    return items


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("protocol", [None, 2, 3, 4, 5])
def test_every_kind_every_protocol(tmp_path: Any, monkeypatch: pytest.MonkeyPatch, mode: str, protocol: int | None) -> None:
    calls = [0, 0]
    _set_mode(monkeypatch, mode, calls)
    items = _kinds()
    items = items + _kinds() + _kinds()  # later elements read the dtypes, globals and b"b" back from the memo
    arr = obj_array(items)
    path = tmp_path / "k.npy"
    if protocol is None:
        np.save(path, arr, allow_pickle=True)
    else:
        from objcases import npy_preamble

        path.write_bytes(npy_preamble(arr) + pickle.dumps(arr, protocol=protocol))
    loaded = np.load(path, allow_pickle=True)
    assert_same_elements(_elements(path), expected_elements(loaded))
    assert_same_elements(_elements(path, zero_copy=True), expected_elements(loaded))
    if mode == "c" and protocol in (None, 3, 4, 5):
        assert calls[1] >= len(items) // 5, calls  # a good part really went the direct way (2 passes)


@pytest.mark.parametrize("mode", MODES)
def test_uniform_arrays_go_direct(tmp_path: Any, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """The benchmark's shape (many small int32 arrays, then strings): all but a handful are direct."""
    calls = [0, 0]
    _set_mode(monkeypatch, mode, calls)
    rng = np.random.default_rng(5)
    items: list[Any] = [np.arange(int(n), dtype=np.int32) for n in rng.integers(5, 60, 3000)]
    items += [f"str{i}" for i in range(3000)]
    path = tmp_path / "u.npy"
    np.save(path, obj_array(items), allow_pickle=True)
    loaded = np.load(path, allow_pickle=True)
    assert_same_elements(_elements(path), expected_elements(loaded))
    if mode == "c":
        assert calls[1] >= len(items) - 10, calls


@pytest.mark.parametrize("mode", MODES)
def test_shared_objects_and_many_memo_entries(tmp_path: Any, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """Elements read back by later ones (live memo writes) and > 256 memo entries (LONG_BINGET/PUT)."""
    calls = [0, 0]
    _set_mode(monkeypatch, mode, calls)
    shared = np.arange(5, dtype=np.int32)
    s = "shared string"
    items: list[Any] = []
    for i in range(2500):
        if i % 97 == 0:
            items.append(shared)
        elif i % 89 == 0:
            items.append(s)
        elif i % 3 == 0:
            items.append(np.arange(i % 50, dtype=np.int32))
        else:
            items.append(f"s{i}")
    arr = obj_array(items)
    for protocol in (3, 4):
        from objcases import npy_preamble

        path = tmp_path / f"m{protocol}.npy"
        path.write_bytes(npy_preamble(arr) + pickle.dumps(arr, protocol=protocol))
        loaded = np.load(path, allow_pickle=True)
        got = _elements(path)
        assert_same_elements(got, expected_elements(loaded))
        # aliasing: np.load gives the same object for every occurrence
        firsts = [x for x in got if isinstance(x, np.ndarray) and x.shape == (5,) and x.dtype == np.int32]
        assert len(firsts) >= 2
        oa = npystream.open(path)
        try:
            assert_same_elements(oa.get(range(0, 2500, 7)), expected_elements(loaded)[0:2500:7])
        finally:
            oa.close()


def test_direct_arrays_are_np_load_alike(tmp_path: Any) -> None:
    """Copies: writeable, owning or bytes-based like numpy's __setstate__; zero-copy: read-only views."""
    arr = obj_array([np.arange(n, dtype=np.float64) for n in (1, 10, 1000, 100000) * 2])  # distinct objects
    path = tmp_path / "f.npy"
    np.save(path, arr, allow_pickle=True)
    loaded = np.load(path, allow_pickle=True)
    got = _elements(path)
    for g, e in zip(got, loaded):
        assert g.flags.writeable == e.flags.writeable
        assert type(g.base) is type(e.base)
        assert g.flags.c_contiguous and np.array_equal(g, e)
    views = _elements(path, zero_copy="always")
    for v, e in zip(views, loaded):
        assert not v.flags.writeable and np.array_equal(v, e)
    for v, e in zip(_elements(path, zero_copy=True), loaded):  # views of aligned payloads, else copies
        assert v.flags.aligned and np.array_equal(v, e)
        assert v.flags.writeable is (v.base is None or type(v.base) is not memoryview)


def test_invalid_utf8_still_reported(tmp_path: Any) -> None:
    """A string element whose bytes are not UTF-8: the same error with direct decoding as without."""
    arr = obj_array(["good", "abcd", "more"])
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    data = buf.getvalue().replace(b"abcd", b"ab\xff\xfe")
    path = tmp_path / "u.npy"
    path.write_bytes(data)
    with pytest.raises(Exception) as direct:
        _elements(path)
    old = pw._DIRECT
    pw._DIRECT = False
    try:
        with pytest.raises(Exception) as program:
            _elements(path)
    finally:
        pw._DIRECT = old
    assert type(direct.value) is type(program.value)
    it = npystream.iter_objects(path)
    assert next(it) == "good"


_BASE_FILES: list[bytes] = []


def _base_files() -> list[bytes]:
    if not _BASE_FILES:
        for name in CASE_NAMES:
            c = case(name)
            if c.protocol in (None, 3, 4):
                data = case_bytes(c)
                if len(data) < 20000:
                    _BASE_FILES.append(data)
        items = [np.arange(i % 7, dtype=np.int16) for i in range(40)] + [f"t{i}" for i in range(40)]
        buf = io.BytesIO()
        np.save(buf, obj_array(items), allow_pickle=True)
        _BASE_FILES.append(buf.getvalue())
    return _BASE_FILES


def _outcome(path: Any) -> tuple[list[Any], type | None]:
    got: list[Any] = []
    try:
        for x in npystream.iter_objects(path):
            got.append(x)
    except (NpyStreamError, ValueError, EOFError, pickle.UnpicklingError, UnicodeDecodeError) as exc:
        return got, type(exc)
    return got, None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=hst.integers(0, 2**32 - 1), nflips=hst.integers(1, 4))
def test_mutations_direct_matches_program_path(tmp_path: Any, seed: int, nflips: int) -> None:
    """Random byte flips in valid files: direct decoding yields the same elements and the same error kind."""
    rnd = random.Random(seed)
    files = _base_files()
    data = bytearray(files[rnd.randrange(len(files))])
    start = data.index(b"\n") + 1
    for _ in range(nflips):
        data[rnd.randrange(start, len(data))] = rnd.randrange(256)
    path = tmp_path / f"m{seed}.npy"
    path.write_bytes(bytes(data))
    calls = [0, 0]
    mp = pytest.MonkeyPatch()
    try:
        if C_DIRECT:
            _replaying(mp, calls)
        direct = _outcome(path)
        mp.setattr(pw, "_DIRECT", False)
        program = _outcome(path)
    finally:
        mp.undo()
    assert direct[1] == program[1], _errors_both_ways(path)
    assert len(direct[0]) == len(program[0]), (len(direct[0]), len(program[0]), _errors_both_ways(path))
    assert_same_elements(direct[0], program[0])


def _errors_both_ways(path: Any) -> str:
    out = []
    for direct in (True, False):
        old = pw._DIRECT
        pw._DIRECT = direct
        try:
            list(npystream.iter_objects(path))
        except Exception as exc:
            out.append(repr(exc))
        finally:
            pw._DIRECT = old
    return " | ".join(out)
