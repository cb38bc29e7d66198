"""check_dtype_state accepts every state numpy itself writes, and the checked state rebuilds the same dtype."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis.extra import numpy as hnp

from npystream.errors import UnsafePickleError
from npystream.formats.pickle_safety import DtypeProto, check_dtype, check_dtype_state

_DTYPES = hnp.nested_dtypes(
    subtype_strategy=hnp.scalar_dtypes() | hnp.byte_string_dtypes() | hnp.unicode_string_dtypes(),
    max_leaves=6,
    max_itemsize=512,
)


@settings(max_examples=200, deadline=None)
@given(d=_DTYPES)
def test_numpy_states_pass_and_rebuild(d: np.dtype) -> None:
    cls, args, state = d.__reduce__()
    assert cls is np.dtype
    checked = check_dtype_state(state)
    assert checked == state
    fresh = np.dtype(*args)
    fresh.__setstate__(checked)
    assert fresh == d and fresh.flags == d.flags and fresh.itemsize == d.itemsize
    assert check_dtype(fresh) == d
    proto = DtypeProto(np.dtype(*args))  # what BUILD runs in safe mode
    proto.__setstate__(state)
    assert proto.dtype == d and proto.dtype.flags == d.flags


@pytest.mark.parametrize(
    "d",
    [
        np.dtype("f4", metadata={"k": 1}),
        np.dtype("M8[3ms]"),
        np.dtype("m8[us]", metadata={"a": 1}),
        np.dtype([("t", "M8[s]"), ("o", "O")]),
        np.dtype({"names": ["a"], "formats": ["f4"], "titles": ["T"], "offsets": [0]}),
        np.dtype([("a", "f4"), ("b", "i1")], align=True),
        np.dtype(("f4", (2, 3))),
        np.dtype([("o", "O", (2,)), ("x", ">i8")]),
    ],
    ids=str,
)
def test_special_states_pass(d: np.dtype) -> None:
    state = d.__reduce__()[2]
    assert check_dtype_state(state) == state


@pytest.mark.parametrize(
    "state",
    [
        (3, "|", None, -1, -1, 63),  # numpy 2.4 segfaulted on this one
        (1, "<", None, 5, 8, 8),
        (3, "<", None, ("a",), {"a": (5, 0)}, 8, 1, 16),
        (3, "<", None, ("a", "b"), {"a": (np.dtype("f8"), 0)}, 8, 1, 16),
        (3, "|", (5, (2,)), None, None, 16, 8, 0),
        (3, "|", (np.dtype("f8"), (-1,)), None, None, 16, 8, 0),
        (4, "<", None, None, None, -1, -1, 0, (None, 5)),
        (3, "<", None, None, None, -1, -1, 2**40),
        (3, "<", None, None, {}, -1, -1, 0),
        (3, b"x", None, None, None, -1, -1, 0),
        ("3", "<", None, None, None, -1, -1, 0),
        (3, "<"),
        [3, "<", None, None, None, -1, -1, 0],
    ],
    ids=repr,
)
def test_forged_states_refused(state: object) -> None:
    with pytest.raises(UnsafePickleError, match="refused before numpy sees it"):
        check_dtype_state(state)
