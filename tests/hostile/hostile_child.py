"""Run one hostile-input case in a child process with an address-space limit and a timeout.

The child sets ``RLIMIT_AS``, installs an audit hook that records anything
that would run code from a file (process creation, ``os.system``, imports
resolved by pickle's own ``find_class``), samples its peak anonymous memory
(``RssAnon``) while the case runs, and prints one JSON line: the outcome
(``ok`` or the exception's class and whether it is an ``NpyStreamError``),
the message, the elapsed time and the peak.  The parent turns a timeout
into a failed case (a hang), and a signal into a crash.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

_CHILD = textwrap.dedent(
    r"""
    import json, os, resource, sys, threading, time
    spec = json.loads(sys.argv[1])
    limit = spec["limit"]
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import numpy as np
    import npystream
    import npystream.api, npystream.objects, npystream.object_array, npystream.formats.ragged
    import npystream.formats.npz, npystream.formats.fixed, npystream.verification, npystream.conversion
    import npystream.cli
    events = []
    WATCH = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "subprocess.Popen",
             "ctypes.dlopen", "pickle.find_class", "os.kill")

    def hook(event, args):
        if event in WATCH:
            events.append(f"{event} {args!r:.120}")

    def rss_anon():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    peak = [0]
    running = [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.005)

    base = rss_anon()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    sys.addaudithook(hook)
    ns = {"np": np, "npystream": npystream, "P": spec["paths"]}
    out = {"outcome": "ok"}
    t0 = time.perf_counter()
    try:
        exec(spec["code"], ns)
    except BaseException as exc:
        out = {
            "outcome": "raised",
            "type": type(exc).__name__,
            "mro": [c.__name__ for c in type(exc).__mro__],
            "npystream": isinstance(exc, npystream.NpyStreamError),
            "message": str(exc)[:2000],
            "cause": type(exc.__cause__).__name__ if exc.__cause__ is not None else None,
        }
    out["elapsed"] = time.perf_counter() - t0
    running[0] = False
    thread.join()
    out["peak_anon"] = max(peak[0], rss_anon()) - base
    out["events"] = events
    try:
        out["result"] = json.loads(json.dumps(ns.get("result")))
    except (TypeError, ValueError):
        out["result"] = repr(ns.get("result"))[:500]
    sys.stdout.write("\nRESULT " + json.dumps(out) + "\n")
    sys.stdout.flush()
    os._exit(0)
    """
)


def run_case(code: str, paths: dict[str, str], *, pure: bool, limit: int = 3 << 29, timeout: float = 60.0,
             cwd: str | None = None) -> dict[str, Any]:
    """Run ``code`` (with ``P``, ``np``, ``npystream`` in scope) in a limited child; its JSON report."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("NPYSTREAM_PURE_PYTHON", None)
    if pure:
        env["NPYSTREAM_PURE_PYTHON"] = "1"
    spec = json.dumps({"code": textwrap.dedent(code), "paths": paths, "limit": limit})
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, spec], capture_output=True, text=True,
                              env=env, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired:
        return {"outcome": "hang", "elapsed": timeout}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"outcome": "crash", "returncode": proc.returncode, "stderr": proc.stderr[-3000:]}
