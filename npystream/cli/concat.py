"""``npystream concat SRC... -o DST [--axis N]``: join ``.npy`` files into one standard ``.npy``.

Along axis 0, whole C-order files are copied into DST in the kernel
(``copy_file_range``, else ``sendfile``): near ``cp`` speed, no data through
Python.  Other axes (and Fortran-order inputs) are streamed block by block.
DST appears only when complete (temp + rename); Ctrl-C or SIGTERM leaves
nothing behind (exit 130).  Progress on stderr as for ``convert``; exit codes
0 success, 1 bad input or refused, 2 usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    """Add the ``concat`` subcommand."""
    p = subparsers.add_parser(
        "concat",
        help="concatenate fixed-dtype .npy files into one .npy (no loading into memory)",
        description="Concatenate fixed-dtype .npy files (or ARCHIVE.npz:MEMBER) into one standard "
        ".npy; DST appears only when complete.",
    )
    p.add_argument("src", metavar="SRC", nargs="+", help="input .npy files, in order")
    p.add_argument("-o", "--output", dest="dst", metavar="DST", required=True, help="output .npy path")
    p.add_argument("--axis", type=int, default=0, help="axis to join along (default 0)")
    p.add_argument("--dtype", help="cast every input to this dtype (e.g. float64); streamed, not copied")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.add_argument("--durable", action="store_true", help="fsync DST before renaming it into place")
    from npystream.cli.convert import add_progress_options

    add_progress_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Join the files; print one summary line on stderr."""
    from npystream._atomic import signals_as_exceptions
    from npystream.cli.convert import progress_option
    from npystream.concatenation import ConcatArray

    progress = progress_option(args)
    t0 = time.perf_counter()
    with signals_as_exceptions():
        view = ConcatArray(args.src, axis=args.axis, dtype=args.dtype)
        try:
            kernel = view.copyable()
            view.save(args.dst, overwrite=args.overwrite, progress=progress, durable=args.durable)
        finally:
            view.close()
    seconds = time.perf_counter() - t0
    if not args.quiet:
        size = os.path.getsize(args.dst)
        how = "kernel copy" if kernel else "streamed"
        print(f"concatenated {len(args.src)} files -> {args.dst}: shape {view.shape} {view.dtype}, "
              f"{size / 1e6:.1f} MB, {seconds:.2f} s ({how})", file=sys.stderr)
    return 0
