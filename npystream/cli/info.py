"""``npystream info FILE... [--json]``: what a .npy / .npy.gz / .npz says about itself.

Reads headers only (and the zip central directory), never the data.  Exit 0
when every file is fine; a bad file (unreadable header, data shorter than the
header promises) gives one line on stderr and exit 1, after the other files
were described.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np

from npystream.errors import NpyStreamError, TruncatedError
from npystream.formats.npy import NpyHeader, read_header
from npystream.formats.npz import NpzArchive
from npystream.sources import open_source, sniff_path

__all__ = ["register", "run", "describe"]



def register(subparsers: Any) -> None:
    """Add the ``info`` subcommand."""
    p = subparsers.add_parser(
        "info",
        help="show the header of .npy/.npz files (shape, dtype, order, sizes, compression)",
        description="Show what .npy, .npy.gz and .npz files say about themselves "
        "(headers and zip directory only; the data is not read).",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="a .npy, .npy.gz or .npz file ('-' = stdin)")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per file")
    p.set_defaults(func=run)


def _dtype_text(dtype: np.dtype) -> str:
    return str(dtype) if dtype.fields is not None or dtype.subdtype is not None else (
        f"{dtype.str} ({dtype.name})"
    )


def _header_fields(h: NpyHeader) -> dict[str, Any]:
    return {
        "version": f"{h.version[0]}.{h.version[1]}",
        "shape": list(h.shape),
        "count": h.count,
        "dtype": np.lib.format.dtype_to_descr(h.dtype),
        "dtype_text": _dtype_text(h.dtype),
        "fortran_order": h.fortran_order,
        "data_offset": h.data_offset,
        "pickled": h.pickled,
        "nbytes": h.nbytes,
    }


def describe(path: str) -> dict[str, Any]:
    """A JSON-able description of one file or ragged store; raises NpyStreamError/OSError on a bad one."""
    if path != "-" and os.path.isdir(path):
        from npystream.formats.ragged import describe_store

        store = describe_store(path)
        return {**store, "path": path, "kind": "ragged", "kind_of_elements": store["kind"]}
    kind, _ = sniff_path(path)
    if kind == "zip":
        with NpzArchive(path) as archive:
            members = []
            for key in archive:
                m = archive.member_info(key)
                entry: dict[str, Any] = {
                    "name": m.name,
                    "filename": m.filename,
                    "compression": m.compression,
                    "file_size": m.file_size,
                    "compress_size": m.compress_size,
                    "can_memmap": m.can_memmap,
                    "data_offset_in_zip": m.data_offset,
                    "error": m.error,
                }
                if m.header is not None:
                    entry.update(_header_fields(m.header))
                members.append(entry)
        return {"path": path, "kind": "npz", "members": members}
    compression = "gzip" if kind == "gzip" else None
    with open_source(path) as src:
        header = read_header(src)
        size = src.size if compression is None else None
    out: dict[str, Any] = {"path": path, "kind": "npy", "compression": compression}
    out.update(_header_fields(header))
    out["file_size"] = size
    out["expected_size"] = header.expected_size
    status = "unchecked"
    if size is not None and header.expected_size is not None:
        status = "ok" if size == header.expected_size else (
            "truncated" if size < header.expected_size else "trailing bytes"
        )
    out["size_status"] = status
    return out


def _text(d: dict[str, Any]) -> str:
    if d["kind"] == "ragged":
        lengths = (
            f"{d['min_length']}-{d['max_length']} items per element" if d["count"] else "empty"
        )
        rows = [
            ("format", f"ragged store, {d['format']} v{d['version']}"),
            ("elements", f"{d['count']} ({lengths})"),
            ("kind", d["kind_of_elements"]),
            ("dtype", d["dtype_text"]),
            ("ndim", str(d["ndim"])),
            ("data", f"{d['nbytes']} bytes in {d['nitems']} items"),
            ("parts", ", ".join(f"{k} ({v} bytes)" for k, v in d["parts"].items())),
        ]
        return "\n".join([d["path"], *(f"  {k:<12}{v}" for k, v in rows)])
    if d["kind"] == "npz":
        count = len(d["members"])
        lines = [f"{d['path']}: .npz archive, {count} member{'' if count == 1 else 's'}"]
        width = max((len(m["name"]) for m in d["members"]), default=4)
        for m in d["members"]:
            if m.get("shape") is None:
                what = f"not a .npy: {m['error']}"
            else:
                shape = tuple(m["shape"])
                what = f"shape {shape}, dtype {m['dtype_text']}"
                if m["fortran_order"]:
                    what += ", Fortran order"
                if m["pickled"]:
                    what += ", pickled objects"
            if m["can_memmap"]:
                mm = "memmap: yes"
            elif m.get("pickled"):
                mm = "memmap: no (objects: ObjectArray)"
            else:
                mm = "memmap: no (use load/iter_batches)"
            lines.append(
                f"  {m['name']:<{width}}  {m['compression']:<8}  {mm:<36}  {what}"
                f"  [{m['compress_size']} bytes in zip]"
            )
        return "\n".join(lines)
    shape = tuple(d["shape"])
    if d["file_size"] is None:
        size = f"not checked ({d['compression'] or 'stream'}: only the header was read)"
    elif d["expected_size"] is None:
        size = f"{d['file_size']} bytes on disk (pickled data: size not fixed by the header)"
    else:
        diff = d["file_size"] - d["expected_size"]
        note = {"ok": "ok", "truncated": f"TRUNCATED: {-diff} bytes missing",
                "trailing bytes": f"{diff} extra bytes after the data"}[d["size_status"]]
        size = f"{d['file_size']} bytes on disk, {d['expected_size']} expected ({note})"
    rows = [
        ("format", f".npy {d['version']}" + (f" ({d['compression']}-compressed)" if d["compression"] else "")),
        ("shape", f"{shape} ({d['count']} element{'' if d['count'] == 1 else 's'})"),
        ("dtype", d["dtype_text"]),
        ("order", "Fortran" if d["fortran_order"] else "C"),
        ("data offset", str(d["data_offset"])),
        ("size", size),
        ("pickled", "yes (object dtype: stream with iter_objects)" if d["pickled"] else "no"),
    ]
    return "\n".join([d["path"], *(f"  {k:<12}{v}" for k, v in rows)])


def run(args: argparse.Namespace) -> int:
    """Describe every file; exit 1 if any was bad."""
    status = 0
    results = []
    for path in args.files:
        try:
            d = describe(path)
        except (NpyStreamError, OSError, ValueError) as exc:
            if args.debug:
                raise
            print(f"npystream info: error: {exc}", file=sys.stderr)
            results.append({"path": path, "error": str(exc)})
            status = 1
            continue
        results.append(d)
        for m in d.get("members", ()):
            if m["error"] is not None and m["filename"].endswith(".npy"):  # a damaged array member
                print(f"npystream info: error: {m['error']}", file=sys.stderr)
                status = 1
        if d.get("size_status") == "truncated":
            err = TruncatedError(
                f"data is {d['file_size'] - d['data_offset']} bytes but the header promises "
                f"{d['nbytes']}; the file is truncated",
                path=path,
                offset=d["file_size"],
            )
            print(f"npystream info: error: {err}", file=sys.stderr)
            status = 1
        if not args.json:
            print(_text(d))
    if args.json:
        print(json.dumps(results, indent=2))
    return status
