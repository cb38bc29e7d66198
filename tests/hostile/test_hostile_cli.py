"""Command-line hostile cases that need more than one call: the demo's child processes, writer hints."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from npystream.demo import measure
from npystream.formats.ragged import RaggedWriter

ROOT = Path(__file__).resolve().parents[2]


def test_demo_children_ignore_a_npystream_folder_in_cwd(tmp_path, monkeypatch):
    """`npystream demo` from a directory holding a folder named npystream: its children import ours."""
    fake = tmp_path / "npystream"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('the wrong npystream')\n")
    monkeypatch.chdir(tmp_path)
    got = measure("import json, npystream; print(json.dumps({'file': npystream.__file__}))")
    assert got.returncode == 0, got.stderr
    assert Path(got.out["file"]).resolve() == (ROOT / "npystream" / "__init__.py").resolve()


@pytest.mark.slow
def test_demo_cli_runs_beside_a_npystream_folder(tmp_path):
    fake = tmp_path / "npystream"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('the wrong npystream')\n")
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from npystream.cli import main
        sys.exit(main(["demo", "--size-mb", "2", "--quiet", {str(tmp_path / "out")!r}]))
        """
    )
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_writer_on_a_file_does_not_invite_deleting_it(tmp_path):
    part = tmp_path / "part0.npy"
    np.save(part, np.arange(3))
    with pytest.raises(FileExistsError) as info:
        RaggedWriter(str(part), mode="a")
    text = str(info.value)
    assert "remove" not in text and "delete" not in text
    assert "is a file, not a ragged store" in text and "part0.npy" in text
    assert part.exists()
