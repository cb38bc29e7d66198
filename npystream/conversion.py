"""One-shot conversion between npystream's formats, with bounded memory and atomic output.

The public function is ``npystream.convert`` (this module is named ``conversion`` so that
importing it never rebinds ``npystream.convert`` to a module).

Directions (the direction follows from what SRC is and DST's suffix;
``to=`` overrides)::

    object .npy | ARCHIVE.npz:MEMBER | object .npy.gz | "-" (stdin)  -> ragged store   (to="ragged")
    ragged store                                                     -> object .npy    (to="npy")
    .npz                                                             -> directory of .npy files (to="npz-dir")
    fixed-dtype .npy.gz | "-" (stdin)                                -> .npy           (to="npy")

Memory: one element at a time (object streams) or one copy buffer (byte
streams) plus the ragged writer's two 1 MiB buffers, whatever the input size.

Atomic output: DST is built under a hidden temporary name beside it
(``.NAME.<tag>.npystream-tmp``) and renamed into place only when complete.
On any error, Ctrl-C or SIGTERM (the CLI turns SIGTERM into an exception)
the temporary is removed and nothing appears at DST.  An existing DST is
refused unless ``overwrite=True``.

Resume (ragged targets): the store is built at the fixed temporary name
``.NAME.partial.npystream-tmp`` with a sidecar ``.json`` naming the source
(path, size, mtime).  The ragged writer commits a consistent prefix of
elements every few MB, so after a crash (even SIGKILL) or an interrupted
``resume=True`` run (which keeps its partial store instead of removing it),
``resume=True`` reopens the partial store in append mode, skips the
committed elements of the source and continues.
"""

from __future__ import annotations

import json
import os
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from npystream._atomic import atomic_output, commit, refuse_existing, remove_path, temp_name
from npystream.elements import (
    COPY_CHUNK,
    SourceInfo,
    close_iter,
    describe_source,
    is_plain,
    is_ragged_dir,
    open_elements,
    peek_header,
)
from npystream.errors import CastError, FormatError, TruncatedError, UnsupportedError
from npystream.formats.ragged import KIND_TYPES, KindMismatch, check_kind, kind_for
from npystream.sources import DECOMPRESS_ERRORS

__all__ = ["convert", "ConvertResult", "SUPPORTED", "describe_source", "open_elements"]

TARGETS = ("ragged", "npy", "npz-dir")
SUPPORTED = (
    "object .npy, ARCHIVE.npz:MEMBER, object .npy.gz or - (stdin) -> ragged store (--to ragged); "
    "ragged store -> object .npy (--to npy); .npz -> directory of .npy files (--to npz-dir); "
    "fixed-dtype .npy.gz or - (stdin) -> .npy (--to npy)"
)
_PARTIAL_TAG = "partial"


_WRITER_BUFFER = 1 << 20
# Elements are copied out of the source's map.  Reading large ones from the file instead
# (RaggedWriter.append_from_file: preadv, copy_file_range) was measured slower on Linux 6.18 /
# ext4 (2 GB benchmark, user + system CPU: 1.46-1.52 s vs 1.56-1.65 s preadv, 1.85 s
# copy_file_range) and is not used here.
# The ragged writer's pwrite()s run on a helper thread while the next buffer fills
# (RaggedWriter(write_behind=True); the C helper, npystream._speedups.WriteBehind, keeps up
# to 3 writes queued and never needs the GIL).  2 GB benchmark, Python helper, medians of 6
# interleaved runs at load ~1.5: 1.07 s with, 1.30 s without (cp 0.65 s); under load 3-4,
# with both cores busy, 2.23 s vs 2.03 s (a second core is what it needs).  C helper, whole
# processes, 3 interleaved runs each: 0.70-0.77 s (Python helper 0.96-1.13 s).
_WRITE_BEHIND = True


# --------------------------------------------------------------------------- #
# progress and the result
# --------------------------------------------------------------------------- #


