"""The elements of a conversion or verification source: what SRC is, and its elements one at a time.

:func:`describe_source` opens a source spec (a path, ``ARCHIVE.npz:MEMBER``,
a ragged store, a gzip file or ``"-"`` for stdin) just enough to know what
it holds (:class:`SourceInfo`); :func:`open_elements` iterates the elements
of an object or ragged source with bounded memory.  Used by
:mod:`npystream.conversion` and :mod:`npystream.verification` (which import
this module, never each other).
"""

from __future__ import annotations

import gzip
import io
import os
import stat
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from npystream.errors import FormatError, UnsupportedError
from npystream.formats.npy import MAX_HEADER_SIZE, read_header
from npystream.sources import read_upto as _read_upto
from npystream.sources import sniff

__all__ = ["SourceInfo", "describe_source", "open_elements", "close_iter", "closing_iter", "STREAM_ABOVE"]

COPY_CHUNK = 1 << 20  # read size of the streams opened here (and of conversion's byte copies)
# Above this many elements a plain object file is streamed without an offset index (see
# open_elements): a conversion bounds its memory at about 200 MB, tighter than the readers'
# default (npystream.formats.pickle_walk.STREAM_ABOVE, 16 million).
STREAM_ABOVE = 4_000_000


# --------------------------------------------------------------------------- #
# streams that remember or replay what was read (for sniffing stdin / gzip)
# --------------------------------------------------------------------------- #


class _Replay(io.RawIOBase):
    """Replay ``head`` then read the rest of ``f``; counts bytes delivered.

    ``readinto`` fills the whole buffer unless the data ends (like
    ``BufferedReader.read``): readers downstream then see full reads from a
    pipe instead of 64 KiB dribbles.
    """

    def __init__(self, head: bytes, f: Any) -> None:
        self._head = memoryview(head)
        self._f = f
        self._eof = False
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        total = 0
        if len(self._head):
            n = min(len(view), len(self._head))
            view[:n] = self._head[:n]
            self._head = self._head[n:]
            total = n
        readinto = getattr(self._f, "readinto", None)
        while total < len(view) and not self._eof:
            if readinto is not None:
                n = readinto(view[total:]) or 0
            else:
                data = self._f.read(len(view) - total)
                n = len(data)
                view[total : total + n] = data
            if n == 0:
                self._eof = True
            total += n
        self.count += total
        return total


class _Recorder(io.RawIOBase):
    """Read from ``f`` and keep a copy of everything read (used for small headers only)."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.seen = bytearray()

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        data = self._f.read(len(view))
        view[: len(data)] = data
        self.seen += data
        return len(data)


def peek_header(f: Any, name: str) -> tuple[Any, Any]:
    """Read the .npy header from stream ``f``; return (header, a stream replaying from byte 0)."""
    rec = _Recorder(f)
    header = read_header(io.BufferedReader(rec, buffer_size=1), max_header_size=MAX_HEADER_SIZE)
    return header, io.BufferedReader(_Replay(bytes(rec.seen), f), buffer_size=COPY_CHUNK)


# --------------------------------------------------------------------------- #
# what a source is
# --------------------------------------------------------------------------- #


@dataclass
class SourceInfo:
    """What SRC turned out to be: ``kind`` is 'object', 'fixed', 'ragged' or 'npz'."""

    spec: str
    kind: str
    label: str
    header: Any = None
    count: int | None = None
    size: int | None = None  # bytes on disk (compressed size for gzip / zip members)
    path: str | None = None
    member: str | None = None
    compressed: bool = False
    stream: Any = None  # stdin only: a replaying stream (can be consumed once)
    from_stdin: bool = False  # "-" redirected from a regular file (read as that file)
    counter: Any = None
    identity: dict[str, Any] = field(default_factory=dict)

    def open_stream(self) -> Any:
        """A fresh binary stream of the (decompressed) .npy bytes, from byte 0."""
        if self.stream is not None:
            s, self.stream = self.stream, None
            return s
        if self.member is not None:
            zf = zipfile.ZipFile(self.path)
            return _ZipMemberStream(zf, self.member)
        if self.compressed:
            return gzip.open(self.path, "rb")
        return open(self.path, "rb")  # noqa: SIM115 - returned to the caller


class _ZipMemberStream(io.RawIOBase):
    """A zip member's decompressed bytes; closes the archive with it."""

    def __init__(self, zf: zipfile.ZipFile, member: str) -> None:
        self._zf = zf
        self._m = zf.open(member)
        self.name = f"{zf.filename}:{member}"

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        return self._m.readinto(buf)

    def close(self) -> None:
        if not self.closed:
            self._m.close()
            self._zf.close()
        super().close()


