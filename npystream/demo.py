"""``npystream demo``: the mission in under a minute, on generated data, with no other files.

1. generate a seeded object ``.npy`` of ragged float32 sequences (about
   300 MB; lengths uniform in [1,000, 49,000)) with :func:`save_objects`;
2. in a child process, ``np.load(allow_pickle=True)`` it and touch every
   element (``.sum()``), then time random reads from the loaded list;
3. in another child process, stream it with :func:`npystream.iter_objects`
   doing the same sums;
4. in a third, convert it to a ragged store (progress bar on stderr);
5. time random reads (``r[i].sum()``) from the store;
6. print a table.

Each child's peak *anonymous* memory (``RssAnon`` in ``/proc/PID/status``,
sampled every 2 ms by this process) is measured separately, so one side's
peak never pollutes the other's.  On systems without ``/proc`` the memory
column says ``n/a``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["run_demo", "measure", "generate", "Measured", "rss_anon"]

_LO, _HI = 1_000, 49_000  # element lengths, float32 items
_READS = 100_000


def rss_anon(pid: int | str = "self") -> int | None:
    """Current anonymous resident memory of a process in bytes (None if unknown)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class Measured:
    """A child process's exit code, wall time, peak RssAnon and parsed JSON output."""

    returncode: int
    wall: float
    peak: int | None
    out: dict[str, Any]
    stderr: str = ""


def measure(code: str, *args: str, interval: float = 0.002, capture_stderr: bool = True,
            env: dict[str, str] | None = None, stdin: Any = None) -> Measured:
    """Run ``python -c code args...`` while sampling its RssAnon; its last stdout line is JSON."""
    # `python -c` puts the working directory first on sys.path: a folder named npystream there
    # would shadow this one.  Drop that entry and import npystream from where we run.
    code = "import sys\nif sys.path[:1] == ['']:\n    del sys.path[0]\n" + code
    env = dict(os.environ if env is None else env)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(x for x in (root, env.get("PYTHONPATH", "")) if x)
    cmd = [sys.executable, "-c", code, *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=stdin,
                            stderr=subprocess.PIPE if capture_stderr else None, env=env)
    peak: int | None = None
    while proc.poll() is None:
        v = rss_anon(proc.pid)
        if v is not None:
            peak = v if peak is None else max(peak, v)
        time.sleep(interval)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    lines = out.decode().strip().splitlines()
    data: dict[str, Any] = {}
    if proc.returncode == 0 and lines:
        data = json.loads(lines[-1])
    return Measured(proc.returncode, wall, peak, data, (err or b"").decode(errors="replace"))


