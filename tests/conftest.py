"""Shared test fixtures: numpy's own object-array test files; a counter of offset-index scans."""

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


@pytest.fixture
def index_builds(monkeypatch):
    """A list that grows by one each time an offset index is scanned (pickle_walk._build_index)."""
    from npystream.formats import pickle_walk

    built: list[int] = []
    real = pickle_walk._build_index

    def spy(*args, **kw):
        built.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(pickle_walk, "_build_index", spy)
    return built



# Hypothesis profiles: "ci" (the default) keeps the suite fast on both backends; "dev" runs many
# more examples (`pytest --hypothesis-profile=dev tests/test_differential.py`).  Tests that set
# their own max_examples keep it.
from hypothesis import HealthCheck, settings  # noqa: E402

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile("ci", max_examples=25, deadline=None, suppress_health_check=_SLOW_OK)
settings.register_profile("dev", max_examples=2000, deadline=None, suppress_health_check=_SLOW_OK)
settings.load_profile("ci")
