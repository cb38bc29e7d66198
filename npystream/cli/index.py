"""``npystream index FILE...``: build the offset index of object .npy files and save it as FILE.nsidx.

One pass per file over the pickle's opcodes (payloads are skipped), the same
index ``ObjectArray`` builds on first random access, written atomically
beside the file as ``FILE.npy.nsidx``.  An index that is already up to date
(same size, mtime and header) is reported and kept unless ``--force``.
Prints one summary per file; a damaged, refused or unseekable (gzip, stdin)
file, or one whose index could not be written, gets one error line on stderr,
the other files are still indexed, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    """Add the ``index`` subcommand."""
    p = subparsers.add_parser(
        "index",
        help="build the offset index of object .npy files and save it beside them (FILE.nsidx)",
        description="Build the offset index of object-dtype .npy files (one pass over the pickle "
        "opcodes, payloads skipped) and save it atomically as FILE.nsidx, so that later "
        "random access (npystream.open(FILE)[i]) starts at once.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="an object-dtype .npy file")
    p.add_argument("--force", action="store_true", help="rebuild even if a saved index is up to date")
    p.add_argument("--encoding", default="ASCII", help="for Python 2 pickles: 'latin1' or 'bytes'")
    p.add_argument(
        "--allow-global", "--allow", dest="allow_global", action="append", default=[], metavar="MODULE.NAME",
        help="also allow this global while scanning (repeatable)",
    )
    p.add_argument("--trusted", action="store_true", help="no allow-list: only for files you trust")
    p.set_defaults(func=run)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _one(path: str, args: argparse.Namespace) -> bool:
    from npystream.errors import FormatError
    from npystream.formats.npy import open_with_header
    from npystream.object_array import ObjectArray

    src, header = open_with_header(path)
    if not header.pickled:
        src.close()
        raise FormatError(
            f"holds dtype {header.dtype} (fixed size, no pickle): it needs no index, "
            "npystream.open() memory-maps it",
            path=path,
        )
    opts = {"trusted": bool(args.trusted), "allowed_globals": tuple(args.allow_global), "encoding": args.encoding}
    with ObjectArray(src, header=header, zero_copy=False, **opts) as arr:
        t0 = time.perf_counter()
        arr.build_index(save=True, rebuild=bool(args.force))
        seconds = time.perf_counter() - t0
        state = arr.index_state
        size = src.size or 0
        print(
            f"{path}: {arr.size} element{'' if arr.size == 1 else 's'}, shape {arr.shape}, "
            f"dtype {arr.dtype}, {_human(size)}"
        )
        ipath = arr.index_path
        nbytes = os.path.getsize(ipath) if ipath and os.path.exists(ipath) else None
        if state == "loaded":
            print(f"  index: up to date, {ipath} ({_human(nbytes or 0)}), loaded in {seconds:.3f} s")
            return True
        if state == "saved":
            print(f"  index: built in {seconds:.3f} s, saved to {ipath} ({_human(nbytes or 0)})")
            return True
        print(
            f"npystream index: error: {path}: index built in {seconds:.3f} s but {ipath} could not be "
            "written (read-only directory or disk full); random access will rebuild it in memory",
            file=sys.stderr,
        )
        return False


def run(args: argparse.Namespace) -> int:
    """Index every file (a bad one is reported and skipped); 0 if all were indexed and saved, else 1."""
    from npystream.errors import NpyStreamError

    if len(args.files) == 1:
        return 0 if _one(args.files[0], args) else 1  # errors reach main (--debug shows the traceback)
    ok = True
    for path in args.files:
        try:
            ok = _one(path, args) and ok
        except (NpyStreamError, OSError, ValueError) as exc:
            print(f"npystream index: error: {exc}", file=sys.stderr)
            ok = False
    return 0 if ok else 1