def _lengths(size_mb: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mean_bytes = (_LO + _HI) / 2 * 4
    n = max(1, int(size_mb * 1e6 / mean_bytes))
    return rng.integers(_LO, _HI, size=n)


def generate(path: str, size_mb: float = 300.0, seed: int = 0) -> int:
    """Write the demo file: seeded float32 sequences of random lengths; returns the element count."""
    from npystream.formats.objwriter import save_objects

    lengths = _lengths(size_mb, seed)
    rng = np.random.default_rng(seed + 1)

    def elements() -> Any:
        for n in lengths:
            yield rng.standard_normal(int(n), dtype=np.float32)

    return save_objects(path, elements(), length=len(lengths))


_LOAD_CHILD = """
import json, sys, time
import numpy as np
path, reads = sys.argv[1], int(sys.argv[2])
t0 = time.perf_counter()
arr = np.load(path, allow_pickle=True)
total = 0.0
for x in arr:
    total += float(x.sum())
t1 = time.perf_counter()
idx = np.random.default_rng(1).integers(0, len(arr), reads).tolist()
t2 = time.perf_counter()
for i in idx:
    arr[i].sum()
t3 = time.perf_counter()
print(json.dumps({"seconds": t1 - t0, "checksum": total, "n": len(arr), "read_us": (t3 - t2) / reads * 1e6}))
"""

_STREAM_CHILD = """
import json, sys, time
import npystream
path = sys.argv[1]
t0 = time.perf_counter()
total = 0.0
n = 0
for x in npystream.iter_objects(path):
    total += float(x.sum())
    n += 1
print(json.dumps({"seconds": time.perf_counter() - t0, "checksum": total, "n": n}))
"""

_CONVERT_CHILD = """
import json, sys, time
from npystream.conversion import convert
src, dst, progress = sys.argv[1], sys.argv[2], sys.argv[3]
res = convert(src, dst, overwrite=True, progress={"1": True, "0": False}[progress])
print(json.dumps({"seconds": res.seconds, "n": res.elements, "bytes_in": res.bytes_in,
                  "bytes_out": res.bytes_out}))
"""


def _mb(x: int | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:,.0f} MiB"


def _check(m: Measured, what: str) -> None:
    if m.returncode != 0:
        raise RuntimeError(f"demo step {what!r} failed (exit {m.returncode}):\n{m.stderr.strip()}")


def run_demo(directory: str | None = None, *, size_mb: float = 300.0, seed: int = 0,
             progress: bool | None = None, reads: int = _READS, out: Any = None) -> dict[str, Any]:
    """Run the whole demo, print the table to ``out`` (stdout); return the measured figures."""
    from npystream.formats.ragged import RaggedArray

    out = out if out is not None else sys.stdout
    show = sys.stderr.isatty() if progress is None else progress

    def say(msg: str) -> None:
        print(msg, file=out, flush=True)

    made_tmp = directory is None
    root = tempfile.mkdtemp(prefix="npystream-demo-") if made_tmp else os.path.abspath(directory)
    os.makedirs(root, exist_ok=True)
    src = os.path.join(root, "demo.npy")
    dst = os.path.join(root, "demo.ragged")
    try:
        say(f"npystream demo: working in {root}")
        t0 = time.perf_counter()
        n = generate(src, size_mb, seed)
        size = os.path.getsize(src)
        say(f"1. wrote {src}: {n:,} float32 arrays of {_LO:,}-{_HI:,} items, {size / 1e6:,.0f} MB "
            f"({time.perf_counter() - t0:.1f} s, npystream.save_objects, streaming)")
        say("2. np.load(allow_pickle=True) + a loop over the elements (child process) ...")
        load = measure(_LOAD_CHILD, src, str(reads))
        _check(load, "np.load")
        say("3. npystream.iter_objects: the same loop, streaming (child process) ...")
        stream = measure(_STREAM_CHILD, src)
        _check(stream, "iter_objects")
        same = load.out["checksum"] == stream.out["checksum"] and load.out["n"] == stream.out["n"]
        say(f"   checksums {'match' if same else 'DIFFER'}: {stream.out['checksum']:.6g} over {stream.out['n']:,} elements")
        say(f"4. npystream convert {os.path.basename(src)} {os.path.basename(dst)} (child process) ...")
        conv = measure(_CONVERT_CHILD, src, dst, "1" if show else "0", capture_stderr=not show)
        _check(conv, "convert")
        r = RaggedArray(dst)
        idx = np.random.default_rng(1).integers(0, len(r), reads).tolist()
        t1 = time.perf_counter()
        for i in idx:
            r[i].sum()
        read_us = (time.perf_counter() - t1) / reads * 1e6
        say(f"5. {reads:,} random reads r[i].sum() from the ragged store: {read_us:.1f} us each")
        rows = [
            ("np.load + loop", f"{load.out['seconds']:.2f} s", _mb(load.peak)),
            ("iter_objects (streaming)", f"{stream.out['seconds']:.2f} s", _mb(stream.peak)),
            ("convert -> ragged store", f"{conv.out['seconds']:.2f} s", _mb(conv.peak)),
            ("random r[i].sum(), np.load'ed", f"{load.out['read_us']:.1f} us", ""),
            ("random r[i].sum(), ragged store", f"{read_us:.1f} us", f"{_mb(rss_anon())} (this process)"),
        ]
        w0 = max(len(a) for a, _, _ in rows)
        say("")
        say(f"{'':{w0}}  {'time':>10}  peak anonymous memory")
        for a, b, c in rows:
            say(f"{a:{w0}}  {b:>10}  {c}")
        ratio = stream.out["seconds"] / load.out["seconds"] if load.out["seconds"] else float("nan")
        say(f"\nstreaming took {ratio:.2f}x np.load's time with "
            f"{(stream.peak or 0) / max(load.peak or 1, 1):.2f}x its memory; file {size / 1e6:,.0f} MB")
        return {
            "elements": n, "file_bytes": size, "load_s": load.out["seconds"], "load_peak": load.peak,
            "stream_s": stream.out["seconds"], "stream_peak": stream.peak, "convert_s": conv.out["seconds"],
            "convert_peak": conv.peak, "read_us_store": read_us, "read_us_list": load.out["read_us"],
            "checksums_match": same, "dir": root,
        }
    finally:
        if made_tmp:
            shutil.rmtree(root, ignore_errors=True)
