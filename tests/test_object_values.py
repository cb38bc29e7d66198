"""What the object reader builds: trusted mode is np.load, safe mode never leaks placeholders, dtypes keep what numpy keeps.

Regression tests for the value side of the object reader (issue 10, items 1,
3, 4 and 6): numpy scalars, ndarray subclasses and pandas objects under
``trusted=True``; refusal messages in safe mode that lead to a read;
``slice`` arguments that are arrays or dtypes; dtype metadata; the datetime
dtype state numpy 1.x writes.  Every expected value is ``np.load``'s.
"""

from __future__ import annotations

import gzip
import io
import pickle
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from objcases import assert_same_element, npy_preamble, obj_array

import npystream
from npystream.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")

INTERNAL = ("ArrayProto", "DtypeProto", "_NdarrayToken", "_RecordToken", "placeholder", "npystream.formats")

SCALARS = {
    "float32": np.float32(1.5),
    "int64": np.int64(-3),
    "uint8": np.uint8(200),
    "float16": np.float16(0.5),
    "complex64": np.complex64(1 - 2j),
    "datetime64": np.datetime64("2020-01-01T12:00", "ns"),
    "timedelta64": np.timedelta64(5, "s"),
    "bool_": np.bool_(True),
    "str_": np.str_("hé"),
    "bytes_": np.bytes_(b"ab"),
    "void_record": np.zeros(1, dtype=[("a", "<i4"), ("b", ">f8")])[0],
    "void_raw": np.void(b"\x01\x02"),
    "longdouble": np.longdouble(1.25),
    "big_endian_array": np.arange(3, dtype=">i2"),
}


def _save(tmp_path: Path, items: list[Any], name: str = "x.npy") -> tuple[Path, list[Any]]:
    path = tmp_path / name
    np.save(path, obj_array(items), allow_pickle=True)
    return path, list(np.load(path, allow_pickle=True))


def _all_readers(path: Path, **policy: Any) -> dict[str, list[Any]]:
    """The elements through every reader: path, bytes, gzip, open() with and without zero-copy."""
    data = path.read_bytes()
    out = {
        "path": list(npystream.iter_objects(path, **policy)),
        "bytes": list(npystream.iter_objects(data, **policy)),
        "gzip": list(npystream.iter_objects(gzip.GzipFile(fileobj=io.BytesIO(gzip.compress(data))), **policy)),
    }
    for zero_copy in (False, True):
        with npystream.open(path, zero_copy=zero_copy, **policy) as arr:
            out[f"open(zero_copy={zero_copy})"] = [arr[i] for i in range(len(arr))]
    return out


def _same(got: Any, want: Any) -> None:
    pd = _pandas()
    if pd is not None and isinstance(want, (pd.Series, pd.DataFrame)):
        assert type(got) is type(want) and want.equals(got) and list(got.dtypes if got.ndim == 2 else [got.dtype]) == list(want.dtypes if want.ndim == 2 else [want.dtype])
    elif pd is not None and isinstance(want, pd.Categorical):
        assert type(got) is type(want) and list(got) == list(want) and got.dtype == want.dtype
    elif isinstance(want, np.ma.MaskedArray):
        assert type(got) is type(want) and got.dtype == want.dtype
        assert np.array_equal(got.mask, want.mask) and np.array_equal(got.data, want.data)
        assert got.fill_value == want.fill_value
    elif isinstance(want, np.ndarray) and type(want) is not np.ndarray:
        assert type(got) is type(want) and got.dtype == want.dtype and got.dtype.type is want.dtype.type
        assert got.shape == want.shape and got.tobytes() == want.tobytes()
    else:
        assert_same_element(got, want)


def _pandas() -> Any:
    try:
        import pandas
    except ImportError:
        return None
    return pandas


# ---------------------------------------------------------------------------
# item 1: trusted=True is np.load(allow_pickle=True)


@pytest.mark.parametrize("name", list(SCALARS))
def test_trusted_reads_numpy_scalars(tmp_path, name):
    """The issue's reproducer: np.float32(1.5) in an object array failed with 'scalar() argument 1 must be numpy.dtype'."""
    x = SCALARS[name]
    path, want = _save(tmp_path, [x, [x, {"k": x}], (x,)])
    for trusted in (True, False):
        for reader, got in _all_readers(path, trusted=trusted).items():
            assert len(got) == len(want), reader
            for g, w in zip(got, want):
                _same(g, w)


