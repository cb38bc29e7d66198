"""A short, fixed-seed run of the fuzz target (fuzz/fuzz_npystream.py) on the current code path.

Every input must end in a value or an NpyStreamError: no foreign exception,
no MemoryError under the worker's address-space limit, no hang, no crash.
Findings still open elsewhere are listed in KNOWN by their signature (outcome
and the innermost npystream function), with where they are being fixed; a
signature that no longer occurs should be removed from the list.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "fuzz"))
import fuzz_npystream  # noqa: E402

PURE = os.environ.get("NPYSTREAM_PURE_PYTHON", "").strip() not in ("", "0")
KNOWN: set[str] = set()  # the pipe window's MemoryError (issue 11 item 4) is fixed: the window grows as bytes arrive


@pytest.mark.slow
def test_fuzz_short_run_finds_nothing_new():
    result = fuzz_npystream.run(seed=1, seconds=50, max_inputs=400, timeout=20, limit=3 << 30)
    assert result["inputs"] >= 100, result  # the run really ran (a loaded machine still gets this far)
    new = [(outcome, origin) for outcome, origin, _ in result["findings"] if outcome not in KNOWN]
    assert not new, f"{len(new)} findings: {new[:10]}; counts {result['counts']}"


FINDINGS = sorted((Path(__file__).parent / "findings").glob("*.bin"))


@pytest.mark.parametrize("path", FINDINGS, ids=[p.stem for p in FINDINGS])
def test_fuzz_finding_ends_in_our_errors(path, tmp_path):
    """Inputs the fuzzer once found (a foreign exception, a hang, gigabytes) now end in NpyStreamErrors, fast."""
    from hostile_child import run_case

    code = f"""
import sys
sys.path.insert(0, {str(ROOT / "fuzz")!r})
import fuzz_npystream
result = fuzz_npystream.exercise(open(P['f'], 'rb').read(), P['work'])
"""
    out = run_case(code, {"f": str(path), "work": str(tmp_path / "input")}, pure=PURE,
                   limit=3 << 29, timeout=60)
    assert out["outcome"] == "ok", out  # exercise() raises anything outside the tree
    assert not out["events"], out["events"]
    assert out["elapsed"] < 10 and out["peak_anon"] < 300 << 20, out
