"""Fuzz npystream's readers: every input must end in a value or an ``NpyStreamError``.

Inputs come from two generators over valid seeds:

* a **mutation fuzzer**: ``.npy`` (object and fixed dtypes, every pickle
  protocol numpy writes), ``.npz`` (stored and deflated) and ``.npy.gz``
  seeds, damaged by bit flips, interesting bytes, length fields set to
  huge values, chunk deletion/duplication/insertion, splices and cuts;
* a **structure-aware pickle generator**: random object trees (nested
  containers, big ints, floats, strings, bytes, arrays, numpy scalars,
  sets) saved by ``np.save``, plus hand-assembled elements that call the
  allow-listed callables (``set``, ``frozenset``, ``range``, ``bytes``,
  ``bytearray``, ``complex``, ``slice``) with random arguments and memo
  operations with random indices.

Each input runs through the readers (``iter_objects`` on a path and on a
forward-only stream, ``open()[i]``, ``iter_batches``, ``NpzArchive.load``)
in a worker process with an address-space limit; the parent kills a worker
that takes longer than ``--timeout`` seconds on one input.  Outcome classes:
``ok``, ``npystream:<ErrorClass>`` (fine), and the findings: ``foreign:<type>``
(an exception outside the tree), ``memory`` (``MemoryError``), ``hang`` and
``crash:<signal>``.  Findings are written to ``--out`` (one file per input
with its class in the name) so they can become tests.

Short, deterministic run (CI, ``tests/hostile/test_fuzz_short.py``)::

    python fuzz/fuzz_npystream.py --seed 1 --seconds 30

Long run (documented in ``docs/limits.md``)::

    nice python fuzz/fuzz_npystream.py --seed 7 --seconds 1800 --out fuzz/findings

With ``atheris`` installed, ``--atheris`` runs the same target under
libFuzzer instead (coverage-guided; libFuzzer's own ``-rss_limit_mb`` and
``-timeout`` options apply; remaining arguments go to libFuzzer)::

    python fuzz/fuzz_npystream.py --atheris -- -max_total_time=1800 -rss_limit_mb=2048 -timeout=20
"""

from __future__ import annotations

import argparse
import collections
import gzip
import io
import json
import os
import pickle
import random
import resource
import struct
import sys
import tempfile
import time
from multiprocessing import get_context
from typing import Any

import numpy as np

MAX_ELEMENTS = 2000  # elements read per input and reader (keeps one input well under a second)
PROTOCOLS = (2, 3, 4, 5)


# ---------------------------------------------------------------------------
# seeds


def _npy(arr: np.ndarray, protocol: int | None = None) -> bytes:
    buf = io.BytesIO()
    if protocol is None:
        np.save(buf, arr, allow_pickle=True)
    else:
        np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(arr))
        pickle.dump(arr, buf, protocol=protocol)
    return buf.getvalue()


def random_object(rng: random.Random, depth: int = 0) -> Any:
    """A random object of the kinds users keep in object arrays."""
    kinds = ["int", "bigint", "float", "str", "bytes", "none", "bool", "array", "scalar", "complex"]
    if depth < 4:
        kinds += ["list", "tuple", "dict", "set", "frozenset", "objarray"]
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.randint(-1000, 1000)
    if kind == "bigint":
        return rng.randint(-(2**130), 2**130)
    if kind == "float":
        return rng.choice([0.0, -1.5, 1e300, float("inf"), float("nan"), rng.random()])
    if kind == "complex":
        return complex(rng.random(), rng.random())
    if kind == "str":
        return "".join(rng.choice("ab\u00e9\u4e2d\U0001f600") for _ in range(rng.randint(0, 12)))
    if kind == "bytes":
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 12)))
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "array":
        dt = rng.choice(["<i4", ">f8", "u1", "<c8", "U3", "S2", "?", "<M8[s]", "V3", [("a", "<i2"), ("b", "f4")]])
        shape = tuple(rng.randint(0, 3) for _ in range(rng.randint(0, 3)))
        return np.zeros(shape, dtype=dt)
    if kind == "scalar":
        return rng.choice([np.int64(5), np.float32(1.5), np.bool_(True), np.str_("x"), np.datetime64(1, "s")])
    n = rng.randint(0, 4)
    if kind == "list":
        return [random_object(rng, depth + 1) for _ in range(n)]
    if kind == "tuple":
        return tuple(random_object(rng, depth + 1) for _ in range(n))
    if kind == "dict":
        return {rng.choice([rng.randint(0, 50), f"k{rng.randint(0, 50)}"]): random_object(rng, depth + 1) for _ in range(n)}
    if kind == "set":
        return {rng.randint(0, 100) for _ in range(n)}
    if kind == "frozenset":
        return frozenset(rng.randint(0, 100) for _ in range(n))
    arr = np.empty(n, dtype=object)
    for i in range(n):
        arr[i] = random_object(rng, depth + 1)
    return arr


