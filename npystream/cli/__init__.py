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
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import Any

from npystream.errors import NpyStreamError

__all__ = ["main", "COMMANDS"]

# Explicit, ordered list (no plugin registry): module names under npystream.cli.
COMMANDS: tuple[str, ...] = ("info", "convert", "verify", "demo", "head", "index", "concat")


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


def _early_interrupt(signum: int, frame: object) -> None:
    try:
        sys.stderr.write("npystream: interrupted\n")
        sys.stderr.flush()
    finally:
        os._exit(130)


def _quit_on_interrupt() -> Any:
    """Make SIGINT end the process with 130 at once; the previous handler, or None if unchanged."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return None  # someone else's handler: leave it
    return signal.signal(signal.SIGINT, _early_interrupt)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (never calls sys.exit itself)."""
    if "numpy" not in sys.modules:
        # No command does linear algebra: one BLAS thread, so OpenBLAS (loaded with numpy)
        # does not start a thread per core that spins beside convert's write-behind helper
        # (`import npystream.conversion`, 5 fresh processes each: 0.16-0.22 s -> 0.15-0.16 s wall). A value the
        # user set wins.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # Ctrl-C while the commands' modules (numpy among them) are imported: numpy turns an
    # interrupt inside its C initialisation into a long ImportError.  From the command line
    # (argv None) such an early interrupt just ends the process with 130; nothing is open yet.
    previous = _quit_on_interrupt() if argv is None else None
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
            return int(exc.code or 0)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
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
