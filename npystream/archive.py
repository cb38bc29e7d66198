"""``npystream.NpzArchive``: a lazy ``.npz`` whose object members open as ``ObjectArray``.

The format-level archive (:mod:`npystream.formats.npz`) maps fixed-dtype
members and never unpickles; this subclass, one layer up, hands object
members to the object reader (imported on first use, so opening an archive
of fixed dtypes costs no import of the pickle engine).
"""

from __future__ import annotations

from typing import Any

from npystream.formats.npy import NpyHeader
from npystream.formats.npz import NpzArchive as _NpzArchive

__all__ = ["NpzArchive"]


class NpzArchive(_NpzArchive):
    """A ``.npz`` opened lazily (:class:`npystream.formats.npz.NpzArchive`) whose object members open as :class:`~npystream.ObjectArray`.

    Stored object members give random access (and zero-copy views); deflated
    ones stream.  The archive's safety options (``trusted``,
    ``allowed_globals``...) apply to them.

    >>> import os, tempfile, numpy as np
    >>> p = os.path.join(tempfile.mkdtemp(), "o.npz")
    >>> np.savez(p, o=np.array([1, "two"], dtype=object))
    >>> with NpzArchive(p) as z, z["o"] as o:
    ...     (type(o).__name__, list(o))
    ('ObjectArray', [1, 'two'])
    """

    def _object_member(self, key: str, src: Any, header: NpyHeader) -> Any:
        from npystream.object_array import ObjectArray

        return ObjectArray(src, header=header, **self._object_options)
