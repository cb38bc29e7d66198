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
import re
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
    for command in sub.choices.values():  # `npystream verify --debug A B` works too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show tracebacks on errors")
    return parser


# Library messages name Python arguments; on the command line they name the flags.
_FLAG_WORDS = (
    (re.compile(r"allowed_globals=\[?'([^'\]]+)'\]?"), r"--allow-global \1"),
    (re.compile(r"allowed_globals=\[[^\]]*\]"), "--allow-global MODULE.NAME"),
    (re.compile(r"\ballowed_globals\b"), "--allow-global"),
    (re.compile(r"\btrusted=True\b"), "--trusted"),
    (re.compile(r"\bencoding='(\w+)'"), r"--encoding \1"),
)


def _inputs(args: argparse.Namespace) -> str:
    """The input file(s) a command was given, for messages that do not carry a path."""
    names: list[str] = []
    for attr in ("file", "files", "src", "a", "b"):
        value = getattr(args, attr, None)
        names += value if isinstance(value, list) else [value] if isinstance(value, str) else []
    return ", ".join(names) or "input"


def cli_message(text: str) -> str:
    """An error message with Python argument names replaced by the CLI flags that set them.

    >>> cli_message("pass allowed_globals=['mymod.Point'] if you trust it, or trusted=True")
    'pass --allow-global mymod.Point if you trust it, or --trusted'
    """
    for pattern, repl in _FLAG_WORDS:
        text = pattern.sub(repl, text)
    return " ".join(text.split())  # one line


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
    except (NpyStreamError, OSError, ValueError, TypeError, EOFError, ImportError, MemoryError,
            RecursionError) as exc:
        if args.debug:
            traceback.print_exc()
        elif isinstance(exc, ImportError):  # an --allow-global / --trusted class this Python cannot import
            print(f"npystream {args.command}: error: {_inputs(args)}: a pickled object needs module "
                  f"{exc.name or '?'}, which cannot be imported here ({exc}); install it, or run where "
                  "it is importable", file=sys.stderr)
        else:
            print(f"npystream {args.command}: error: {cli_message(str(exc))}", file=sys.stderr)
        return 1
    except Exception as exc:  # anything else (zlib.error, BadZipFile...) is still one line, naming the input
        if args.debug:
            traceback.print_exc()
        else:
            print(f"npystream {args.command}: error: {_inputs(args)}: {type(exc).__name__}: "
                  f"{cli_message(str(exc))} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
