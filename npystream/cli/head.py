"""``npystream head FILE [-n N]``: the first elements of an object-dtype .npy, read safely.

Streams only the first ``N`` elements (default 10) of a pickled ``.npy``
(also gzip-compressed, or ``-`` for stdin) or of every object member of an
``.npz``, with the safe unpickler (``--allow-global MODULE.NAME``, alias ``--allow``, extends the
allow-list, ``--trusted`` turns it off for files you trust, ``--encoding``
for Python 2 files: the same flags as ``convert`` and ``verify``).  One line per
element: its index, its type (with shape/dtype/order for arrays, length for
containers) and a shortened repr.  Fixed-dtype files are described in one
line and pointed at ``npystream info``.
"""

from __future__ import annotations

import argparse
import itertools
import reprlib
import sys
from typing import Any

import numpy as np

from npystream.sources import sniff_path

__all__ = ["register", "run", "describe_element"]



def register(subparsers: Any) -> None:
    """Add the ``head`` subcommand."""
    p = subparsers.add_parser(
        "head",
        help="print the first elements of an object-dtype .npy (safe mode) with type/shape/dtype",
        description="Print the first elements of a pickled (object-dtype) .npy, .npy.gz or the "
        "object members of an .npz, streaming only what is shown. Safe by default: only the "
        "globals numpy writes are resolved.",
    )
    p.add_argument("file", metavar="FILE", help="a .npy, .npy.gz or .npz file ('-' = stdin)")
    p.add_argument("-n", "--lines", type=int, default=10, metavar="N", help="number of elements (default 10)")
    p.add_argument("--width", type=int, default=100, metavar="W", help="shorten each repr to about W characters")
    from npystream.cli.convert import add_safety_options

    add_safety_options(p)
    p.set_defaults(func=run)


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: max(width - 3, 1)] + "..."


def _repr(value: Any, width: int) -> str:
    r = reprlib.Repr()
    r.maxstring = max(width, 10)
    r.maxother = max(width, 10)
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = r.maxfrozenset = 8
    r.maxlong = 40
    return _shorten(r.repr(value), width)


def _order(arr: np.ndarray) -> str:
    if arr.flags.c_contiguous and arr.flags.f_contiguous:
        return "C/F"
    if arr.flags.c_contiguous:
        return "C"
    if arr.flags.f_contiguous:
        return "F"
    return "strided"


def describe_element(value: Any, width: int = 100) -> str:
    """``type [shape/dtype/len]: short repr`` for one element."""
    if isinstance(value, np.ndarray):
        with np.printoptions(threshold=8, edgeitems=3, linewidth=10**6):
            body = np.array2string(value, separator=", ") if value.dtype.names is None or value.size else repr(value)
        flags = "" if value.flags.writeable else ", read-only view"
        kind = type(value).__name__
        order = f" order={_order(value)}" if value.ndim >= 2 else ""
        return f"{kind} shape={value.shape} dtype={value.dtype}{order}{flags}: {_shorten(body, width)}"
    if isinstance(value, np.generic):
        return f"numpy.{type(value).__name__} dtype={value.dtype}: {_repr(value, width)}"
    kind = type(value).__name__
    module = type(value).__module__
    if module not in ("builtins", "__builtin__"):
        kind = f"{module}.{kind}"
    if isinstance(value, type):
        return f"type: {value.__module__}.{value.__qualname__}"
    if isinstance(value, (list, tuple, dict, set, frozenset, str, bytes, bytearray, range)):
        return f"{kind} len={len(value)}: {_repr(value, width)}"
    return f"{kind}: {_repr(value, width)}"


def _index_text(i: int, shape: tuple[int, ...]) -> str:
    if len(shape) <= 1:
        return f"[{i}]" if shape else "[()]"
    return "[" + ", ".join(str(int(k)) for k in np.unravel_index(i, shape)) + "]"


def _print_head(arr: Any, n: int, width: int, label: str) -> None:
    shape = arr.shape
    order = ", Fortran order" if arr.fortran_order else ""
    count = f"{arr.size} element" + ("" if arr.size == 1 else "s")
    print(f"{label}: object array, shape {shape}, dtype {arr.dtype}, {count}{order}")
    shown = 0
    for i, value in enumerate(itertools.islice(iter(arr.flat), n)):
        print(f"  {_index_text(i, shape)} {describe_element(value, width)}")
        shown += 1
    if arr.size > shown:
        print(f"  ... {arr.size - shown} more")


def run(args: argparse.Namespace) -> int:
    """Print the first elements; exit 0, or 1 on a bad or refused file (via main)."""
    if args.lines < 0:
        print("npystream head: error: -n must be >= 0", file=sys.stderr)
        return 2
    from npystream.formats.npy import open_with_header
    from npystream.object_array import ObjectArray

    path = args.file
    kind, _ = sniff_path(path)
    from npystream.cli.convert import safety_options

    opts = safety_options(args)
    if kind == "zip":
        from npystream.formats.npz import NpzArchive

        with NpzArchive(path) as archive:
            found = False
            for key in archive:
                info = archive.member_info(key)
                if info.header is None or not info.header.pickled:
                    continue
                found = True
                with ObjectArray(archive.member_source(key), nsidx=False, **opts) as arr:
                    _print_head(arr, args.lines, args.width, f"{path}[{key}]")
            if not found:
                print(f"{path}: no object-dtype members (see: npystream info {path})")
        return 0
    src, header = open_with_header(path)
    if not header.pickled:
        src.close()
        print(
            f"{path}: not an object array (shape {header.shape}, dtype {header.dtype}); "
            f"see: npystream info {path}"
        )
        return 0
    with ObjectArray(src, header=header, zero_copy=False, nsidx=False, **opts) as arr:
        _print_head(arr, args.lines, args.width, path)
    return 0
