"""Hostile and broken inputs, one or more per item of the hostile-input review, as data.

Each :class:`Case` names its item, builds its files into a directory
(``build(dir) -> {key: path}``), and gives the code the child runs (``P`` is
the dict of paths; the code may set ``result``) and what must happen: an
exception of one of ``raises`` (npystream class names) or, with
``raises=()``, a normal end whose ``result`` passes ``check``.  Time and
anonymous-memory bounds apply to every case.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hostile_pickles import array_elem, envelope, glob, integer, npy_file

from npystream.formats.npy import encode_header

P61 = 2**61 - 1  # ints that differ by a multiple of this hash alike


@dataclass(frozen=True)
class Case:
    name: str
    item: int
    build: Callable[[str], dict[str, str]]
    code: str
    raises: tuple[str, ...] = ()
    check: Callable[[Any], bool] | None = None
    seconds: float = 10.0  # bound on the case's own run time (a loaded 2-core machine)
    mbytes: int = 300  # bound on its peak anonymous memory above the child's baseline
    needs_fifo: bool = False
    events: tuple[str, ...] = ()  # audit events the case expects (a class the user allowed by name)
    tags: tuple[str, ...] = field(default_factory=tuple)


def _write(dirpath: str, name: str, data: bytes) -> str:
    path = os.path.join(dirpath, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _one_element(name: str, element: bytes) -> Callable[[str], dict[str, str]]:
    def build(d: str) -> dict[str, str]:
        return {"f": _write(d, name + ".npy", npy_file(envelope([element]), (1,)))}

    return build


# --------------------------------------------------------------------------- ragged store builder


def object_store(d: str, name: str, pickles: list[bytes], *, meta: dict[str, Any] | None = None) -> str:
    """A ragged store of kind "object" whose elements are the given raw pickles."""
    from npystream.formats.ragged import _encode_part_header

    path = os.path.join(d, name)
    os.mkdir(path)
    values = b"".join(pickles)
    offs = np.cumsum([0] + [len(p) for p in pickles]).astype("<i8")
    _write(path, "values.npy", _encode_part_header(np.dtype("u1"), (len(values),), None) + values)
    _write(path, "offsets.npy", _encode_part_header(np.dtype("<i8"), (len(offs),), None) + offs.tobytes())
    m = {"format": "npystream.ragged", "version": 1, "kind": "object", "dtype": "|u1", "ndim": 1,
         "count": len(pickles), "nitems": len(values)}
    m.update(meta or {})
    _write(path, "meta.json", json.dumps(m).encode())
    return path


def array_store(d: str, name: str, arrays: list[np.ndarray]) -> str:
    from npystream.formats.ragged import save_ragged

    path = os.path.join(d, name)
    save_ragged(path, arrays)
    return path


# --------------------------------------------------------------------------- item 1: size checks

SET_RANGE = glob("builtins", "set") + glob("builtins", "range") + integer(2**62) + b"\x85R\x85R"
FROZENSET_RANGE = glob("builtins", "frozenset") + glob("builtins", "range") + integer(2**62) + b"\x85R\x85R"
SET_RANGE_PICKLE = b"\x80\x03" + SET_RANGE + b"."


def _set_range_store(d: str) -> dict[str, str]:
    return {"s": object_store(d, "set_range.ragged", [SET_RANGE_PICKLE])}


def _pair(d: str) -> dict[str, str]:
    data = npy_file(envelope([SET_RANGE]), (1,))
    return {"a": _write(d, "a.npy", data), "b": _write(d, "b.npy", data)}


# --------------------------------------------------------------------------- item 2: hash collisions

def _colliding(n: int) -> list[bytes]:
    return [integer(k * P61) for k in range(1, n + 1)]


COLLIDE_N = 30_000  # ~5 s to build before the check (quadratic), well under a second to refuse


def _set_call_collide(d: str) -> dict[str, str]:
    el = glob("builtins", "set") + b"](" + b"".join(_colliding(COLLIDE_N)) + b"e\x85R"
    return {"f": _write(d, "set_call.npy", npy_file(envelope([el]), (1,)))}


def _set_call_equal(d: str) -> dict[str, str]:
    """Equal items (not a collision attack: each insertion finds its twin at once) are no reason to refuse."""
    el = glob("builtins", "set") + b"](" + integer(2**62) * 5000 + integer(-1) * 3000 + integer(-2) * 3000 + b"e\x85R"
    return {"f": _write(d, "set_equal.npy", npy_file(envelope([el]), (1,)))}


def _dict_collide(d: str) -> dict[str, str]:
    keys = _colliding(COLLIDE_N)
    batches = [b"(" + b"".join(k + b"N" for k in keys[i : i + 1000]) + b"u" for i in range(0, len(keys), 1000)]
    el = b"}" + b"".join(batches)
    return {"f": _write(d, "dict.npy", npy_file(envelope([el]), (1,)))}


def _set_opcode_collide(d: str) -> dict[str, str]:
    keys = _colliding(COLLIDE_N)
    batches = [b"(" + b"".join(keys[i : i + 1000]) + b"\x90" for i in range(0, len(keys), 1000)]
    el = b"\x8f" + b"".join(batches)
    return {"f": _write(d, "set_op.npy", npy_file(envelope([el], proto=4), (1,)))}


def _legit_big_dict(d: str) -> dict[str, str]:
    arr = np.empty(1, dtype=object)
    arr[0] = {i: i for i in range(200_000)}
    path = os.path.join(d, "big_dict.npy")
    np.save(path, arr, allow_pickle=True)
    return {"f": path}


# --------------------------------------------------------------------------- item 3: zero itemsize

def _v0(d: str) -> dict[str, str]:
    head = encode_header(np.dtype("V0"), (2**62,), False)
    return {"f": _write(d, "v0.npy", head), "gz": _write(d, "v0.npy.gz", gzip.compress(head, mtime=0))}


# --------------------------------------------------------------------------- item 4: counts from the file

def _claim(d: str) -> dict[str, str]:
    body = envelope([integer(1)], shape=(2**40,))
    return {"f": _write(d, "claim.npy", encode_header(np.dtype("O"), (2**40,), False) + body)}


# --------------------------------------------------------------------------- item 5 and 7: npz

@functools.lru_cache(maxsize=1)
def _bomb_stream() -> tuple[bytes, int, int]:
    """A raw deflate stream of a .npy whose header promises 1 GiB of int64 zeros, and that inflates to it."""
    total = 1 << 30
    inner_head = encode_header(np.dtype("<i8"), ((total - 128) // 8,), False)
    comp = zlib.compressobj(1, zlib.DEFLATED, -15)
    chunk = bytes(16 << 20)
    parts = [comp.compress(inner_head)]
    crc = zlib.crc32(inner_head)
    left = total - len(inner_head)
    while left > 0:
        piece = chunk[: min(left, len(chunk))]
        parts.append(comp.compress(piece))
        crc = zlib.crc32(piece, crc)
        left -= len(piece)
    parts.append(comp.flush())
    return b"".join(parts), total, crc


def _npz_bomb(d: str, declared: int | None = 1024) -> dict[str, str]:
    """A few-MB deflated member that inflates to 1 GiB, its header saying so; the directory declares ``declared`` bytes."""
    raw, total, crc = _bomb_stream()
    path = os.path.join(d, "bomb.npz")
    _rewrite_single_member(path, "x.npy", raw, total if declared is None else declared, crc)
    return {"f": path}


def _npz_big(d: str) -> dict[str, str]:
    return _npz_bomb(d, None)


def _rewrite_single_member(path: str, name: str, raw: bytes, size: int, crc: int) -> None:
    """Write a one-member zip (deflated, ZIP64 sizes) holding ``raw`` as its compressed data."""
    fname = name.encode()
    extra = struct.pack("<HHQQ", 1, 16, size, len(raw))
    local = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 45, 0, 8, 0, 0x21, crc, 0xFFFFFFFF, 0xFFFFFFFF,
                        len(fname), len(extra)) + fname + extra
    cd_extra = struct.pack("<HHQQ", 1, 16, size, len(raw))
    central = struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 45, 45, 0, 8, 0, 0x21, crc, 0xFFFFFFFF,
                          0xFFFFFFFF, len(fname), len(cd_extra), 0, 0, 0, 0, 0) + fname + cd_extra
    cd_off = len(local) + len(raw)
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 1, 1, len(central), cd_off, 0)
    with open(path, "wb") as f:
        f.write(local + raw + central + end)


def _npz_flipped(d: str) -> dict[str, str]:
    path = os.path.join(d, "flip.npz")
    np.savez(path, x=np.arange(10, dtype="<f8"))
    data = bytearray(open(path, "rb").read())
    where = data.find(np.arange(10, dtype="<f8").tobytes()) + 8 * 9  # a byte of the last value
    data[where] ^= 0x01
    _write(d, "flip.npz", bytes(data))
    return {"f": path}


# --------------------------------------------------------------------------- item 6: ragged object stores

MEMO_BOMB = b"\x80\x04Nr\xff\xff\xff\x0f."


def _ragged_memo(d: str) -> dict[str, str]:
    return {"s": object_store(d, "memo.ragged", [MEMO_BOMB])}


def _ragged_nested(d: str) -> dict[str, str]:
    deep = b"\x80\x04" + b"]" * 100_000 + b"a" * 99_999 + b"."
    return {"s": object_store(d, "nested.ragged", [deep])}


def _ragged_trailing(d: str) -> dict[str, str]:
    return {"s": object_store(d, "trailing.ragged", [b"\x80\x04K\x05.garbage"])}


def _ragged_valid(d: str) -> dict[str, str]:
    from npystream.formats.ragged import save_ragged

    path = os.path.join(d, "ok.ragged")
    save_ragged(path, [{"a": [1, 2]}, np.arange(3), "x", None, (1, 2.5)], kind="object")
    return {"s": path}


# --------------------------------------------------------------------------- item 8: ragged stores that lie

def _values_short_header(d: str) -> dict[str, str]:
    """values.npy's header says 2 items, meta.json 8 (the file itself still holds all 8)."""
    from npystream.formats.npy import read_header
    from npystream.formats.ragged import _encode_part_header

    path = array_store(d, "short.ragged", [np.arange(5, dtype="<i4"), np.arange(3, dtype="<i4")])
    vals = os.path.join(path, "values.npy")
    data = open(vals, "rb").read()
    with open(vals, "rb") as f:
        start = read_header(f).data_offset
    _write(path, "values.npy", _encode_part_header(np.dtype("<i4"), (2,), start) + data[start:])
    return {"s": path}


