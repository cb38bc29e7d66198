"""Every hostile-input case, on the current code path, in a child with an address-space limit and a timeout.

The child (``hostile_child.run_case``) reports the outcome; this test checks
the exception type (an ``NpyStreamError`` of the expected class, never a
foreign one), that no code ran from the file (no process, no import through
pickle's own ``find_class``), and the case's time and memory bounds.
"""

from __future__ import annotations

import os

import pytest
from hostile_cases import CASES, Case
from hostile_child import run_case

LIMIT = 3 << 29  # 1.5 GiB of address space: numpy fits, a multi-GB allocation does not


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache: dict[str, dict[str, str]] = {}

    def get(case: Case) -> dict[str, str]:
        if case.name not in cache:
            d = tmp_path_factory.mktemp(case.name)
            cache[case.name] = case.build(str(d))
        return cache[case.name]

    return get


def check_outcome(case: Case, out: dict) -> None:
    assert out["outcome"] not in ("hang", "crash"), out
    unexpected = [e for e in out["events"] if e not in case.events]
    assert not unexpected, f"code ran from the file: {unexpected}"
    if case.raises:
        assert out["outcome"] == "raised", f"expected {case.raises}, got a normal end: {out}"
        assert out["npystream"], f"foreign exception {out['type']}: {out['message']}"
        assert set(case.raises) & set(out["mro"]), f"expected {case.raises}, got {out['mro'][0]}: {out['message']}"
    else:
        assert out["outcome"] == "ok", out
        assert case.check is not None and case.check(out["result"]), out["result"]
    assert out["elapsed"] < case.seconds, f"took {out['elapsed']:.1f} s (bound {case.seconds} s)"
    assert out["peak_anon"] < case.mbytes << 20, f"peak {out['peak_anon'] >> 20} MiB (bound {case.mbytes} MiB)"


# The README's test command runs the suite once per code path (NPYSTREAM_PURE_PYTHON=1 the second
# time): each case runs on the path of the current run, so both paths are covered once.
PURE = os.environ.get("NPYSTREAM_PURE_PYTHON", "").strip() not in ("", "0")


@pytest.mark.parametrize("case", CASES, ids=[f"item{c.item}-{c.name}" for c in CASES])
def test_hostile_case(case, built):
    pure = PURE
    if case.needs_fifo and not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    if "opcode-collisions" in case.tags:
        pytest.skip("known gap: dicts/sets built by SETITEMS/ADDITEMS opcodes are not yet bounded "
                    "(see docs/limits.md, 'Hash collisions')")
    out = run_case(case.code, built(case), pure=pure, limit=LIMIT, timeout=max(60.0, 4 * case.seconds))
    check_outcome(case, out)