def object_seed(rng: random.Random) -> bytes:
    n = rng.choice([0, 1, 2, 3, 5, 8, 1001])
    arr = np.empty(n, dtype=object)
    for i in range(n):
        arr[i] = random_object(rng) if n < 100 else rng.choice([i, f"s{i}", None, np.zeros(2)])
    if n == 6 and rng.random() < 0.5:
        arr = arr.reshape(2, 3)
    return _npy(arr, rng.choice(PROTOCOLS))


def fixed_seed(rng: random.Random) -> bytes:
    dt = rng.choice(["<i4", ">f8", "u1", "<c16", "U2", "S3", "?", "<m8[ms]", "V0", "V2", [("a", "<i2"), ("b", ">f4", (2,))]])
    shape = tuple(rng.randint(0, 4) for _ in range(rng.randint(0, 3)))
    arr = np.zeros(shape, dtype=dt)
    if rng.random() < 0.3:
        arr = np.asfortranarray(arr)
    return _npy(arr)


def npz_seed(rng: random.Random) -> bytes:
    buf = io.BytesIO()
    members = {f"m{i}": np.arange(rng.randint(0, 40), dtype=rng.choice(["<i4", ">f8", "u1"])) for i in range(rng.randint(1, 3))}
    (np.savez_compressed if rng.random() < 0.5 else np.savez)(buf, **members)
    return buf.getvalue()


def gzip_seed(rng: random.Random) -> bytes:
    inner = object_seed(rng) if rng.random() < 0.5 else fixed_seed(rng)
    return gzip.compress(inner, mtime=0)


# hand-assembled elements that call the allow-listed callables (protocol 3 text GLOBALs)