def _symlink_out(d: str) -> dict[str, str]:
    path = array_store(d, "link.ragged", [np.arange(4, dtype="<i8")])
    other = os.path.join(d, "elsewhere")
    os.mkdir(other)
    os.replace(os.path.join(path, "values.npy"), os.path.join(other, "other.npy"))
    os.symlink(os.path.join(other, "other.npy"), os.path.join(path, "values.npy"))
    return {"s": path}


def _fifo(part: str) -> Callable[[str], dict[str, str]]:
    def build(d: str) -> dict[str, str]:
        path = array_store(d, f"fifo-{part}.ragged", [np.arange(4, dtype="<i8")])
        os.remove(os.path.join(path, part))
        os.mkfifo(os.path.join(path, part))
        return {"s": path}

    return build


def _shapes_wrap(d: str) -> dict[str, str]:
    path = array_store(d, "wrap.ragged", [np.zeros((0, 3), "<f4"), np.zeros((2, 2), "<f4")])
    shp = os.path.join(path, "shapes.npy")
    data = bytearray(open(shp, "rb").read())
    start = len(data) - 4 * 8
    data[start : start + 16] = struct.pack("<qq", 2**32, 2**32)  # element 0: (2**32, 2**32), product wraps to 0
    _write(path, "shapes.npy", bytes(data))
    return {"s": path}


