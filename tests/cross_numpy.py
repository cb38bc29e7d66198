"""Files written by one numpy, read by npystream under another (numpy 1.26 <-> numpy 2).

``python tests/cross_numpy.py write DIR`` saves object arrays of the element
kinds whose pickled state differs between numpy versions (datetime dtypes,
dtype metadata, record dtypes, numpy scalars, ndarray subclasses) plus the
catalogue of :mod:`objcases` with the running numpy; ``... read DIR`` reads
every file with npystream (safe mode and ``trusted=True``; path, gzip and
``open()``) and compares each element with the running numpy's
``np.load(allow_pickle=True)``.  ``tests/cross_numpy.sh`` runs it both ways.
Runs under numpy >= 1.23 (no pytest needed).
"""

from __future__ import annotations

import gzip
import io
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from objcases import CASES, assert_same_element, case_bytes, obj_array

# ndarray subclasses: safe mode refuses them, naming trusted=True
TRUSTED_ONLY = ("masked", "matrix", "recarray")


def _extra() -> dict[str, np.ndarray]:
    rec = np.rec.array([(1, 2.5), (2, -1.0)], dtype=[("a", "<i4"), ("b", ">f8")])
    meta = np.dtype("<f8", metadata={"unit": "m"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        matrix = np.matrix([[1, 2], [3, 4]])
    return {
        "datetime": obj_array([np.arange(3).astype("M8[ns]"), np.dtype("M8[ns]"), np.datetime64("2020-01-01T12", "h"),
                               np.timedelta64(3, "D"), np.dtype(">m8[us]"), np.zeros(2, [("t", "M8[s]"), ("x", "<i2")]),
                               [np.datetime64("NaT"), {"d": np.dtype("M8")}]]),
        "metadata": obj_array([np.zeros(3, meta), meta, np.dtype("M8[ns]", metadata={"tz": "UTC"})]),
        "scalars": obj_array([np.float32(1.5), np.int64(-3), np.bool_(True), np.str_("hé"), np.bytes_(b"x"),
                              np.longdouble(2.5), np.complex64(1j), np.void(b"\x01\x02"), rec[0], [np.uint16(7)]]),
        "record_dtypes": obj_array([rec.view(np.ndarray), rec.dtype, rec[1]]),
        "slices": obj_array([slice(np.arange(3), None), slice(np.dtype("f4"), 1)]),
        "recarray": obj_array([rec]),
        "masked": obj_array([np.ma.masked_array([1.0, 2.0], mask=[0, 1])]),
        "matrix": obj_array([matrix]),
    }


def write(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in _extra().items():
        np.save(folder / f"{name}.npy", arr, allow_pickle=True)
    for case in CASES:
        if "big" not in case.tags:
            (folder / f"case_{case.name}.npy").write_bytes(case_bytes(case))
    print(f"numpy {np.__version__} wrote {len(list(folder.glob('*.npy')))} files to {folder}")


def _same(got: Any, want: Any) -> None:
    if isinstance(want, np.ndarray) and type(want) is not np.ndarray:  # matrix, recarray, masked
        assert type(got) is type(want), (type(got), type(want))
        assert got.dtype == want.dtype and got.dtype.type is want.dtype.type and got.shape == want.shape
        assert got.tobytes() == want.tobytes()
        if isinstance(want, np.ma.MaskedArray):
            assert np.array_equal(np.ma.getmaskarray(got), np.ma.getmaskarray(want))
        return
    try:
        assert_same_element(got, want)
    except TypeError:
        # numpy 1.x unpickling numpy 2's datetime dtype state leaves its metadata NULL: np.load's own
        # dtype then raises on .metadata/.descr; npystream builds a sound one, so compare what prints
        assert type(got) is type(want) and repr(got) == repr(want), (got, want)


def read(folder: Path) -> None:
    import npystream
    from npystream.formats.pickle_walk import speedups_active

    files = sorted(folder.glob("*.npy"))
    if not files:
        raise SystemExit(f"no .npy files in {folder}")
    checked = 0
    unreadable: list[str] = []
    for path in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                want = list(np.load(path, allow_pickle=True).flat)
            except (ValueError, ImportError) as exc:  # numpy 1.x cannot read some numpy 2 files
                unreadable.append(f"{path.name} ({type(exc).__name__}: {exc})")
                continue
        data = path.read_bytes()
        for trusted in (False, True):
            sources = {"path": path, "gzip": gzip.GzipFile(fileobj=io.BytesIO(gzip.compress(data)))}
            try:
                for name, src in sources.items():
                    got = list(npystream.iter_objects(src, trusted=trusted))
                    assert len(got) == len(want), (path.name, name, len(got), len(want))
                    for i, (g, w) in enumerate(zip(got, want)):
                        try:
                            _same(g, w)
                        except AssertionError as exc:
                            raise AssertionError(f"{path.name} via {name}, trusted={trusted}, element {i}: {exc}") from None
                    checked += len(got)
                if len(want) and np.load(path, allow_pickle=True, mmap_mode=None).ndim == 1:
                    with npystream.open(path, trusted=trusted) as arr:
                        for i, w in enumerate(want):
                            _same(arr[i], w)
            except npystream.UnsafePickleError as exc:
                if trusted or not path.stem.startswith(TRUSTED_ONLY) or "trusted=True" not in str(exc):
                    raise
    print(f"numpy {np.__version__} (C accelerator: {speedups_active()}) read {len(files) - len(unreadable)} files "
          f"({checked} elements) from {folder}: all equal to np.load")
    if unreadable:
        print(f"  {len(unreadable)} files np.load itself cannot read under this numpy: {'; '.join(unreadable)}")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("write", "read"):
        raise SystemExit("usage: cross_numpy.py write|read DIR")
    (write if sys.argv[1] == "write" else read)(Path(sys.argv[2]))