@dataclass
class ConvertResult:
    """What a conversion did (the CLI prints :meth:`summary`)."""

    src: str
    dst: str
    direction: str
    elements: int
    bytes_in: int
    bytes_out: int
    seconds: float
    resumed_from: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: elements, bytes in/out, seconds, MB/s."""
        mbs = self.bytes_in / 1e6 / self.seconds if self.seconds > 0 else float("inf")
        resumed = f" (resumed after {self.resumed_from})" if self.resumed_from else ""
        return (
            f"converted {self.src} -> {self.dst} [{self.direction}]: {self.elements} elements{resumed}, "
            f"{self.bytes_in / 1e6:.1f} MB in, {self.bytes_out / 1e6:.1f} MB out, "
            f"{self.seconds:.2f} s, {mbs:.0f} MB/s"
        )


class _Progress:
    """A tqdm bar on stderr (elements, MB/s, ETA), updated in chunks; a no-op when disabled."""

    def __init__(self, total: int | None, show: bool, desc: str) -> None:
        self.bar = None
        self.pending = 0
        self.nbytes = 0
        self.t0 = time.perf_counter()
        self.last = self.t0
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=" el", unit_scale=True, file=sys.stderr, desc=desc,
                            dynamic_ncols=True, mininterval=0.25, leave=True)

    def add(self, n: int, nbytes: int) -> None:
        if self.bar is None:
            return
        self.pending += n
        self.nbytes += nbytes
        if self.pending >= 64 or n == 0:
            now = time.perf_counter()
            if now - self.last >= 0.25:
                self.last = now
                self.bar.set_postfix_str(f"{self.nbytes / 1e6 / (now - self.t0):.0f} MB/s", refresh=False)
            self.bar.update(self.pending)
            self.pending = 0

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(self.pending)
            self.pending = 0
            self.bar.close()


def _nbytes(x: Any) -> int:
    n = getattr(x, "nbytes", None)
    if isinstance(n, int):
        return n
    if isinstance(x, (bytes, bytearray, str)):
        return len(x)
    return 0


def _tree_size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path)


# --------------------------------------------------------------------------- #
# directions
# --------------------------------------------------------------------------- #


def _pick_target(src: SourceInfo, dst: str, to: str | None) -> str:
    if to is not None:
        if to not in TARGETS:
            raise ValueError(f"to must be one of {TARGETS}, got {to!r}")
        return to
    low = dst.lower().rstrip("/\\")
    if low.endswith(".ragged") or is_ragged_dir(dst):
        return "ragged"
    if low.endswith(".npy"):
        return "npy"
    return {"object": "ragged", "ragged": "npy", "npz": "npz-dir", "fixed": "npy"}[src.kind]


def _refuse(src: SourceInfo, target: str) -> UnsupportedError:
    what = {"object": "an object-dtype .npy", "fixed": "a fixed-dtype .npy", "ragged": "a ragged store",
            "npz": "a whole .npz archive"}[src.kind]
    if src.kind == "fixed" and src.compressed is False and src.stream is None and src.member is None:
        what = "a fixed-dtype .npy (already memory-mappable: npystream.open() it directly)"
    return UnsupportedError(f"cannot convert {what} to {target}; supported: {SUPPORTED}", path=src.label)


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    trusted: bool = False,
    allowed_globals: Any = (),
    encoding: str = "ASCII",
    fix_imports: bool = True,
    kind: str | None = None,
    cast: str | None = None,
    durable: bool = False,
    progress: bool | None = None,
    verify: bool = False,
    workers: int = 1,
) -> ConvertResult:
    """Convert ``src`` to ``dst`` (see the module docstring for the directions); return what was done.

    ``trusted``, ``allowed_globals``, ``encoding`` and ``fix_imports`` are the
    safety policy of :func:`npystream.iter_objects` (``encoding='latin1'``
    for Python 2 files, like ``np.load``), used for reading SRC and for
    ``verify``.  ``kind``/``cast`` go to the ragged writer
    (``kind='object'`` pickles each element, ``cast='same_kind'`` unifies
    dtypes; nothing is cast silently).  Every element keeps its type and
    value.  Without ``kind`` the first element decides: a plain ndarray
    (not of object dtype) makes a store of arrays, a ``str`` or ``bytes`` a
    store of those, anything else ``kind='object'``.  An element the store
    would give back changed (a list or a numpy scalar in a store of arrays,
    an array of another dtype without ``cast``) fails the conversion with
    :class:`~npystream.errors.CastError` naming it and the fix
    (``kind='object'``, or ``cast``); nothing is left at DST.
    ``durable=True`` fsyncs the output before renaming it into place (and a
    ragged store at every commit); the default, like ``cp`` and ``np.save``,
    leaves flushing to the OS: safe against a killed process, not against a
    power loss.  ``progress``: None = a bar when
    stderr is a terminal.  ``verify=True`` compares DST with SRC afterwards
    and raises :class:`~npystream.errors.FormatError` on a difference (DST
    is removed then: a failed conversion leaves nothing at DST).
    ``workers > 1`` converts a plain object ``.npy`` to a ragged store on that
    many local processes (:mod:`npystream.parallel_convert`; other sources
    and directions run in one process).
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    src_s, dst_s = os.fspath(src), os.fspath(dst)
    show = sys.stderr.isatty() if progress is None else bool(progress)
    parent = os.path.dirname(os.path.abspath(dst_s))
    if not os.path.isdir(parent):
        from npystream.errors import StoreNotFoundError

        raise StoreNotFoundError("the directory to write DST in does not exist; create it first",
                                 path=parent)
    info = describe_source(src_s)
    target = _pick_target(info, dst_s, to)
    if resume and target != "ragged":
        raise UnsupportedError(f"resume works for ragged store targets only, not {target}", path=dst_s)
    if (kind is not None or cast is not None) and target != "ragged":
        raise ValueError(f"kind= and cast= apply to ragged store targets, not {target}")
    if verify and src_s == "-":
        raise ValueError("verify needs to read SRC twice; it cannot be stdin")
    from npystream.formats.pickle_safety import SafetyPolicy

    policy = SafetyPolicy.make(trusted=trusted, allowed_globals=allowed_globals, encoding=encoding,
                               fix_imports=fix_imports)  # checks the arguments now
    safety = {"trusted": policy.trusted, "allowed_globals": tuple(sorted(policy.allowed_globals)),
              "encoding": policy.encoding, "fix_imports": policy.fix_imports}
    t0 = time.perf_counter()
    if workers > 1 and not (info.kind == "object" and target == "ragged" and is_plain(info)):
        workers = 1  # noted below: nothing to split
        parallel_note = "--workers applies to a plain object .npy -> ragged store; converted in one process"
    else:
        parallel_note = None
    if workers > 1:
        res = _object_to_ragged_parallel(info, dst_s, workers=workers, overwrite=overwrite, resume=resume,
                                         safety=safety, kind=kind, cast=cast, durable=durable, show=show)
    elif info.kind == "object" and target == "ragged":
        res = _object_to_ragged(info, dst_s, overwrite=overwrite, resume=resume, safety=safety,
                                kind=kind, cast=cast, durable=durable, show=show)
    elif info.kind == "ragged" and target == "npy":
        res = _ragged_to_npy(info, dst_s, overwrite=overwrite, safety=safety, show=show,
                             durable=durable)
    elif info.kind == "npz" and target == "npz-dir":
        res = _npz_to_dir(info, dst_s, overwrite=overwrite, show=show, durable=durable)
    elif info.kind in ("fixed", "object") and target == "npy" and (
        info.compressed or info.stream is not None or info.member is not None or info.from_stdin
    ):
        res = _stream_to_npy(info, dst_s, overwrite=overwrite, show=show, durable=durable)
    else:
        raise _refuse(info, target)
    res.seconds = time.perf_counter() - t0
    if parallel_note is not None:
        res.notes.append(parallel_note)
    if info.counter is not None:
        res.bytes_in = info.counter.count
    if verify:
        from npystream.verification import verify as run_verify

        pairs = [(src_s, dst_s)]
        if target == "npz-dir":  # member by member
            with zipfile.ZipFile(info.path) as zf:
                names = [zi.filename for zi in zf.infolist() if not zi.is_dir()]
            pairs = [(f"{info.path}:{n}", os.path.join(dst_s, _safe_member_file(n, info.path)))
                     for n in names]
        total = 0
        if res.direction.endswith("-> .npy") and info.kind == "fixed":
            # a decompressed copy: compare the bytes (rows of a Fortran-ordered
            # array cannot be streamed from a compressed source)
            _compare_bytes(info, dst_s)
            pairs = []
            total = res.elements
        try:
            for a, b in pairs:
                outcome = run_verify(a, b, **safety)
                if not outcome.equal:
                    raise FormatError(f"verification failed: {outcome.message}; {dst_s} removed", path=b)
                total += outcome.count
        except BaseException:
            remove_path(dst_s)  # a conversion that fails its check leaves nothing at DST
            raise
        res.notes.append(f"verified: {total} elements equal")
    return res