def _meta_edit(name: str, edit: Callable[[dict[str, Any]], Any]) -> Callable[[str], dict[str, str]]:
    def build(d: str) -> dict[str, str]:
        path = array_store(d, name, [np.arange(4, dtype="<i8")])
        meta_path = os.path.join(path, "meta.json")
        meta = json.load(open(meta_path))
        text = edit(meta)
        with open(meta_path, "w") as f:
            f.write(text if isinstance(text, str) else json.dumps(meta))
        return {"s": path}

    return build


def _version_true(meta: dict[str, Any]) -> None:
    meta["version"] = True


def _meta_nested(meta: dict[str, Any]) -> str:
    return "[" * 100_000 + "]" * 100_000


def _meta_digits(meta: dict[str, Any]) -> str:
    text = json.dumps(meta)
    return text.replace(f'"count": {meta["count"]}', '"count": ' + "9" * 5000)


# --------------------------------------------------------------------------- item 9: one rule per source

def _empty_rows_element(d: str) -> dict[str, str]:
    # numpy cannot make this array itself (np.empty refuses the shape), but its __setstate__ builds it
    el = array_elem("f8", "<", (2**62, 0), b"")
    return {"f": _write(d, "rows.npy", npy_file(envelope([el]), (1,)))}


def _gz_trailing(d: str) -> dict[str, str]:
    buf = io.BytesIO()
    np.save(buf, np.arange(10, dtype="<i4"))
    data = gzip.compress(buf.getvalue(), mtime=0) + b"trailing garbage"
    return {"f": _write(d, "t.npy.gz", data), "out": os.path.join(d, "out.npy")}


