"""Every module's doctests run (docstrings are the spec; their examples must stay true)."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "npystream"
# Modules whose examples need an optional package.
NEEDS = {"npystream.dask": "dask", "npystream.torch": "torch"}


def _module_names() -> list[str]:
    names = []
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__main__":
            continue  # running it is running the CLI
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


@pytest.mark.parametrize("name", _module_names())
def test_doctests(name):
    if name in NEEDS:
        pytest.importorskip(NEEDS[name])
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"


def test_the_examples_are_found():
    """The walk really finds examples (npy.py, sources.py and object_array.py have some)."""
    for name in ("npystream.formats.npy", "npystream.sources", "npystream.object_array"):
        assert doctest.testmod(importlib.import_module(name)).attempted > 0, name
