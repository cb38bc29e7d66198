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


# Test files that never reach the C accelerator: a run of the suite recorded every call into
# npystream._speedups (functions, the write-behind helper, the fast reconstructor) per file and
# these made none, nor start child processes that could.  The pure-Python pass of
# tests/run.sh (--skip-backend-independent) leaves them out: they already ran on the C pass.
# Add a file here only after checking the same way; when unsure, leave it out (it runs twice).
BACKEND_INDEPENDENT = frozenset({
    "test_architecture.py", "test_cli_concat.py", "test_cli_info.py", "test_concat.py",
    "test_demo.py", "test_fixed.py", "test_lazy.py", "test_npy_header.py", "test_npy_write.py",
    "test_objcases.py", "test_objwriter.py", "test_ragged_copy_range.py", "test_ragged_interop.py",
    "test_sources.py",
})


def pytest_addoption(parser):
    parser.addoption(
        "--skip-backend-independent", action="store_true",
        help="deselect the test files listed in conftest.BACKEND_INDEPENDENT (they never reach "
             "the C accelerator, so one backend's run covers them)",
    )


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--skip-backend-independent"):
        return
    keep = [i for i in items if i.path.name not in BACKEND_INDEPENDENT]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i.path.name in BACKEND_INDEPENDENT])
        items[:] = keep