def _subclass_values() -> dict[str, Any]:
    rec = np.rec.array([(1, 2.0), (3, 4.0)], dtype=[("a", "<i4"), ("b", "<f8")])
    return {
        "masked": np.ma.masked_array([1.0, 2.0, 3.0], mask=[0, 1, 0], fill_value=-1.0),
        "matrix": np.matrix([[1, 2], [3, 4]]),
        "recarray": rec,
        "record": rec[0],
        "record_dtype_array": rec.view(np.ndarray),
    }


SUBCLASSES = ["masked", "matrix", "recarray", "record", "record_dtype_array"]


@pytest.mark.parametrize("name", SUBCLASSES)
def test_trusted_reads_ndarray_subclasses(tmp_path, name):
    x = _subclass_values()[name]
    path, want = _save(tmp_path, [x, [x, 1], {"v": x}])
    for reader, got in _all_readers(path, trusted=True).items():
        _same(got[0], want[0])
        _same(got[1][0], want[1][0])
        _same(got[2]["v"], want[2]["v"])
        assert got[1][1] == 1, reader


def test_record_dtypes_read_in_safe_mode(tmp_path):
    """numpy pickles record dtypes as dtype(numpy.record, 0, 1): on the safe list (np.record is not called)."""
    rec = np.rec.array([(1, 2.0)], dtype=[("a", "<i4"), ("b", "<f8")])
    path, want = _save(tmp_path, [rec[0], rec.view(np.ndarray), rec.dtype])
    for reader, got in _all_readers(path).items():
        for g, w in zip(got, want):
            _same(g, w)
        assert got[1].dtype.type is np.record, reader


def test_trusted_reads_python2_recarray_pickle(tmp_path):
    """Like statsmodels' vars_results.npz members: a protocol-2 pickle with numpy.core names holding recarrays."""
    rec = np.rec.array([(1, 2.5), (2, 3.5)], dtype=[("a", "<i4"), ("b", "<f8")])
    arr = obj_array([rec, rec[1]])
    body = pickle.dumps(arr, protocol=2).replace(b"cnumpy._core.", b"cnumpy.core.")
    path = tmp_path / "py2rec.npy"
    path.write_bytes(npy_preamble(arr) + body)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2 on the numpy.core module path
        want = list(np.load(path, allow_pickle=True, encoding="latin1"))
    got = list(npystream.iter_objects(path, trusted=True, encoding="latin1"))
    for g, w in zip(got, want):
        _same(g, w)
    archive = tmp_path / "vars_results.npz"  # statsmodels keeps such members in an .npz
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("irf.npy", path.read_bytes())
    with npystream.open(archive, trusted=True, encoding="latin1") as npz:
        member = npz["irf"]
        for i, w in enumerate(want):
            _same(member[i], w)


@pytest.mark.parametrize("name", ["series", "frame", "categorical"])
def test_trusted_reads_pandas_objects(tmp_path, name):
    pd = pytest.importorskip("pandas")
    x = {
        "series": pd.Series([1.5, 2.0, None], name="s"),
        "frame": pd.DataFrame({"a": [1, 2], "b": ["x", "y"], "t": pd.to_datetime(["2020-01-01", "2021-01-01"])}),
        "categorical": pd.Categorical(["a", "b", "a"]),
    }[name]
    path, want = _save(tmp_path, [x, [x, np.arange(3)]])
    for reader, got in _all_readers(path, trusted=True).items():
        _same(got[0], want[0])
        _same(got[1][0], want[1][0])
        assert_same_element(got[1][1], want[1][1]), reader


