"""``npystream concat`` through main([...]) on real files: output, axes, exit codes, atomic output."""

from __future__ import annotations

import numpy as np
import pytest

from npystream.cli import main


@pytest.fixture
def files(tmp_path):
    arrays = [np.arange(i * 100, i * 100 + 6 * (i + 1), dtype="<f4").reshape(-1, 2) for i in range(3)]
    paths = []
    for i, a in enumerate(arrays):
        paths.append(str(tmp_path / f"p{i}.npy"))
        np.save(paths[-1], a)
    return arrays, paths


def test_axis0_kernel_copy(tmp_path, files, capsys):
    arrays, paths = files
    out = str(tmp_path / "out.npy")
    assert main(["concat", *paths, "-o", out]) == 0
    np.testing.assert_array_equal(np.load(out), np.concatenate(arrays))
    err = capsys.readouterr().err
    assert "concatenated 3 files" in err and "kernel copy" in err
    assert main(["concat", *paths, "-o", out]) == 1  # exists
    assert "--overwrite" in capsys.readouterr().err
    assert main(["concat", "-q", "--overwrite", paths[0], paths[0], "-o", out]) == 0
    np.testing.assert_array_equal(np.load(out), np.concatenate([arrays[0]] * 2))
    assert capsys.readouterr().err == ""


def test_other_axis_and_cast_stream(tmp_path, capsys):
    a = np.arange(12, dtype="<i2").reshape(3, 4)
    b = np.arange(6, dtype="<f4").reshape(3, 2)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    out = str(tmp_path / "o.npy")
    assert main(["concat", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--axis", "1", "-o", out]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dtype" in err and "b.npy" in err
    assert main(["concat", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--axis", "-1",
                 "--dtype", "float64", "-o", out]) == 0
    np.testing.assert_array_equal(np.load(out), np.concatenate([a, b], axis=1, dtype=np.float64))
    assert "streamed" in capsys.readouterr().err


def test_bad_input_and_usage_exit_codes(tmp_path, files, capsys):
    _, paths = files
    out = str(tmp_path / "o.npy")
    (tmp_path / "junk.npy").write_bytes(b"not a numpy file at all")
    assert main(["concat", paths[0], str(tmp_path / "junk.npy"), "-o", out]) == 1
    assert "not a .npy" in capsys.readouterr().err
    assert main(["concat", paths[0], str(tmp_path / "missing.npy"), "-o", out]) == 1
    assert main(["concat", paths[0], "--axis", "3", "-o", out]) == 1
    assert main(["concat", paths[0]]) == 2  # -o is required
    assert not (tmp_path / "o.npy").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.npy", "p0.npy", "p1.npy", "p2.npy"]