def _glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _int(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _interesting_int(rng: random.Random) -> int:
    return rng.choice([0, 1, -1, 255, 2**31 - 1, 2**32, 2**62, -(2**62), 2**63, 10**6, 2**61 - 1, rng.randint(-9, 99)])


def _envelope(elements: list[bytes]) -> bytes:
    state = b"(" + _int(3) + b"X\x01\x00\x00\x00|NNN" + _int(-1) + _int(-1) + _int(63) + b"t"
    dtype = _glob("numpy", "dtype") + b"X\x02\x00\x00\x00O8\x89\x88\x87R" + state + b"b"
    head = _glob("numpy._core.multiarray", "_reconstruct") + _glob("numpy", "ndarray") + b"K\x00\x85C\x01b\x87R"
    shape = _int(len(elements)) + b"\x85"
    body = b"(" + b"".join(elements) + b"e" if elements else b""
    pickle = b"\x80\x03" + head + b"(" + _int(1) + shape + dtype + b"\x89]" + body + b"tb."
    return _header(len(elements)) + pickle


def _header(n: int) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": (n,)})
    return buf.getvalue()


def callable_element(rng: random.Random) -> bytes:
    """One element calling allow-listed callables with random (often hostile) arguments."""
    choice = rng.randrange(7)
    if choice == 0:
        args = [_int(_interesting_int(rng)) for _ in range(rng.randint(1, 3))]
        inner = _glob("builtins", "range") + b"".join(args) + bytes([0x84 + len(args)]) + b"R"
        return _glob("builtins", rng.choice(["set", "frozenset"])) + inner + b"\x85R"
    if choice == 1:
        return _glob("builtins", rng.choice(["bytes", "bytearray"])) + _int(_interesting_int(rng)) + b"\x85R"
    if choice == 2:
        return _glob("builtins", "range") + _int(_interesting_int(rng)) + b"\x85R"
    if choice == 3:  # memo ops with random indices
        idx = rng.choice([0, 1, 5, 255, 2**31, 2**32 - 1])
        return b"N" + (b"r" + struct.pack("<I", idx)) + b"0" + (b"j" + struct.pack("<I", idx))
    if choice == 4:  # a set of colliding ints
        p = 2**61 - 1
        items = b"".join(_int(k * p) for k in range(1, rng.randint(2, 200)))
        return _glob("builtins", "set") + b"(" + items + b"l\x85R"
    if choice == 5:
        return _glob("builtins", "complex") + _int(_interesting_int(rng)) + _int(1) + b"\x86R"
    return _glob("builtins", "slice") + _int(1) + _int(2) + _int(3) + b"\x87R"


def callable_seed(rng: random.Random) -> bytes:
    return _envelope([callable_element(rng) for _ in range(rng.randint(1, 3))])


SEEDS = (object_seed, object_seed, fixed_seed, npz_seed, gzip_seed, callable_seed)


# ---------------------------------------------------------------------------
# mutations

_HUGE = [0xFF, 0x7F, 0x80, 0x00, 0x01, 0x10]


def mutate(data: bytes, rng: random.Random, pool: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice([1, 1, 1, 2, 3, 8])):
        if not buf:
            buf += bytes([rng.randrange(256)])
            continue
        op = rng.randrange(9)
        pos = rng.randrange(len(buf))
        if op == 0:
            buf[pos] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[pos] = rng.choice(_HUGE + [rng.randrange(256)])
        elif op == 2:  # a length field gets huge
            width = rng.choice([1, 2, 4, 8])
            buf[pos : pos + width] = bytes([rng.choice([0xFF, 0x7F])] * width)
        elif op == 3:
            del buf[pos : pos + rng.randint(1, 16)]
        elif op == 4:
            chunk = buf[pos : pos + rng.randint(1, 32)]
            buf[pos:pos] = chunk * rng.randint(1, 4)
        elif op == 5:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 6:
            other = rng.choice(pool) if pool else b""
            if other:
                a = rng.randrange(len(other))
                buf[pos:] = other[a : a + rng.randint(1, 200)] + buf[pos:]
        elif op == 7:
            del buf[pos:]
        else:  # opcode-ish bytes the pickle engine cares about
            buf[pos] = rng.choice(b"()]}.0ehjqrbtuRs\x85\x86\x87\x8a\x8f\x90\x91\x94\x95X")
    return bytes(buf)


def generate(rng: random.Random, pool: list[bytes]) -> tuple[str, bytes]:
    gen = rng.choice(SEEDS)
    seed = gen(rng)
    if rng.random() < 0.15:
        return gen.__name__, seed
    if gen is gzip_seed and rng.random() < 0.6:  # damage the inner file, then compress
        return "gzip_inner", gzip.compress(mutate(gzip.decompress(seed), rng, pool), mtime=0)
    return gen.__name__ + "+mut", mutate(seed, rng, pool)


# ---------------------------------------------------------------------------
# the target


class _Forward(io.RawIOBase):
    """A forward-only stream over bytes (exercises the pipe readers)."""

    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        return self._f.readinto(b)


def _drain(it: Any) -> int:
    n = 0
    for _ in it:
        n += 1
        if n >= MAX_ELEMENTS:
            break
    close = getattr(it, "close", None)
    if close is not None:
        close()
    return n


def exercise(data: bytes, path: str) -> list[str]:
    """Run every reader on ``data`` (also written to ``path``): the names of the NpyStreamErrors they raised.

    Any other exception propagates (a finding).
    """
    import npystream

    with open(path, "wb") as f:
        f.write(data)
    errors: list[BaseException] = []

    def attempt(fn: Any) -> None:
        try:
            fn()
        except npystream.NpyStreamError as exc:
            errors.append(exc)

    head = data[:6]
    if head[:2] == b"PK":
        def npz() -> None:
            with npystream.NpzArchive(path) as arch:
                for name in list(arch)[:4]:
                    attempt(lambda name=name: arch.load(name))
        attempt(npz)
        return [type(e).__name__ for e in errors]
    attempt(lambda: _drain(npystream.iter_objects(path)))
    attempt(lambda: _drain(npystream.iter_objects(_Forward(data))))
    attempt(lambda: _drain(npystream.iter_batches(path, 64)))
    attempt(lambda: _drain(npystream.iter_batches(io.BufferedReader(_Forward(data)), 64)))

    def random_access() -> None:
        obj = npystream.open(path)
        try:
            n = len(obj) if hasattr(obj, "__len__") and getattr(obj, "ndim", 1) else 0
            for i in (0, n - 1, n // 2):
                if 0 <= i < n:
                    obj[i]
        finally:
            close = getattr(obj, "close", None)
            if close is not None:
                close()
            del obj
    attempt(random_access)
    return [type(e).__name__ for e in errors]


# ---------------------------------------------------------------------------
# the supervised loop


def where(exc: BaseException) -> str:
    """``module.function`` of the innermost npystream frame an exception passed through (its signature)."""
    import traceback

    found = "?"
    for frame in traceback.extract_tb(exc.__traceback__):
        parts = frame.filename.replace(os.sep, "/").split("/npystream/")
        if len(parts) > 1 and "/fuzz/" not in frame.filename:
            found = f"{parts[-1][:-3].replace('/', '.')}.{frame.name}"
    return found


def _worker(conn: Any, seed: int, limit: int, tmpdir: str) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import npystream  # noqa: F401 - imported before the first input, outside its time

    rng = random.Random(seed)
    pool: list[bytes] = []
    path = os.path.join(tmpdir, f"input-{os.getpid()}")
    while True:
        origin, data = generate(rng, pool)
        if len(pool) < 64:
            pool.append(data)
        else:
            pool[rng.randrange(64)] = data
        conn.send_bytes(origin.encode() + b"\0" + data)
        try:
            raised = exercise(data, path)
            outcome = f"npystream:{raised[0]}" if raised else "ok"
        except MemoryError as exc:
            outcome = f"memory@{where(exc)}"
        except Exception as exc:  # the finding: an exception outside the tree
            outcome = f"foreign:{type(exc).__name__}@{where(exc)}"
            if os.environ.get("FUZZ_TRACE"):
                import traceback

                traceback.print_exc()
        conn.send(outcome)


def run(seed: int, seconds: float, *, timeout: float = 20.0, limit: int = 3 << 30, out: str | None = None,
        max_inputs: int | None = None) -> dict[str, Any]:
    """Fuzz for ``seconds`` (or ``max_inputs``); return counts by outcome class and the findings."""
    ctx = get_context("spawn")
    counts: collections.Counter[str] = collections.Counter()
    findings: list[tuple[str, str, bytes]] = []
    end = time.monotonic() + seconds
    worker_seed = seed
    total = 0
    with tempfile.TemporaryDirectory(prefix="npystream-fuzz-") as tmpdir:
        while time.monotonic() < end and (max_inputs is None or total < max_inputs):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, worker_seed, limit, tmpdir), daemon=True)
            proc.start()
            child.close()
            worker_seed += 1_000_003  # a restarted worker continues with fresh inputs, still reproducible
            while time.monotonic() < end and (max_inputs is None or total < max_inputs):
                if not parent.poll(max(0.1, end - time.monotonic()) + timeout):
                    break
                try:
                    raw = parent.recv_bytes()
                except EOFError:
                    break
                origin, _, data = raw.partition(b"\0")
                if not parent.poll(timeout):
                    outcome = "hang" if proc.is_alive() else f"crash:{proc.exitcode}"
                else:
                    try:
                        outcome = parent.recv()
                    except EOFError:
                        proc.join(1)
                        outcome = f"crash:{proc.exitcode}"
                total += 1
                counts[outcome] += 1
                if outcome != "ok" and not outcome.startswith("npystream:"):
                    findings.append((outcome, origin.decode(), data))
                    if out:
                        os.makedirs(out, exist_ok=True)
                        name = f"{outcome.replace(':', '-').replace('@', '-at-')}-{seed}-{total}.bin"
                        with open(os.path.join(out, name), "wb") as f:
                            f.write(data)
                if outcome == "hang" or outcome.startswith("crash"):
                    break
            proc.kill()
            proc.join()
            parent.close()
    return {"seed": seed, "inputs": total, "counts": dict(counts), "findings": findings}


