"""demo: the README's main job runs end to end on a small size and reports what it measured."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest

from npystream.demo import generate, measure, rss_anon


def test_generate_is_seeded_and_loadable(tmp_path):
    n = generate(str(tmp_path / "a.npy"), size_mb=2, seed=5)
    generate(str(tmp_path / "b.npy"), size_mb=2, seed=5)
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()
    arr = np.load(tmp_path / "a.npy", allow_pickle=True)
    assert len(arr) == n and all(x.dtype == np.float32 and 1000 <= len(x) < 49_000 for x in arr)
    assert 1.5e6 < os.path.getsize(tmp_path / "a.npy") < 3e6


def test_measure_sees_a_child_allocation():
    m = measure("import json, time; b = bytearray(150 * 2**20); b[::4096] = b'x' * len(b[::4096]); "
                "time.sleep(0.2); print(json.dumps({'ok': 1}))")
    assert m.returncode == 0 and m.out == {"ok": 1}
    if rss_anon() is None:
        pytest.skip("no /proc")
    assert m.peak is not None and m.peak > 150 * 2**20


def test_demo_end_to_end_small(tmp_path):
    pytest.importorskip("npystream.objects", reason="iter_objects (issue 3) not in the tree yet")
    from npystream.demo import run_demo

    out = io.StringIO()
    res = run_demo(str(tmp_path / "d"), size_mb=8, reads=2000, progress=False, out=out)
    text = out.getvalue()
    assert res["checksums_match"] is True
    for label in ("np.load + loop", "iter_objects (streaming)", "convert -> ragged store",
                  "random r[i].sum(), ragged store"):
        assert label in text
    assert os.path.isdir(tmp_path / "d" / "demo.ragged")  # DIR given: files are kept
    assert res["load_s"] > 0 and res["stream_s"] > 0 and res["read_us_store"] > 0


def test_demo_cli_temporary_dir_removed(tmp_path, capsys, monkeypatch):
    pytest.importorskip("npystream.objects", reason="iter_objects (issue 3) not in the tree yet")
    from npystream.cli import main

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(["demo", "--size-mb", "4", "--quiet"]) == 0
    assert "peak anonymous memory" in capsys.readouterr().out
    assert [n for n in os.listdir(tmp_path) if n.startswith("npystream-demo-")] == []