# --------------------------------------------------------------------------- item 10: one exception tree

def _meta_dir(d: str) -> dict[str, str]:
    path = array_store(d, "metadir.ragged", [np.arange(4, dtype="<i8")])
    os.remove(os.path.join(path, "meta.json"))
    os.mkdir(os.path.join(path, "meta.json"))
    return {"s": path}


def _meta_loop(d: str) -> dict[str, str]:
    path = array_store(d, "loop.ragged", [np.arange(4, dtype="<i8")])
    os.remove(os.path.join(path, "meta.json"))
    os.symlink("meta.json", os.path.join(path, "meta.json"))
    return {"s": path}


def _fixed_file(d: str) -> dict[str, str]:
    path = os.path.join(d, "fixed.npy")
    np.save(path, np.arange(5))
    return {"f": path}


# --------------------------------------------------------------------------- item 11/12: the command line

def _bad_zip(d: str) -> dict[str, str]:
    path = os.path.join(d, "bad.npz")
    np.savez_compressed(path, x=np.arange(1000))
    data = bytearray(open(path, "rb").read())
    data[60:80] = b"\xff" * 20  # inside the deflated stream
    _write(d, "bad.npz", bytes(data))
    return {"f": path, "out": os.path.join(d, "out.ragged")}


def _bad_gzip(d: str) -> dict[str, str]:
    arr = np.empty(3, dtype=object)
    arr[:] = ["a", "b", "c"]
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    data = bytearray(gzip.compress(buf.getvalue() * 1, mtime=0))
    data[40:50] = b"\x00\xff" * 5
    return {"f": _write(d, "bad.npy.gz", bytes(data)), "out": os.path.join(d, "out.ragged")}


def _cut_object(d: str) -> dict[str, str]:
    arr = np.empty(3, dtype=object)
    arr[:] = ["a", "b", "c"]
    path = os.path.join(d, "cut.npy")
    np.save(path, arr, allow_pickle=True)
    data = open(path, "rb").read()
    _write(d, "cut.npy", data[:-12])
    good = os.path.join(d, "good.npy")
    np.save(good, arr, allow_pickle=True)
    return {"f": path, "g": good}


def _custom_class(d: str) -> dict[str, str]:
    el = glob("mymod_missing_for_test", "Point") + b")\x81"
    return {"f": _write(d, "point.npy", npy_file(envelope([el], proto=3), (1,)))}


CLI = """
import contextlib, io
from npystream.cli import main
err = io.StringIO()
with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    rc = main({argv})
result = [rc, err.getvalue()]
"""


def _cli(argv: str) -> str:
    return CLI.format(argv=argv)


