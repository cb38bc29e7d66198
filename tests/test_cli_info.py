"""`npystream info` through main([...]): text and JSON output, exit codes, errors."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from npystream.cli import main


@pytest.fixture
def files(tmp_path):
    out = {}
    out["c"] = tmp_path / "c.npy"
    np.save(out["c"], np.arange(24, dtype="<f4").reshape(4, 6))
    out["f"] = tmp_path / "f.npy"
    np.save(out["f"], np.asfortranarray(np.zeros((3, 2), dtype=">i8")))
    out["obj"] = tmp_path / "obj.npy"
    np.save(out["obj"], np.array([[1, "a", None]] * 2, dtype=object), allow_pickle=True)
    out["gz"] = tmp_path / "g.npy.gz"
    out["gz"].write_bytes(gzip.compress(out["c"].read_bytes()))
    out["npz"] = tmp_path / "s.npz"
    np.savez(out["npz"], a=np.arange(3), rec=np.zeros(2, dtype=[("x", "<i4")]))
    out["npzc"] = tmp_path / "c.npz"
    np.savez_compressed(out["npzc"], a=np.arange(3), o=np.array([None], dtype=object))
    out["trunc"] = tmp_path / "t.npy"
    out["trunc"].write_bytes(out["c"].read_bytes()[:-10])
    out["bad"] = tmp_path / "bad.npy"
    out["bad"].write_bytes(b"not numpy at all")
    return out


def test_npy_text(files, capsys):
    assert main(["info", str(files["c"]), str(files["f"])]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert str(files["c"]) in out
    assert "format      .npy 1.0" in out
    assert "shape       (4, 6) (24 elements)" in out
    assert "<f4 (float32)" in out
    assert "order       C" in out and "order       Fortran" in out
    assert "data offset 128" in out
    assert "224 bytes on disk, 224 expected (ok)" in out
    assert "pickled     no" in out
    assert ">i8 (int64)" in out


def test_object_npy_shows_element_count(files, capsys):
    assert main(["info", str(files["obj"])]) == 0
    out = capsys.readouterr().out
    assert "(2, 3) (6 elements)" in out
    assert "pickled     yes" in out
    assert "size not fixed by the header" in out


def test_gzip(files, capsys):
    assert main(["info", str(files["gz"])]) == 0
    out = capsys.readouterr().out
    assert ".npy 1.0 (gzip-compressed)" in out
    assert "not checked" in out and "(4, 6)" in out


def test_npz_lines(files, capsys):
    assert main(["info", str(files["npz"]), str(files["npzc"])]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{files['npz']}: .npz archive, 2 members"
    a_line = next(line for line in out[1:3] if line.strip().startswith("a "))
    assert "stored" in a_line and "memmap: yes" in a_line and "shape (3,)" in a_line
    comp = out[out.index(f"{files['npzc']}: .npz archive, 2 members") + 1 :]
    assert "deflated" in comp[0] and "memmap: no (use load/iter_batches)" in comp[0]
    assert "objects: ObjectArray" in comp[1] and "pickled objects" in comp[1]


def test_npz_one_member(tmp_path, capsys):
    path = tmp_path / "one.npz"
    np.savez(path, a=np.arange(3))
    assert main(["info", str(path)]) == 0
    assert capsys.readouterr().out.startswith(f"{path}: .npz archive, 1 member\n")


def test_json(files, capsys):
    args = ["info", "--json", str(files["c"]), str(files["f"]), str(files["npzc"]), str(files["obj"])]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    c, f, z, o = data
    assert c == {
        "path": str(files["c"]), "kind": "npy", "compression": None, "version": "1.0",
        "shape": [4, 6], "count": 24, "dtype": "<f4", "dtype_text": "<f4 (float32)",
        "fortran_order": False, "data_offset": 128, "pickled": False, "nbytes": 96,
        "file_size": 224, "expected_size": 224, "size_status": "ok",
    }
    assert f["fortran_order"] is True and f["dtype"] == ">i8"
    assert z["kind"] == "npz"
    assert [(m["name"], m["compression"], m["can_memmap"], m["pickled"]) for m in z["members"]] == [
        ("a", "deflated", False, False), ("o", "deflated", False, True)]
    assert o["pickled"] is True and o["count"] == 6 and o["expected_size"] is None


def test_bad_file_one_line_exit_1(files, capsys):
    assert main(["info", str(files["bad"]), str(files["c"])]) == 1
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("npystream info: error: ")
    assert str(files["bad"]) in lines[0] and "magic" in lines[0]
    assert "Traceback" not in err
    assert str(files["c"]) in out  # the good file was still described


def test_truncated_file_exit_1(files, capsys):
    assert main(["info", str(files["trunc"])]) == 1
    out, err = capsys.readouterr()
    assert "TRUNCATED: 10 bytes missing" in out
    assert err.count("\n") == 1 and "truncated" in err


def test_missing_file_and_json_error_entry(files, tmp_path, capsys):
    missing = str(tmp_path / "nope.npy")
    assert main(["info", "--json", missing]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out) == [{"path": missing, "error": f"{missing}: no such file"}]
    assert err.strip() == f"npystream info: error: {missing}: no such file"


def test_debug_shows_traceback(files, capsys):
    assert main(["--debug", "info", str(files["bad"])]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_usage_error(capsys):
    assert main(["info"]) == 2
    assert "FILE" in capsys.readouterr().err


def test_npz_damaged_member_exit_1_other_files_fine(tmp_path, capsys):
    import zipfile

    path = tmp_path / "d.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("good.npy", _npy(np.arange(3)))
        zf.writestr("bad.npy", b"\x93NUMPX garbage")
        zf.writestr("README.txt", b"not an array, listed without complaint")
    assert main(["info", str(path)]) == 1
    out, err = capsys.readouterr()
    assert "good" in out and "README.txt" in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "bad" in lines[0] and "magic" in lines[0]


def _npy(arr):
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_info_on_a_ragged_store(tmp_path, capsys):
    import npystream

    store = tmp_path / "t.ragged"
    npystream.save_ragged(store, [np.arange(n, dtype="<i4") for n in (3, 0, 5)])
    assert main(["info", str(store)]) == 0
    out = capsys.readouterr().out
    assert "ragged store" in out and "3 (0-5 items per element)" in out and "<i4" in out
    assert main(["info", "--json", str(store)]) == 0
    (d,) = json.loads(capsys.readouterr().out)
    assert d["kind"] == "ragged" and d["count"] == 3 and d["nitems"] == 8


def test_open_object_npy_refuses_write_modes(tmp_path):
    import npystream

    a = np.empty(2, object)
    a[0], a[1] = 1, "x"
    np.save(tmp_path / "o.npy", a)
    with pytest.raises(ValueError, match="read-only"):
        npystream.open(tmp_path / "o.npy", mode="r+")
