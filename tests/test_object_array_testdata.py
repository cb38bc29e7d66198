"""numpy's own Python-2 / Python-3 object-array files (fixtures/numpy-testdata): np.load is the oracle."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from objcases import assert_same_elements

import npystream
from npystream import FormatError

NPY_FILES = ["py2-objarr.npy", "py2-np0-objarr.npy", "py3-objarr.npy"]
NPZ_FILES = ["py2-objarr.npz", "py3-objarr.npz"]




def _np_load(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.load(path, allow_pickle=True, **kw)


def _expected(path, encoding):
    return list(_np_load(path, encoding=encoding).flat)


@pytest.mark.parametrize("encoding", ["latin1", "bytes"])
@pytest.mark.parametrize("name", NPY_FILES)
def test_iter_objects_matches_np_load(numpy_testdata, name, encoding):
    path = numpy_testdata / name
    expected = _expected(path, encoding)
    assert_same_elements(npystream.iter_objects(path, encoding=encoding), expected)
    # the documented content, independently of np.load
    assert expected[0] is None and expected[1] is range and expected[2] == "\u512a\u826f"
    last = expected[3]
    if name.startswith("py3") or encoding == "bytes":
        assert last == b"\xe4\xb8\x8d\xe8\x89\xaf"
    else:
        assert last.encode("latin1") == b"\xe4\xb8\x8d\xe8\x89\xaf"


@pytest.mark.parametrize("encoding", ["latin1", "bytes"])
@pytest.mark.parametrize("name", NPY_FILES)
def test_random_access_matches_np_load(numpy_testdata, name, encoding):
    path = numpy_testdata / name
    expected = _expected(path, encoding)
    with npystream.open(path, encoding=encoding) as arr:
        assert len(arr) == len(expected) == 4
        assert arr.shape == (4,)
        assert_same_elements([arr[i] for i in (3, 0, 2, 1)], [expected[i] for i in (3, 0, 2, 1)])
        assert_same_elements(arr[::-1], expected[::-1])


def test_py3_file_any_encoding(numpy_testdata):
    path = numpy_testdata / "py3-objarr.npy"
    expected = _expected(path, "ASCII")
    for encoding in ("ASCII", "latin1", "bytes"):
        assert_same_elements(npystream.iter_objects(path, encoding=encoding), expected)


@pytest.mark.parametrize("name", ["py2-objarr.npy", "py2-np0-objarr.npy"])
def test_py2_default_ascii_encoding_fails_like_numpy(numpy_testdata, name):
    path = numpy_testdata / name
    with pytest.raises(UnicodeError):
        _np_load(path)
    got = []
    with pytest.raises(UnicodeError) as info:  # like np.load, and also one of ours
        for x in npystream.iter_objects(path):
            got.append(x)
    assert isinstance(info.value, FormatError)
    assert info.value.offset is not None and info.value.index == 3
    assert "encoding='latin1'" in str(info.value)
    assert got[:1] == [None]


@pytest.mark.parametrize("name", ["py2-objarr.npy", "py2-np0-objarr.npy"])
def test_py2_without_fix_imports_fails_like_numpy(numpy_testdata, name):
    path = numpy_testdata / name
    with pytest.raises(ImportError):
        _np_load(path, encoding="latin1", fix_imports=False)
    with pytest.raises(ImportError, match="__builtin__") as info:  # like np.load
        list(npystream.iter_objects(path, encoding="latin1", fix_imports=False))
    assert "fix_imports=True" in str(info.value)


@pytest.mark.parametrize("encoding", ["latin1", "bytes"])
@pytest.mark.parametrize("name", NPZ_FILES)
def test_npz_object_member(numpy_testdata, name, encoding):
    path = numpy_testdata / name
    expected = {k: list(v.flat) for k, v in _np_load(path, encoding=encoding).items()}
    with npystream.open(path, encoding=encoding) as archive:
        for key, exp in expected.items():
            member = archive[key]
            assert isinstance(member, npystream.ObjectArray)
            assert member.shape == (len(exp),)
            assert_same_elements(iter(member), exp)
            # stored (uncompressed) members allow random access
            assert_same_element_list = [member[i] for i in range(len(exp) - 1, -1, -1)]
            assert_same_elements(assert_same_element_list, exp[::-1])
