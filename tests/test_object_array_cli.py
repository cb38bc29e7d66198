"""``npystream head`` and ``npystream index`` through ``main([...])``."""

from __future__ import annotations

import gzip
import os
import stat

import numpy as np
from hostile_pickles import envelope, glob, integer, npy_file, uni
from objcases import case, case_bytes, obj_array, write_case

from npystream.cli import main
from npystream.object_array import index_path_for


def test_head_prints_first_elements_with_types(tmp_path, capsys):
    path = tmp_path / "h.npy"
    items = [np.arange(6, dtype="<i2").reshape(2, 3), "text", {"k": [1, 2]}, None, np.float32(1.5), b"xy"] * 5
    np.save(path, obj_array(items))
    assert main(["head", str(path), "-n", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{path}: object array, shape (30,), dtype object, 30 elements")
    assert "[0] ndarray shape=(2, 3) dtype=int16 order=C" in out[1]
    assert "[[0, 1, 2]" in out[1]
    assert out[2].strip() == "[1] str len=4: 'text'"
    assert out[3].strip() == "[2] dict len=1: {'k': [1, 2]}"
    assert out[4].strip() == "[3] NoneType: None"
    assert out[5].strip() == "[4] numpy.float32 dtype=float32: np.float32(1.5)"
    assert out[6].strip() == "... 25 more"
    assert len(out) == 7


def test_head_nd_gzip_and_default_n(tmp_path, capsys):
    data = case_bytes(case("nd_fortran"))
    path = tmp_path / "f.npy.gz"
    with gzip.open(path, "wb") as f:
        f.write(data)
    assert main(["head", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "shape (3, 4)" in out[0] and "Fortran order" in out[0]
    assert out[1].strip().startswith("[0, 0] ")
    assert out[5].strip().startswith("[1, 0] ")
    assert out[-1].strip() == "... 2 more"


def test_head_is_safe(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.npy"
    path.write_bytes(npy_file(envelope([integer(7), glob("os", "system") + uni(f"touch {marker}") + b"\x85R"]), (2,)))
    assert main(["head", str(path)]) == 1
    captured = capsys.readouterr()
    assert "[0] int: 7" in captured.out
    assert "system" in captured.err and "at byte" in captured.err
    assert not marker.exists()


def test_head_npz_and_fixed(tmp_path, capsys):
    path = tmp_path / "a.npz"
    np.savez(path, o=obj_array(["a", 1]), x=np.arange(3))
    assert main(["head", str(path), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{path}[o]: object array, shape (2,)" in out and "[0] str len=1: 'a'" in out
    fixed = tmp_path / "x.npy"
    np.save(fixed, np.arange(3))
    assert main(["head", str(fixed)]) == 0
    assert "not an object array" in capsys.readouterr().out


def test_head_encoding_option(numpy_testdata, capsys):
    path = numpy_testdata / "py2-objarr.npy"
    assert main(["head", str(path), "--encoding", "bytes"]) == 0
    out = capsys.readouterr().out
    assert "type: builtins.range" in out
    assert "bytes len=6" in out


def test_index_builds_saves_and_reuses(tmp_path, capsys):
    path = tmp_path / "i.npy"
    write_case(case("many_2500"), path)
    assert main(["index", str(path)]) == 0
    out = capsys.readouterr().out
    assert "2500 elements" in out and "built in" in out and index_path_for(path) in out
    assert os.path.exists(index_path_for(path))
    assert main(["index", str(path)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["index", "--force", str(path)]) == 0
    assert "built in" in capsys.readouterr().out


def test_index_errors(tmp_path, capsys):
    fixed = tmp_path / "x.npy"
    np.save(fixed, np.arange(3))
    assert main(["index", str(fixed)]) == 1
    assert "no pickle" in capsys.readouterr().err
    gz = tmp_path / "g.npy.gz"
    with gzip.open(gz, "wb") as f:
        f.write(case_bytes(case("one_element")))
    assert main(["index", str(gz)]) == 1
    assert "read forward" in capsys.readouterr().err
    bad = tmp_path / "bad.npy"
    bad.write_bytes(npy_file(envelope([integer(1)]), (2,)))
    assert main(["index", str(bad)]) == 1
    assert "at byte" in capsys.readouterr().err
    assert not os.path.exists(index_path_for(bad))


def test_index_read_only_directory_fails_cleanly(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "r.npy"
    write_case(case("one_element"), path)
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(folder, os.W_OK):  # root: simulate
            from npystream import _atomic

            def refuse(*a, **k):
                raise PermissionError(13, "Permission denied")

            monkeypatch.setattr(_atomic, "temp_name", refuse)
        assert main(["index", str(path)]) == 1
        assert "could not be written" in capsys.readouterr().err
        assert os.listdir(folder) == ["r.npy"]
    finally:
        folder.chmod(stat.S_IRWXU)


def test_head_array_orders_and_views(tmp_path, capsys):
    path = tmp_path / "o.npy"
    np.save(path, obj_array([np.arange(3.0), np.asfortranarray(np.ones((2, 3), "<f4")), np.array(5)]))
    assert main(["head", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].strip() == "[0] ndarray shape=(3,) dtype=float64: [0., 1., 2.]"
    assert out[2].strip().startswith("[1] ndarray shape=(2, 3) dtype=float32 order=F: [[1., 1., 1.]")
    assert out[3].strip() == "[2] ndarray shape=() dtype=int64: 5"
    assert "read-only" not in "\n".join(out)  # head reads copies (streaming), never views


def test_index_several_files_continues_after_a_bad_one(tmp_path, capsys):
    good1, good2, bad = tmp_path / "a.npy", tmp_path / "b.npy", tmp_path / "bad.npy"
    write_case(case("one_element"), good1)
    write_case(case("exactly_1001"), good2)
    bad.write_bytes(npy_file(envelope([integer(1)]), (2,)))
    assert main(["index", str(good1), str(bad), str(good2)]) == 1
    captured = capsys.readouterr()
    assert f"{good1}: 1 element," in captured.out and f"{good2}: 1001 elements" in captured.out
    assert str(bad) in captured.err and "at byte" in captured.err
    assert os.path.exists(index_path_for(good1)) and os.path.exists(index_path_for(good2))
    assert not os.path.exists(index_path_for(bad))


def test_head_from_stdin(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "s.npy"
    write_case(case("strings_3000"), path)
    with open(path, "rb") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "npystream", "head", "-", "-n", "2"],
            stdin=f, capture_output=True, text=True, timeout=60,
        )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "-: object array, shape (3000,), dtype object, 3000 elements"
    assert lines[1].strip() == "[0] str len=5: 'str-0'"
    assert lines[3].strip() == "... 2998 more"