def _compare_bytes(info: SourceInfo, dst: str) -> None:
    stream = info.open_stream()
    try:
        with open(dst, "rb") as f:
            offset = 0
            while True:
                a = stream.read(COPY_CHUNK)
                b = f.read(COPY_CHUNK)
                if a != b:
                    k = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
                    raise FormatError(f"verification failed: bytes differ from the source's "
                                      f"decompressed bytes at byte {offset + k}", path=dst, offset=offset + k)
                if not a:
                    return
                offset += len(a)
    finally:
        stream.close()


def _partial_paths(dst: str) -> tuple[str, str]:
    tmp = temp_name(dst, _PARTIAL_TAG)
    return tmp, tmp + ".json"


def _object_to_ragged(
    info: SourceInfo, dst: str, *, overwrite: bool, resume: bool, safety: dict[str, Any],
    kind: str | None, cast: str | None, durable: bool, show: bool,
) -> ConvertResult:
    from npystream.formats.ragged import RaggedWriter

    refuse_existing(dst, overwrite)
    tmp, sidecar = _partial_paths(dst)
    identity = dict(info.identity, kind=kind, cast=cast)
    mode = "w"
    notes: list[str] = []
    if os.path.lexists(tmp):
        if resume and info.stream is None:
            try:
                with open(sidecar, encoding="utf-8") as fh:
                    old = json.load(fh)
            except (OSError, ValueError):
                old = None
            if old != identity:
                raise FormatError(
                    f"the partial conversion at {tmp} was made from a different source or with other "
                    "options (or its record is missing); remove it, or drop --resume to start over",
                    path=dst,
                )
            mode = "a"
        else:
            if resume:
                raise UnsupportedError("cannot resume from stdin (the input cannot be skipped "
                                       "reliably); convert from a file", path=dst)
            remove_path(tmp)
            remove_path(sidecar)
            notes.append("removed a stale partial conversion (pass --resume to continue one)")
    bar = _Progress(info.count, show, "convert")
    count = start = 0
    try:
        if mode == "w" and info.stream is None:
            with open(sidecar, "w", encoding="utf-8") as fh:
                json.dump(identity, fh)
        # A 1 MiB buffer (fits the L2 caches of the development VM): the copy into it
        # and the pwrite() out of it stay in cache; elements larger than it are
        # pwrite()n straight from the (zero-copy) element.  2 GB benchmark with the C
        # write-behind helper, whole fresh processes, medians of 4-6 interleaved runs
        # (2026-12-07): 256 KiB 1.15 s, 1 MiB 0.80-0.88 s, 2 MiB 0.73-0.95 s, 4 MiB 1.15 s.
        def open_writer(store_kind: str | None) -> Any:
            return RaggedWriter(tmp, mode=mode, kind=store_kind, cast=cast, durable=durable,
                                buffer_size=_WRITER_BUFFER, write_behind=_WRITE_BEHIND)

        given = kind is not None
        writer = open_writer(kind) if mode == "a" else None
        try:
            if writer is not None:
                start = count = len(writer)
                bar.add(start, 0)
            elements = open_elements(info, **safety, start=start, views=True)
            try:
                if writer is None:  # a new store: the first element decides the kind unless one was given
                    x = next(elements, _END)
                    writer = open_writer(kind if given or x is _END else kind_for(x))
                    if x is not _END:
                        check_kind(x, 0, writer.kind, path=info.label, given=given)
                        writer.append(x)
                        count += 1
                        bar.add(1, _nbytes(x))
                append = writer.append
                store_kind = writer.kind
                want = KIND_TYPES.get(store_kind or "")  # None: kind='object' keeps anything
                if bar.bar is None and want is not None:  # no progress bar: nothing to count
                    for x in elements:
                        if type(x) is not want:
                            check_kind(x, len(writer), store_kind, path=info.label, given=given)
                        append(x)
                    count = len(writer)
                else:
                    add = bar.add
                    for x in elements:
                        if want is not None and type(x) is not want:
                            check_kind(x, count, store_kind, path=info.label, given=given)
                        append(x)
                        count += 1
                        add(1, _nbytes(x))
            finally:  # an error stops early: release the source now, not when collected
                close_iter(elements)
        except KindMismatch:
            _close_quietly(writer)
            raise
        except CastError as exc:
            _close_quietly(writer)
            raise CastError(
                f"{exc.message}; in `npystream convert` pass --kind object to store each element "
                "pickled (as it is), or --cast same_kind to unify dtypes",
                path=info.label, index=exc.index,
            ) from None
        except Exception:
            # commit what was appended (a --resume run keeps it), but never let a
            # secondary error from closing replace the real one
            _close_quietly(writer)
            raise
        except BaseException:
            # Ctrl-C / SIGTERM: commit what was appended if the writer's state is whole
            # (the interrupt may land half-way through an append), else keep the last
            # commit, what a kill leaves; --resume continues from either
            if writer is not None:
                writer.salvage()
            raise
        writer.close()
        bar.close()
        if info.header is not None and count != info.count:  # pragma: no cover - reader checks this
            raise FormatError(f"read {count} elements, the header says {info.count}", path=info.label)
        commit(tmp, dst, overwrite=overwrite)
        remove_path(sidecar)
    except BaseException:
        bar.close()
        if resume and info.stream is None:
            notes.append(f"partial store kept at {tmp}: rerun with --resume to continue")
            print(f"npystream convert: partial store kept at {tmp}; rerun with --resume to continue",
                  file=sys.stderr)
        else:
            remove_path(tmp)
            remove_path(sidecar)
        raise
    return ConvertResult(info.label, dst, "object -> ragged", count, info.size or 0,
                         _tree_size(dst), 0.0, resumed_from=start, notes=notes)


