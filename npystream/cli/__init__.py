"""The ``npystream`` command: one subcommand per module in :data:`COMMANDS`.

Each subcommand module defines ``register(subparsers)``, which adds its
parser and sets ``func=run`` (``run(args) -> int``).  :func:`main` maps
errors to exit codes: 0 success, 1 bad input or refused, 2 usage error,
130 interrupted.  Tracebacks only with ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Sequence

from npystream.errors import NpyStreamError

__all__ = ["main", "COMMANDS"]

# Explicit, ordered list (no plugin registry): module names under npystream.cli.
COMMANDS: tuple[str, ...] = ("info", "convert", "verify", "demo", "head", "index")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="npystream",
        description="Stream, memory-map and convert NumPy files that np.load cannot open.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    from npystream import __version__

    parser.add_argument("--version", action="version", version=f"npystream {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"npystream.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (never calls sys.exit itself)."""
    if "numpy" not in sys.modules:
        # No command does linear algebra: one BLAS thread, so OpenBLAS (loaded with numpy)
        # does not start a thread per core that spins beside convert's write-behind helper
        # (`import npystream.conversion`, 5 fresh processes each: 0.16-0.22 s -> 0.15-0.16 s wall). A value the
        # user set wins.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("npystream: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `npystream head big.npy | head`: the reader went away; not an error.
        try:
            sys.stdout = None  # type: ignore[assignment]
        finally:
            return 0  # noqa: B012
    except (NpyStreamError, OSError, ValueError, TypeError) as exc:
        if args.debug:
            traceback.print_exc()
        else:
            print(f"npystream {args.command}: error: {exc}", file=sys.stderr)
        return 1