def _one_line(rc: int, *words: str) -> Callable[[Any], bool]:
    def check(result: Any) -> bool:
        code, err = result
        lines = err.strip().splitlines()
        return code == rc and len(lines) == 1 and "Traceback" not in err and all(w in err for w in words)

    return check


_FIND_POINT = "pickle.find_class ('mymod_missing_for_test', 'Point')"

CASES: list[Case] = [
    # 1
    Case("set_range_iter", 1, _one_element("set_range", SET_RANGE),
         "for _ in npystream.iter_objects(P['f']): pass", ("UnsafePickleError",)),
    Case("frozenset_range_open", 1, _one_element("frozenset_range", FROZENSET_RANGE),
         "npystream.open(P['f'])[0]", ("UnsafePickleError",)),
    Case("set_range_ragged", 1, _set_range_store, "npystream.open(P['s'])[0]", ("UnsafePickleError",)),
    Case("set_range_verify", 1, _pair, "npystream.verify(P['a'], P['b'])", ("UnsafePickleError",)),
    Case("bytes_size", 1, _one_element("bytes_n", glob("builtins", "bytes") + integer(2**40) + b"\x85R"),
         "for _ in npystream.iter_objects(P['f']): pass", ("UnsafePickleError",)),
    # 2
    Case("collide_set_call", 2, _set_call_collide, "for _ in npystream.iter_objects(P['f']): pass",
         ("UnsafePickleError",), seconds=4),
    Case("set_call_equal_items", 2, _set_call_equal,
         "result = sorted(next(iter(npystream.iter_objects(P['f']))))", check=lambda r: r == [-2, -1, 2**62]),
    Case("collide_dict_setitems", 2, _dict_collide, "for _ in npystream.iter_objects(P['f']): pass",
         ("UnsafePickleError", "FormatError"), seconds=4, tags=("opcode-collisions",)),
    Case("collide_set_additems", 2, _set_opcode_collide, "for _ in npystream.iter_objects(P['f']): pass",
         ("UnsafePickleError", "FormatError"), seconds=4, tags=("opcode-collisions",)),
    Case("legit_big_dict", 2, _legit_big_dict,
         "result = [len(x) for x in npystream.iter_objects(P['f'])]", check=lambda r: r == [200_000]),
    # 3
    Case("v0_iter_batches", 3, _v0,
         "rows = 0\nfor b in npystream.iter_batches(P['f']):\n    rows += len(b)\nresult = rows",
         check=lambda r: r == 2**62, seconds=5),
    Case("v0_stream_batches", 3, _v0,
         "rows = 0\nfor b in npystream.iter_batches(P['gz'], batch_bytes=1 << 20):\n    rows += len(b)\nresult = rows",
         check=lambda r: r == 2**62, seconds=5),
    # 4
    Case("claim_open", 4, _claim, "npystream.open(P['f'])[0]", ("FormatError",)),
    Case("claim_iter", 4, _claim, "for _ in npystream.iter_objects(P['f']): pass", ("FormatError",)),
    # 5
    Case("npz_bomb", 5, _npz_bomb, "npystream.NpzArchive(P['f']).load('x')", ("FormatError",), mbytes=200),
    Case("npz_limit", 5, _npz_big, "npystream.NpzArchive(P['f']).load('x', max_bytes=100 << 20)",
         ("FormatError",), mbytes=200),
    # 6
    Case("ragged_memo", 6, _ragged_memo, "npystream.open(P['s'])[0]", ("FormatError",)),
    Case("ragged_nested", 6, _ragged_nested, "npystream.open(P['s'])[0]", ("FormatError",)),
    Case("ragged_nested_verify", 6, _ragged_nested, "npystream.verify(P['s'], P['s'])", ("FormatError",)),
    Case("ragged_trailing", 6, _ragged_trailing, "npystream.open(P['s'])[0]", ("FormatError",)),
    Case("ragged_valid", 6, _ragged_valid, "result = repr(list(npystream.open(P['s'])))",
         check=lambda r: r == "[{'a': [1, 2]}, array([0, 1, 2]), 'x', None, (1, 2.5)]"),
    # 7
    Case("npz_crc", 7, _npz_flipped, "npystream.NpzArchive(P['f']).load('x')", ("FormatError",)),
    # 8
    Case("values_short_header", 8, _values_short_header, "npystream.open(P['s'])", ("FormatError",)),
    Case("symlink_out", 8, _symlink_out, "npystream.open(P['s'])", ("FormatError",)),
    Case("fifo_meta", 8, _fifo("meta.json"), "npystream.open(P['s'])", ("FormatError",), seconds=5,
         needs_fifo=True),
    Case("fifo_values", 8, _fifo("values.npy"), "npystream.open(P['s'])", ("FormatError",), seconds=5,
         needs_fifo=True),
    Case("fifo_verify", 8, _fifo("offsets.npy"), "npystream.verify(P['s'], P['s'])", ("FormatError",),
         seconds=5, needs_fifo=True),
    Case("shapes_wrap", 8, _shapes_wrap, "npystream.open(P['s'])", ("FormatError",)),
    Case("version_true", 8, _meta_edit("vt.ragged", _version_true), "npystream.open(P['s'])", ("FormatError",)),
    # 9
    Case("empty_rows_element", 9, _empty_rows_element,
         "a = next(iter(npystream.iter_objects(P['f'])))\nb = npystream.open(P['f'])[0]\n"
         "result = [list(a.shape), list(b.shape), str(a.dtype), str(b.dtype)]",
         check=lambda r: r == [[2**62, 0], [2**62, 0], "float64", "float64"]),
    Case("gz_trailing_batches", 9, _gz_trailing, "for _ in npystream.iter_batches(P['f']): pass",
         ("FormatError",)),
    Case("gz_trailing_convert", 9, _gz_trailing, "npystream.convert(P['f'], P['out'])", ("FormatError",)),
    # 10
    Case("meta_nested", 10, _meta_edit("nest.ragged", _meta_nested), "npystream.open(P['s'])", ("FormatError",)),
    Case("meta_digits", 10, _meta_edit("digits.ragged", _meta_digits), "npystream.open(P['s'])",
         ("FormatError",)),
    Case("meta_directory", 10, _meta_dir, "npystream.open(P['s'])", ("FormatError",)),
    Case("meta_loop", 10, _meta_loop, "npystream.open(P['s'])", ("FormatError",)),
    Case("objects_of_fixed", 10, _fixed_file, "npystream.iter_objects(P['f'])", ("FormatError",)),
    Case("batches_of_store", 10, _ragged_valid, "npystream.iter_batches(P['s'])", ("UnsupportedError",)),
    # 11
    Case("cli_convert_badzip", 11, _bad_zip, _cli("['convert', P['f'], P['out']]"), check=_one_line(1, "bad.npz")),
    Case("cli_convert_npz_dir_zlib", 11, _bad_zip, _cli("['convert', P['f'], P['out'] + '.d', '--to', 'npz-dir']"),
         check=_one_line(1, "bad.npz")),
    Case("cli_convert_zlib", 11, _bad_gzip, _cli("['convert', P['f'], P['out']]"),
         check=_one_line(1, "bad.npy.gz")),
    Case("cli_verify_eof", 11, _cut_object, _cli("['verify', P['f'], P['g']]"), check=_one_line(1, "cut.npy")),
    Case("cli_head_allow_missing", 11, _custom_class,
         _cli("['head', '--allow', 'mymod_missing_for_test.Point', P['f']]"),
         check=_one_line(1, "point.npy", "mymod_missing_for_test"), events=(_FIND_POINT,)),
    Case("cli_debug_after", 11, _cut_object, _cli("['verify', '--debug', P['f'], P['g']]"),
         check=lambda r: r[0] == 1 and "Traceback" in r[1]),
    # 12
    Case("cli_flag_names", 12, _custom_class, _cli("['head', P['f']]"),
         check=_one_line(1, "--allow-global mymod_missing_for_test.Point", "--trusted")),
    Case("cli_allow_global_head", 12, _custom_class,
         _cli("['head', '--allow-global', 'mymod_missing_for_test.Point', P['f']]"),
         check=_one_line(1, "point.npy", "mymod_missing_for_test"), events=(_FIND_POINT,)),
]