_END = object()


def _object_to_ragged_parallel(info: SourceInfo, dst: str, *, workers: int, show: bool, safety: dict[str, Any],
                               kind: str | None, **options: Any) -> ConvertResult:
    from npystream.parallel_convert import convert_object_parallel

    given = kind is not None
    if not given:  # element 0 decides the kind, as in one process
        elements = open_elements(info, **safety, start=0, views=True)
        try:
            first = next(elements, _END)
        finally:
            close_iter(elements)
        kind = None if first is _END else kind_for(first)  # nothing to read: the writer's default, as in one process
    bar = _Progress(info.count, show, "convert")
    per_element = (info.size or 0) / max(info.count or 1, 1)  # partitions report elements: MB/s on average
    try:
        count, start, notes = convert_object_parallel(
            info.path, dst, workers=workers, identity=info.identity, label=info.label, safety=safety,
            kind=kind, kind_given=given,
            progress=lambda n: bar.add(n, int(n * per_element)), **options)
    finally:
        bar.close()
    return ConvertResult(info.label, dst, "object -> ragged", count, info.size or 0, _tree_size(dst), 0.0,
                         resumed_from=start, notes=notes)


def _close_quietly(writer: Any) -> None:
    if writer is None:
        return
    try:
        writer.close()
    except Exception:  # noqa: S110 - the original exception is the one to report
        pass


