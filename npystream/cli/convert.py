"""``npystream convert SRC DST [options]``: one-shot conversion with bounded memory and atomic output.

See :mod:`npystream.conversion` for the directions.  Progress goes to stderr
(a tqdm bar when stderr is a terminal, ``--progress`` to force, ``--quiet``
to silence), then one summary line on stderr; stdout stays clean.  SIGTERM
is handled like Ctrl-C: the temporary output is removed, exit code 130.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["register", "run", "add_safety_options", "safety_options", "add_progress_options", "progress_option"]


def add_safety_options(p: argparse.ArgumentParser) -> None:
    """The safety policy's flags, spelled one way for every command that unpickles (convert, verify, head)."""
    p.add_argument("--trusted", action="store_true",
                   help="allow any pickle global (like np.load(allow_pickle=True)); only for files you trust")
    p.add_argument("--allow-global", "--allow", dest="allow_global", action="append", default=[],
                   metavar="MODULE.NAME",
                   help="allow one more pickle global in safe mode (repeatable), e.g. collections.OrderedDict")
    p.add_argument("--encoding", default="ASCII",
                   help="how Python 2 str pickles decode, as np.load: 'latin1' (numeric arrays written by "
                   "Python 2), 'bytes' or the default 'ASCII'")


def add_progress_options(p: argparse.ArgumentParser) -> None:
    """``--quiet`` / ``--progress``, spelled one way for every command that writes (convert, concat)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary line")
    g.add_argument("--progress", action="store_true", help="show the progress bar even when stderr is not a terminal")


def progress_option(args: argparse.Namespace) -> bool | None:
    """``progress=`` for the writers: False (quiet), True (forced) or None (a bar on a terminal)."""
    return False if args.quiet else (True if args.progress else None)


def safety_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of the safety policy from :func:`add_safety_options`' flags."""
    return {"trusted": bool(args.trusted), "allowed_globals": tuple(args.allow_global),
            "encoding": args.encoding}


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return n


def register(subparsers: Any) -> None:
    """Add the ``convert`` subcommand."""
    from npystream.conversion import SUPPORTED

    p = subparsers.add_parser(
        "convert",
        help="convert object .npy <-> ragged store, .npz -> .npy files, .npy.gz -> .npy",
        description="Convert between formats with bounded memory; DST appears only when complete. "
        f"Supported: {SUPPORTED}.",
    )
    p.add_argument("src", metavar="SRC", help="input: .npy, .npy.gz, ARCHIVE.npz[:MEMBER], a ragged store, or - (stdin)")
    p.add_argument("dst", metavar="DST", help="output path (NAME.ragged, NAME.npy, or a directory for --to npz-dir)")
    p.add_argument("--to", choices=("ragged", "npy", "npz-dir"), help="output format (default: from SRC and DST's suffix)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted conversion into a ragged store (and keep the partial store if interrupted again)")
    add_safety_options(p)
    p.add_argument("--kind", choices=("array", "str", "bytes", "object"),
                   help="ragged element kind (default: from the first element); 'object' pickles each element")
    p.add_argument("--cast", choices=("equiv", "safe", "same_kind", "unsafe"),
                   help="allow elements of other dtypes to be cast to the store's dtype under this numpy casting rule")
    p.add_argument("--durable", action="store_true", help="fsync the output before renaming it into place (and a ragged store at every commit); slower")
    p.add_argument("--verify", action="store_true", help="compare DST with SRC element by element afterwards")
    p.add_argument("--workers", type=_positive, default=1, metavar="N",
                   help="convert a plain object .npy to a ragged store on N local processes (default 1)")
    add_progress_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run one conversion; print the summary line on stderr."""
    from npystream._atomic import signals_as_exceptions
    from npystream.conversion import convert

    progress = progress_option(args)
    with signals_as_exceptions():
        res = convert(
            args.src, args.dst, to=args.to, overwrite=args.overwrite, resume=args.resume,
            **safety_options(args), kind=args.kind,
            cast=args.cast, durable=args.durable, progress=progress, verify=args.verify,
            workers=args.workers,
        )
    if not args.quiet:
        for note in res.notes:
            print(f"npystream convert: {note}", file=sys.stderr)
        print(res.summary(), file=sys.stderr)
    return 0