def test_head_trusted_prints_numpy_scalars_and_subclasses(tmp_path, capsys):
    path, _ = _save(tmp_path, [np.float32(1.5), np.matrix([[1, 2]]), [np.int64(7)]])
    assert main(["head", "--trusted", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1.5" in out and "matrix" in out and "7" in out
    assert not any(word in out for word in INTERNAL), out


def _follow_refusals(path: Path) -> tuple[list[str], Any, BaseException | None]:
    """Read in safe mode, adding each global a refusal names, until it reads or a message names no global."""
    allowed: list[str] = []
    for _ in range(40):
        try:
            return allowed, list(npystream.iter_objects(path, allowed_globals=allowed)), None
        except npystream.UnsafePickleError as exc:
            m = re.search(r"allowed_globals=\['([^']+)'\]", str(exc))
            if m is None or m.group(1) in allowed:
                return allowed, None, exc
            allowed.append(m.group(1))
    raise AssertionError("more than 40 refusals")


def _refused_kinds() -> dict[str, Any]:
    out = dict(_subclass_values())
    del out["record"], out["record_dtype_array"]  # on the safe list
    pd = _pandas()
    if pd is not None:
        out.update(series=pd.Series([1, 2]), frame=pd.DataFrame({"a": [1, 2]}), categorical=pd.Categorical(["a"]),
                   timestamp=pd.Timestamp("2020-01-01"))
    import datetime
    import decimal

    out.update(date=datetime.date(2020, 1, 2), decimal=decimal.Decimal("1.5"))
    return out


@pytest.mark.parametrize("name", ["masked", "matrix", "recarray", "series", "frame", "categorical", "timestamp",
                                  "date", "decimal"])
def test_safe_mode_refusals_lead_to_a_read(tmp_path, name):
    """Following every refusal message either reads the element or ends in a message saying trusted=True reads it -- and it does."""
    kinds = _refused_kinds()
    if name not in kinds:
        pytest.importorskip("pandas")
    x = kinds[name]
    path, want = _save(tmp_path, [x])
    allowed, got, exc = _follow_refusals(path)
    if exc is None:
        _same(got[0], want[0])
    else:
        text = str(exc)
        assert "trusted=True" in text and "allowed_globals=[" not in text, text
        assert not any(word in text for word in INTERNAL), text
        _same(list(npystream.iter_objects(path, trusted=True))[0], want[0])


def test_numpy_subclasses_are_refused_even_when_named(tmp_path):
    """np.matrix named in allowed_globals still needs trusted=True, and the message says so at once."""
    path, _ = _save(tmp_path, [np.matrix([[1]])])
    with pytest.raises(npystream.UnsafePickleError, match="trusted=True") as info:
        list(npystream.iter_objects(path, allowed_globals=["numpy.matrix"]))
    assert "matrix" in str(info.value) and "allowed_globals=[" not in str(info.value)


# ---------------------------------------------------------------------------
# item 3: safe mode never leaks placeholders


def _slices() -> list[Any]:
    a = np.arange(3)
    return [slice(a, None), slice(np.dtype("f4"), 1), [slice(None, a, np.dtype(">i2"))], {"s": slice(a, a)},
            slice(np.arange(6.0).reshape(2, 3)[:, ::2], (np.float32(2), [np.zeros(2, "M8[s]")]))]


def test_safe_mode_slices_hold_real_arrays_and_dtypes(tmp_path):
    path, want = _save(tmp_path, _slices())
    for trusted in (False, True):
        for reader, got in _all_readers(path, trusted=trusted).items():
            for g, w in zip(got, want):
                assert_same_element(g, w)
            assert type(got[0].start) is np.ndarray and type(got[1].start) is type(np.dtype("f4")), reader
            assert not isinstance(got[0].start.base, memoryview) or got[0].start.flags.writeable is False


def test_ragged_object_store_slices_hold_real_arrays(tmp_path):
    path, want = _save(tmp_path, _slices())
    store = tmp_path / "s.ragged"
    npystream.convert(path, store, kind="object")
    for safe in (True, False):
        arr = npystream.open(store, safe=safe)
        got = [arr[i] for i in range(len(want))]
        for g, w in zip(got, want):
            assert_same_element(g, w)
    shutil.rmtree(store)


def test_messages_never_name_placeholders(tmp_path):
    """A class named in allowed_globals that trips over an unchecked array: the message names neither placeholder."""
    pd = pytest.importorskip("pandas")
    path, _ = _save(tmp_path, [pd.Series([1.0, 2.0])])
    allowed, got, exc = _follow_refusals(path)
    assert got is None and exc is not None
    assert not any(word in str(exc) for word in INTERNAL), str(exc)


# ---------------------------------------------------------------------------
# item 4: dtype metadata survives


def test_dtype_metadata_survives(tmp_path):
    """The issue's reproducer: np.dtype('<f8', metadata={'unit': 'm'}) kept its metadata in np.load, not here."""
    meta = np.dtype("<f8", metadata={"unit": "m"})
    items = [np.zeros(3, meta), meta, np.dtype("M8[ns]", metadata={"tz": "UTC"}),
             np.dtype(">i4", metadata={"arr": np.arange(2), "dt": np.dtype("f2")}), [np.ones(2, meta)]]
    path, want = _save(tmp_path, items)
    assert want[0].dtype.metadata == {"unit": "m"}
    for trusted in (False, True):
        for reader, got in _all_readers(path, trusted=trusted).items():
            for g, w in zip(got, want):
                assert_same_element(g, w)
            assert got[1].metadata == {"unit": "m"}, reader
            assert type(got[3].metadata["arr"]) is np.ndarray, reader
    store = tmp_path / "m.ragged"
    npystream.convert(path, store, kind="object")
    assert npystream.open(store)[0].dtype.metadata == {"unit": "m"}


# ---------------------------------------------------------------------------
# item 6: the dtype states other numpy versions write


class _Numpy1Pickler(pickle.Pickler):
    """Pickles datetime dtypes with the state numpy 1.x writes: ``{}`` where numpy 2 writes None."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, np.dtype) and obj.kind in "mM":
            fn, args, state = obj.__reduce__()
            meta = state[8]
            return fn, args, (*state[:8], ({} if meta[0] is None else meta[0], meta[1]))
        return NotImplemented


class _Numpy2Pickler(pickle.Pickler):
    """The reverse: None where numpy 1.x writes ``{}``."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, np.dtype) and obj.kind in "mM":
            fn, args, state = obj.__reduce__()
            meta = state[8]
            return fn, args, (*state[:8], (meta[0] or None, meta[1]))
        return NotImplemented


@pytest.mark.parametrize("pickler", [_Numpy1Pickler, _Numpy2Pickler])
def test_datetime_dtype_states_of_numpy_1_and_2(tmp_path, pickler):
    """Under either numpy: a datetime64 array, a dtype('M8[ns]') and a datetime64 scalar in both states."""
    items = [np.arange(3).astype("M8[ns]"), np.dtype("M8[ns]"), np.datetime64("2020-01-01", "D"),
             np.timedelta64(3, "h"), np.zeros(2, [("t", ">m8[us]")]), np.dtype("M8[ns]", metadata={"k": 1})]
    arr = obj_array(items)
    buf = io.BytesIO()
    pickler(buf, protocol=3).dump(arr)
    path = tmp_path / "dt.npy"
    path.write_bytes(npy_preamble(arr) + buf.getvalue())
    want = list(np.load(path, allow_pickle=True))
    for trusted in (False, True):
        for got in _all_readers(path, trusted=trusted).values():
            for g, w in zip(got, want):
                assert_same_element(g, w)


FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "numpy1"


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*.npy")))
def test_files_written_by_numpy_1_26(name):
    """Files numpy 1.26 wrote (tests/cross_numpy.py write), read under the installed numpy as its np.load reads them."""
    path = FIXTURES / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        want = list(np.load(path, allow_pickle=True).flat)
    for trusted in (False, True):
        try:
            got = list(npystream.iter_objects(path, trusted=trusted))
        except npystream.UnsafePickleError as exc:
            assert not trusted and "trusted=True" in str(exc)
            continue
        assert len(got) == len(want)
        for g, w in zip(got, want):
            _same(g, w)


class _Call:
    """Pickles as ``fn(*args)``: what a hand-made pickle may call an allowed callable with."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> Any:
        return self.fn, self.args


@pytest.mark.parametrize(
    "call",
    [_Call(bytes, np.arange(3)), _Call(bytearray, np.dtype("f4")), _Call(complex, np.arange(2)),
     _Call(range, np.dtype("i2")), _Call(frozenset, [np.dtype("f4"), np.arange(0)])],
    ids=["bytes(array)", "bytearray(dtype)", "complex(array)", "range(dtype)", "frozenset([dtype, array])"],
)
def test_allowed_callables_get_real_objects_or_refuse_clearly(tmp_path, call):
    """Safe mode: an allowed callable given an array or dtype works on the real object or the element is refused -- never a placeholder."""
    arr = obj_array([1, call])
    path = tmp_path / "c.npy"
    path.write_bytes(npy_preamble(arr) + pickle.dumps(arr, protocol=4))
    try:
        want: Any = list(np.load(path, allow_pickle=True))
    except Exception as exc:  # numpy itself may refuse it
        want = exc
    for reader in ("path", "open"):
        try:
            got = (list(npystream.iter_objects(path)) if reader == "path"
                   else [npystream.open(path)[i] for i in range(2)])
        except npystream.NpyStreamError as exc:
            text = str(exc)
            assert "element 1" in text and not any(word in text for word in INTERNAL), text
            continue
        assert not isinstance(want, Exception), got
        for g, w in zip(got, want):
            assert_same_element(g, w)
