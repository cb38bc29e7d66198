"""convert object .npy -> ragged with the writer's write-behind thread (the default) vs without."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

pytest.importorskip("npystream.objects", reason="iter_objects (issue 3) not in the tree yet")

import npystream  # noqa: E402
import npystream.conversion as conversion  # noqa: E402
from npystream.conversion import convert  # noqa: E402


def _store_bytes(path):
    return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


def _save(path, items):
    arr = np.empty(len(items), object)
    for i, x in enumerate(items):
        arr[i] = x
    np.save(path, arr, allow_pickle=True)
    return path


def test_write_behind_is_the_default_and_changes_no_byte(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    items = [rng.standard_normal(int(k), dtype=np.float32) for k in rng.integers(0, 30_000, 60)]
    src = _save(tmp_path / "a.npy", items)
    assert conversion._WRITE_BEHIND is True
    monkeypatch.setattr(conversion, "_WRITER_BUFFER", 64 << 10)  # many buffers' worth
    made = []
    real_init = npystream.RaggedWriter.__init__

    def spy(self, *args, **kwargs):
        made.append(kwargs.get("write_behind"))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(npystream.RaggedWriter, "__init__", spy)
    convert(src, tmp_path / "a.ragged")
    monkeypatch.setattr(conversion, "_WRITE_BEHIND", False)
    convert(src, tmp_path / "b.ragged")
    assert made == [True, False]
    assert _store_bytes(tmp_path / "a.ragged") == _store_bytes(tmp_path / "b.ragged")
    assert not [t for t in threading.enumerate() if t.name == "npystream-ragged-writer"]
    r = npystream.open(tmp_path / "a.ragged")
    assert len(r) == len(items) and all(np.array_equal(a, b) for a, b in zip(items, r))