def _ragged_to_npy(info: SourceInfo, dst: str, *, overwrite: bool, safety: dict[str, Any],
                   show: bool, durable: bool) -> ConvertResult:
    from npystream.formats.objwriter import save_objects

    refuse_existing(dst, overwrite)
    bar = _Progress(info.count, show, "convert")

    def gen() -> Iterator[Any]:
        for x in open_elements(info, **safety):
            bar.add(1, _nbytes(x))
            yield x

    try:
        count = save_objects(dst, gen(), length=info.count, overwrite=overwrite, durable=durable)
    finally:
        bar.close()
    return ConvertResult(info.label, dst, "ragged -> object .npy", count, info.size or 0,
                         os.path.getsize(dst), 0.0)


def _copy_npy(stream: Any, out: IO[bytes], label: str, bar: _Progress) -> tuple[Any, int]:
    """Copy one .npy from ``stream`` to ``out``, checking its length against its header."""
    header, replay = peek_header(stream, label)
    total = 0
    while True:
        try:
            chunk = replay.read(COPY_CHUNK)
        except DECOMPRESS_ERRORS as exc:  # a damaged stream, or garbage after the last gzip member
            raise FormatError(f"the compressed data is corrupt ({type(exc).__name__}: {exc})", path=label,
                              offset=total) from exc
        if not chunk:
            break
        out.write(chunk)
        total += len(chunk)
        bar.add(0, len(chunk))
    expected = header.expected_size
    if expected is not None and total < expected:
        raise TruncatedError(
            f"data ends after {total} bytes, the header promises {expected}", path=label, offset=total
        )
    if expected is not None and total > expected:
        raise FormatError(
            f"{total - expected} bytes follow the {expected} bytes the header describes", path=label,
            offset=expected,
        )
    return header, total