def is_ragged_dir(path: str) -> bool:
    """A directory holding a ragged store's ``meta.json``."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "meta.json"))


def _zip_member_name(zf: zipfile.ZipFile, name: str, archive: str) -> str:
    names = zf.namelist()
    for cand in (name, name + ".npy"):
        if cand in names:
            return cand
    shown = ", ".join(n[:-4] if n.endswith(".npy") else n for n in names[:20])
    raise FormatError(
        f"no member {name!r} in the archive; it has: {shown}{' ...' if len(names) > 20 else ''}",
        path=archive,
    )


def _stdin_regular_file() -> str | None:
    """The path of the regular file stdin is redirected from, if it is still at byte 0."""
    try:
        fd = sys.stdin.fileno()
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or os.lseek(fd, 0, os.SEEK_CUR) != 0:
            return None
    except (OSError, ValueError, AttributeError):
        return None
    link = f"/proc/self/fd/{fd}"
    real = os.path.realpath(link)
    for cand in (real, link):
        try:
            if os.path.samestat(os.stat(cand), st):
                return cand
        except OSError:
            continue
    return None


def describe_source(spec: str) -> SourceInfo:
    """Open ``spec`` just enough to know what it is (reads at most a header)."""
    spec = os.fspath(spec)
    if spec == "-":
        real = _stdin_regular_file()
        if real is not None:  # `< file`: read the file itself (seekable: index, zero-copy)
            info = describe_source(real)
            info.label = f"<stdin: {real}>"
            info.from_stdin = True
            return info
        raw = sys.stdin.buffer
        head = _read_upto(raw, 2)
        replay = _Replay(head, raw)
        stream: Any = io.BufferedReader(replay, buffer_size=COPY_CHUNK)
        compressed = sniff(head) == "gzip"
        if compressed:
            stream = gzip.GzipFile(fileobj=stream, mode="rb")
        header, stream = peek_header(stream, "<stdin>")
        return SourceInfo(spec, "object" if header.pickled else "fixed", "<stdin>", header=header,
                          count=header.count, stream=stream, compressed=compressed, counter=replay)
    if os.path.isdir(spec):
        if not is_ragged_dir(spec):
            raise FormatError("a directory but not a ragged store (no meta.json)", path=spec)
        from npystream.formats.ragged import RaggedArray

        count = len(RaggedArray(spec))
        size = sum(e.stat().st_size for e in os.scandir(spec) if e.is_file())
        return SourceInfo(spec, "ragged", spec, count=count, size=size, path=spec)
    member = None
    path = spec
    if not os.path.exists(spec) and ":" in spec:
        path, member = spec.rsplit(":", 1)
    if not os.path.exists(path):
        from npystream.errors import StoreNotFoundError

        raise StoreNotFoundError("no such file or store", path=spec)
    st = os.stat(path)
    identity = {"path": os.path.abspath(path), "member": member, "size": st.st_size,
                "mtime_ns": st.st_mtime_ns}
    with open(path, "rb") as f:
        magic = f.read(4)
    kind = sniff(magic)
    if kind == "zip":
        with zipfile.ZipFile(path) as zf:
            if member is None:
                return SourceInfo(spec, "npz", path, size=st.st_size, path=path, identity=identity)
            name = _zip_member_name(zf, member, path)
            info = zf.getinfo(name)
            with zf.open(name) as m:
                header = read_header(m)
        label = f"{path}:{name}"
        return SourceInfo(spec, "object" if header.pickled else "fixed", label, header=header,
                          count=header.count, size=info.compress_size, path=path, member=name,
                          compressed=info.compress_type != zipfile.ZIP_STORED, identity=identity)
    if member is not None:
        raise FormatError(f"{path} is not a .npz archive, so {spec!r} names no member", path=path)
    compressed = kind == "gzip"
    if compressed:
        with gzip.open(path, "rb") as g:
            header = read_header(g)
    else:
        header = read_header(path)
    return SourceInfo(spec, "object" if header.pickled else "fixed", path, header=header,
                      count=header.count, size=st.st_size, path=path, compressed=compressed,
                      identity=identity)




def open_elements(src: SourceInfo, *, trusted: bool = False, allowed_globals: Any = (),
                  encoding: str = "ASCII", fix_imports: bool = True,
                  start: int = 0, views: bool = False) -> Iterator[Any]:
    """Iterate the elements of an object or ragged source, from element ``start``.

    ``trusted``, ``allowed_globals``, ``encoding`` and ``fix_imports`` are the
    safety policy of :func:`npystream.iter_objects` (a ragged store's
    ``kind='object'`` elements are Python 3 pickles: ``encoding`` and
    ``fix_imports`` do not apply to them).  A plain object ``.npy`` of more
    than 4 million elements is read front to back without its offset index
    (bounded memory whatever the count; a ``start`` is then reached by
    decoding and dropping the elements before it).  Otherwise ``views=True``
    allows read-only zero-copy views of the mapped file, aligned or not (for
    consumers that copy each element at once, like the ragged writer), in one
    pass through the offset index that begins at ``start`` without decoding
    what comes before it (a resumed conversion), the map's pages dropped
    behind the reader.  Otherwise elements are streamed one at a time and the
    first ``start`` are decoded and dropped.
    """
    if src.kind == "ragged":
        from npystream.formats.ragged import RaggedArray

        r = RaggedArray(src.path, trusted=bool(trusted), allowed_globals=tuple(allowed_globals))
        return iter(r[start:] if start else r)
    if src.kind != "object":
        raise UnsupportedError(f"{src.label} holds a fixed dtype, not objects")
    opts = {"trusted": trusted, "allowed_globals": tuple(allowed_globals), "encoding": encoding,
            "fix_imports": fix_imports}
    plain = is_plain(src)
    from npystream.formats.pickle_walk import SafetyPolicy
    from npystream.objects import iter_objects, iterate

    if plain and src.count is not None and src.count > STREAM_ABOVE:
        # the offset index of a seekable file costs 16 bytes per element (64 MB at the
        # limit): above it, read the file front to back as a stream, whose memory does not
        # grow with the element count (slower: 6 million short strings 4.65-5.15 s and
        # 50 MiB vs 2.80-2.86 s and 122 MiB through the index, 2026-12-07)
        it = iterate(src.path, SafetyPolicy.make(**opts), stream_above=STREAM_ABOVE)
    elif views and plain:
        # one pass, elements are zero-copy views of the map (about twice as fast as
        # decoding copies: 2 GB benchmark 0.12-0.16 s vs 0.30-0.37 s for 20,000
        # elements); the consumer copies each at once, so the pages behind the
        # reader are dropped as it goes (the map's teardown at the end: 60 ms).  A
        # start > 0 (resume) begins there through the offset index: the elements
        # before it are neither decoded nor read, only their opcodes scanned
        return iterate(src.path, SafetyPolicy.make(**opts), zero_copy="always", release_behind=True,
                       start=start)
    elif plain:
        it = iter_objects(src.path, **opts)
    else:  # a stream we open: closed with the iteration
        stream = src.open_stream()
        try:
            it = closing_iter(iter_objects(stream, **opts), stream)
        except BaseException:
            stream.close()
            raise
    if start:
        for _ in islice(it, start):
            pass
    return it


def close_iter(it: Any) -> None:
    """Close an iterator that has ``close()`` (a generator stopped early releases its source)."""
    close = getattr(it, "close", None)
    if close is not None:
        close()


def closing_iter(it: Iterator[Any], f: Any) -> Iterator[Any]:
    """``it``, then ``f`` closed (when ``it`` ends, fails or is closed)."""
    try:
        yield from it
    finally:
        f.close()


def is_plain(src: SourceInfo) -> bool:
    """A plain file on disk (not stdin, a zip member or gzip): seekable and mappable."""
    return src.stream is None and src.member is None and not src.compressed
