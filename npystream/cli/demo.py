"""``npystream demo [DIR]``: the main job in under a minute, on generated data."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    """Add the ``demo`` subcommand."""
    p = subparsers.add_parser(
        "demo",
        help="generate a ~300 MB object .npy and show np.load vs streaming, conversion, random reads",
        description="Generate a seeded object .npy of ragged float32 sequences, then measure np.load "
        "against streaming with iter_objects, convert it to a ragged store, read it at random, and "
        "print a table of what was measured.",
    )
    p.add_argument("dir", nargs="?", metavar="DIR", help="where to put the files (default: a temporary directory, removed at the end)")
    p.add_argument("--size-mb", type=float, default=300.0, help="approximate size of the generated file (default 300)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo; the table goes to stdout."""
    from npystream.demo import run_demo

    run_demo(args.dir, size_mb=args.size_mb, seed=args.seed, progress=None if not args.quiet else False)
    return 0