def replay(files: list[str]) -> int:
    """Run saved inputs (findings) through the target in this process; print each outcome and any traceback."""
    import traceback

    bad = 0
    with tempfile.TemporaryDirectory(prefix="npystream-replay-") as tmpdir:
        path = os.path.join(tmpdir, "input")
        for name in files:
            with open(name, "rb") as f:
                data = f.read()
            try:
                raised = exercise(data, path)
                print(f"{name}: {'npystream:' + raised[0] if raised else 'ok'}")
            except Exception as exc:
                bad += 1
                print(f"{name}: foreign:{type(exc).__name__}")
                traceback.print_exc(limit=-4)
    return 1 if bad else 0


def _atheris_main(argv: list[str]) -> None:  # pragma: no cover - needs atheris
    """libFuzzer over the same target, coverage-guided, starting from a corpus of generated seeds."""
    import atheris

    with atheris.instrument_imports(include=["npystream"]):
        import npystream.api  # noqa: F401 - every reader the target reaches, instrumented
        import npystream.formats.fixed  # noqa: F401
        import npystream.formats.npz  # noqa: F401
        import npystream.formats.pickle_stream  # noqa: F401
        import npystream.formats.pickle_walk  # noqa: F401
        import npystream.formats.ragged  # noqa: F401
        import npystream.object_array  # noqa: F401
        import npystream.objects  # noqa: F401
    workdir = tempfile.mkdtemp(prefix="npystream-atheris-")
    path = os.path.join(workdir, "input")
    if not any(not a.startswith("-") for a in argv):  # no corpus directory given: seed one
        corpus = os.path.join(workdir, "corpus")
        os.makedirs(corpus)
        rng = random.Random(0)
        for i in range(200):
            with open(os.path.join(corpus, f"seed-{i}"), "wb") as f:
                f.write(rng.choice(SEEDS)(rng))
        argv = [*argv, corpus]

    def one(data: bytes) -> None:
        exercise(data, path)

    atheris.Setup([sys.argv[0], *argv], one)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--max-inputs", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds one input may take")
    parser.add_argument("--limit-mb", type=int, default=3072, help="address-space limit of the worker")
    parser.add_argument("--out", default=None, help="directory for the findings")
    parser.add_argument("--atheris", action="store_true", help="run under atheris/libFuzzer instead")
    parser.add_argument("--replay", nargs="+", metavar="FILE", help="run saved inputs once each (in this process)")
    args, rest = parser.parse_known_args(argv)
    if args.replay:
        return replay(args.replay)
    if args.atheris:
        _atheris_main([a for a in rest if a != "--"])
        return 0
    result = run(args.seed, args.seconds, timeout=args.timeout, limit=args.limit_mb << 20, out=args.out,
                 max_inputs=args.max_inputs)
    findings = collections.Counter((o, origin) for o, origin, _ in result["findings"])
    print(json.dumps({"seed": result["seed"], "inputs": result["inputs"], "counts": result["counts"],
                      "findings": {f"{o} from {g}": c for (o, g), c in findings.items()}}, indent=1))
    return 1 if result["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