def _stream_to_npy(info: SourceInfo, dst: str, *, overwrite: bool, show: bool,
                   durable: bool) -> ConvertResult:
    bar = _Progress(None, show, "decompress")
    with atomic_output(dst, overwrite=overwrite) as tmp:
        stream = info.open_stream()
        try:
            with open(tmp, "wb") as out:
                header, total = _copy_npy(stream, out, info.label, bar)
                out.flush()
                if durable:
                    os.fsync(out.fileno())
        finally:
            stream.close()
            bar.close()
    return ConvertResult(info.label, dst, f"{'gzip' if info.compressed else 'stream'} -> .npy",
                         header.count, info.size or total, total, 0.0)


def _safe_member_file(name: str, archive: str) -> str:
    base = name[:-4] if name.endswith(".npy") else name
    parts = base.replace("\\", "/").split("/")
    if not base or base.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise FormatError(f"member name {name!r} is not a safe file name; refusing to extract it",
                          path=archive)
    return os.path.join(*parts) + ".npy"


def _npz_to_dir(info: SourceInfo, dst: str, *, overwrite: bool, show: bool,
                durable: bool) -> ConvertResult:
    notes: list[str] = []
    count = 0
    total = 0
    bar = _Progress(None, show, "extract")
    try:
        with atomic_output(dst, overwrite=overwrite) as tmp, zipfile.ZipFile(info.path) as zf:
            os.mkdir(tmp)
            for zi in zf.infolist():
                if zi.is_dir():
                    continue
                rel = _safe_member_file(zi.filename, info.path)
                out_path = os.path.join(tmp, rel)
                os.makedirs(os.path.dirname(out_path), exist_ok=True)
                with zf.open(zi) as m, open(out_path, "wb") as out:
                    header, n = _copy_npy(m, out, f"{info.path}:{zi.filename}", bar)
                    out.flush()
                    if durable:
                        os.fsync(out.fileno())
                total += n
                count += 1
                if header.pickled:
                    notes.append(f"{rel} holds Python objects: not memory-mappable; convert it with "
                                 f"`npystream convert {info.path}:{zi.filename} NAME.ragged`")
    finally:
        bar.close()
    return ConvertResult(info.label, dst, ".npz -> directory of .npy", count, info.size or 0, total,
                         0.0, notes=notes)
