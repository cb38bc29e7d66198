"""``npystream verify A B``: compare two sources element by element (streaming); exit 1 on a difference."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    """Add the ``verify`` subcommand."""
    from npystream.cli.convert import add_safety_options

    p = subparsers.add_parser(
        "verify",
        help="compare two files/stores element by element; report the first difference",
        description="Compare two sources element by element with bounded memory: object .npy "
        "(.npy.gz, ARCHIVE.npz:MEMBER), ragged store, or fixed-dtype .npy (rows). Exit 0 when "
        "equal, 1 on the first difference.",
    )
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    add_safety_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print ``equal: N elements`` or the first difference."""
    from npystream.cli.convert import safety_options
    from npystream.verification import verify

    res = verify(args.a, args.b, **safety_options(args))
    if res.equal:
        print(f"equal: {res.count} elements")
        return 0
    print(f"differ: {res.message}")
    return 1
