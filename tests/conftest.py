"""Shared test fixtures: paths to numpy's own object-array test files."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Copied unchanged from numpy's test suite (BSD-3-Clause); see its README.md.
NUMPY_TESTDATA = ROOT / "fixtures" / "numpy-testdata"


@pytest.fixture(scope="session")
def numpy_testdata() -> Path:
    """Folder with numpy's py2/py3 object .npy/.npz test files."""
    return NUMPY_TESTDATA
