"""convert: the byte-stream directions (.npz -> dir, .npy.gz/stdin -> .npy), ragged -> object .npy,
refusals, exit codes, and atomic output under errors and real signals."""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

import npystream
from npystream.cli import main
from npystream.conversion import SUPPORTED, convert
from npystream.errors import FormatError, TruncatedError, UnsupportedError
from npystream.formats.ragged import save_ragged
from npystream.verification import equal


def _gz(src, dst):
    with open(src, "rb") as a, gzip.open(dst, "wb", compresslevel=1) as b:
        shutil.copyfileobj(a, b)


def _leftovers(d):
    return sorted(n for n in os.listdir(d) if "npystream-tmp" in n or ".tmp-" in n)


# --------------------------------------------------------------------------- gzip / stdin -> .npy

@pytest.mark.parametrize("arr", [
    np.arange(24, dtype=">i4").reshape(2, 3, 4),
    np.asfortranarray(np.arange(12.0).reshape(3, 4)),
    np.zeros((), dtype="<c16"),
    np.zeros((0, 3), dtype="f2"),
    np.array([(1, b"ab")], dtype=[("a", "<u2"), ("b", "S3")]),
])
def test_gzip_to_npy_is_the_original_file(tmp_path, arr):
    np.save(tmp_path / "a.npy", arr)
    _gz(tmp_path / "a.npy", tmp_path / "a.npy.gz")
    res = convert(tmp_path / "a.npy.gz", tmp_path / "b.npy", verify=True)
    assert res.notes and res.notes[-1].startswith("verified:")
    assert (tmp_path / "b.npy").read_bytes() == (tmp_path / "a.npy").read_bytes()
    m = npystream.open(tmp_path / "b.npy")
    assert isinstance(m, np.memmap) and m.dtype == arr.dtype and np.array_equal(m, arr)
    assert res.bytes_out == os.path.getsize(tmp_path / "b.npy")
    assert res.bytes_in == os.path.getsize(tmp_path / "a.npy.gz")


def _pipe_into(args, path):
    """Run `npystream ARGS` with `path` fed through a real pipe (cat | npystream ...)."""
    cat = subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE)
    out = subprocess.run([sys.executable, "-m", "npystream", *args], stdin=cat.stdout,
                         capture_output=True, text=True)
    cat.stdout.close()
    cat.wait()
    return out


@pytest.mark.parametrize("how", ["pipe", "redirect"])
def test_stdin_fixed_and_gzip_to_npy(tmp_path, how):
    np.save(tmp_path / "a.npy", np.arange(1000, dtype="<i8"))
    _gz(tmp_path / "a.npy", tmp_path / "a.npy.gz")
    for i, name in enumerate(("a.npy", "a.npy.gz")):
        args = ["convert", "-", str(tmp_path / f"o{i}.npy")]
        if how == "pipe":
            out = _pipe_into(args, tmp_path / name)
        else:
            with open(tmp_path / name, "rb") as f:
                out = subprocess.run([sys.executable, "-m", "npystream", *args], stdin=f,
                                     capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout == ""  # nothing on stdout
        assert "1000 elements" in out.stderr
        assert (tmp_path / f"o{i}.npy").read_bytes() == (tmp_path / "a.npy").read_bytes()


def test_truncated_gzip_leaves_nothing(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(10_000, dtype="<i8"))
    data = (tmp_path / "a.npy").read_bytes()[:-100]
    with gzip.open(tmp_path / "t.npy.gz", "wb") as g:
        g.write(data)
    with pytest.raises(TruncatedError, match="header promises"):
        convert(tmp_path / "t.npy.gz", tmp_path / "b.npy")
    assert not (tmp_path / "b.npy").exists() and _leftovers(tmp_path) == []
    assert main(["convert", str(tmp_path / "t.npy.gz"), str(tmp_path / "b.npy")]) == 1


def test_trailing_bytes_refused(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(10, dtype="<i8"))
    with gzip.open(tmp_path / "t.npy.gz", "wb") as g:
        g.write((tmp_path / "a.npy").read_bytes() + b"junk")
    with pytest.raises(FormatError, match="4 bytes follow"):
        convert(tmp_path / "t.npy.gz", tmp_path / "b.npy")
    assert os.listdir(tmp_path) == ["a.npy", "t.npy.gz"] or sorted(os.listdir(tmp_path)) == ["a.npy", "t.npy.gz"]


# --------------------------------------------------------------------------- .npz -> directory

@pytest.mark.parametrize("compressed", [False, True])
def test_npz_to_directory(tmp_path, compressed):
    arrays = {"x": np.arange(5.0), "y": np.ones((2, 3), ">f4"), "z": np.zeros((), "M8[s]")}
    (np.savez_compressed if compressed else np.savez)(tmp_path / "a.npz", **arrays)
    res = convert(tmp_path / "a.npz", tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["x.npy", "y.npy", "z.npy"]
    for k, v in arrays.items():
        m = np.load(tmp_path / "out" / f"{k}.npy", mmap_mode="r")
        assert isinstance(m, np.memmap) or m.shape == ()
        assert m.dtype == v.dtype and np.array_equal(m, v)
    assert res.elements == 3 and res.notes == []
    res = convert(tmp_path / "a.npz", tmp_path / "out2", verify=True)
    assert res.notes == ["verified: 3 elements equal"] or res.notes[-1].startswith("verified:")


def test_npz_object_member_copied_with_note(tmp_path):
    np.savez(tmp_path / "a.npz", o=np.array([{"a": 1}, None], dtype=object))
    res = convert(tmp_path / "a.npz", tmp_path / "out", to="npz-dir")
    assert np.load(tmp_path / "out" / "o.npy", allow_pickle=True)[0] == {"a": 1}
    assert any("not memory-mappable" in n for n in res.notes)


def test_npz_hostile_member_name_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "evil.npz", "w") as zf:
        zf.writestr("../escape.npy", b"\x93NUMPY")
    with pytest.raises(FormatError, match="not a safe file name"):
        convert(tmp_path / "evil.npz", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "escape.npy").exists()
    assert _leftovers(tmp_path) == []


def test_npz_member_not_npy_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "bad.npz", "w") as zf:
        zf.writestr("a.npy", b"not a npy at all")
    with pytest.raises(FormatError):
        convert(tmp_path / "bad.npz", tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_npz_missing_member(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.arange(3))
    with pytest.raises(FormatError, match="no member 'q'.*it has: x"):
        convert(f"{tmp_path / 'a.npz'}:q", tmp_path / "o.npy")


# --------------------------------------------------------------------------- ragged -> object .npy

@pytest.mark.parametrize("elements", [
    [np.arange(i, dtype="<f4") for i in range(7)],
    [np.arange(i * 6, dtype=">i8").reshape(i, 2, 3) for i in range(4)],
    ["héllo", "", "wörld"],
    [b"ab", b"", b"\x00"],
    [],
])
def test_ragged_to_npy_loads_back(tmp_path, elements):
    save_ragged(tmp_path / "r.ragged", elements, **({"dtype": "<f4"} if not elements else {}))
    res = convert(tmp_path / "r.ragged", tmp_path / "r.npy")
    back = np.load(tmp_path / "r.npy", allow_pickle=True)
    assert back.dtype == object and len(back) == len(elements) == res.elements
    # values and shapes as written (numpy's pickling of big-endian arrays yields native byte order)
    assert all(np.array_equal(a, b) and np.shape(a) == np.shape(b) and type(a) is type(b)
               for a, b in zip(back, elements))
    # byte-identical to np.save of the same elements
    ref = np.empty(len(elements), object)
    for i, x in enumerate(npystream.open(tmp_path / "r.ragged")):
        ref[i] = x
    np.save(tmp_path / "ref.npy", ref, allow_pickle=True)
    assert (tmp_path / "r.npy").read_bytes() == (tmp_path / "ref.npy").read_bytes()


def test_ragged_object_kind_round_trip(tmp_path):
    elements = [{"a": 1}, [1, 2], None, np.arange(3)]
    save_ragged(tmp_path / "r.ragged", elements, kind="object")
    convert(tmp_path / "r.ragged", tmp_path / "r.npy")
    back = np.load(tmp_path / "r.npy", allow_pickle=True)
    assert all(equal(a, b) for a, b in zip(back, elements))


# --------------------------------------------------------------------------- refusals and exit codes

def test_refusal_is_one_line_listing_supported(tmp_path, capsys):
    np.save(tmp_path / "f.npy", np.arange(3))
    with pytest.raises(UnsupportedError) as ei:
        convert(tmp_path / "f.npy", tmp_path / "x.ragged")
    assert SUPPORTED in str(ei.value)
    assert main(["convert", str(tmp_path / "f.npy"), str(tmp_path / "x.ragged")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "supported:" in err and "ragged store -> object .npy" in err
    save_ragged(tmp_path / "r.ragged", [np.arange(2)])
    assert main(["convert", str(tmp_path / "r.ragged"), str(tmp_path / "y.ragged")]) == 1
    assert "cannot convert a ragged store to ragged" in capsys.readouterr().err
    np.savez(tmp_path / "a.npz", x=np.arange(3))
    assert main(["convert", str(tmp_path / "a.npz"), str(tmp_path / "y.npy")]) == 1
    assert "cannot convert a whole .npz archive to npy" in capsys.readouterr().err
    assert _leftovers(tmp_path) == []


def test_exit_codes(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.arange(3))
    _gz(tmp_path / "a.npy", tmp_path / "a.npy.gz")
    assert main(["convert", str(tmp_path / "a.npy.gz"), str(tmp_path / "b.npy"), "-q"]) == 0
    assert capsys.readouterr().err == ""
    # existing DST refused (1), then replaced with --overwrite (0)
    assert main(["convert", str(tmp_path / "a.npy.gz"), str(tmp_path / "b.npy")]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "a.npy.gz"), str(tmp_path / "b.npy"), "--overwrite"]) == 0
    assert "converted" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing.npy"), str(tmp_path / "c.npy")]) == 1
    assert main(["convert", str(tmp_path / "a.npy.gz"), str(tmp_path / "no" / "c.npy")]) == 1
    assert "directory to write DST in does not exist" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "a.npy.gz")]) == 2  # usage
    assert main(["convert", "a", "b", "--to", "parquet"]) == 2
    assert main(["convert", "a", "b", "--quiet", "--progress"]) == 2
    assert main(["convert", str(tmp_path / "a.npy.gz"), str(tmp_path / "d.npy"), "--resume"]) == 1
    assert "resume works for ragged" in capsys.readouterr().err


def test_progress_forced_goes_to_stderr_only(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.arange(100_000))
    _gz(tmp_path / "a.npy", tmp_path / "a.npy.gz")
    assert main(["convert", str(tmp_path / "a.npy.gz"), str(tmp_path / "b.npy"), "--progress"]) == 0
    cap = capsys.readouterr()
    assert cap.out == ""
    assert "decompress" in cap.err and "converted" in cap.err


# --------------------------------------------------------------------------- atomicity under real signals

def _big_ragged(path, mb=120):
    rng = np.random.default_rng(0)
    n = int(mb * 1e6 / 4 / 25_000)
    save_ragged(path, (rng.standard_normal(int(k), dtype=np.float32) for k in rng.integers(1000, 49_000, n)),
                durable=False)


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    d = tmp_path_factory.mktemp("big")
    _big_ragged(d / "big.ragged")
    return d / "big.ragged"


def _wait_for_tmp(d, proc, timeout=20.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if _leftovers(d):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_signal_leaves_no_dst(tmp_path, big_store, sig):
    dst = tmp_path / "out.npy"
    for _attempt in range(5):  # a fast machine may finish before the signal lands: try again
        proc = subprocess.Popen([sys.executable, "-m", "npystream", "convert", str(big_store), str(dst), "-q"],
                                stderr=subprocess.PIPE, text=True)
        seen = _wait_for_tmp(tmp_path, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        if seen and proc.returncode != 0:
            break
        for leftover in [dst, *(tmp_path / n for n in _leftovers(tmp_path))]:
            if leftover.exists():
                leftover.unlink()
    else:
        pytest.fail("every conversion finished before it could be interrupted")
    assert not dst.exists()
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        # the temporary is recognisably ours; DST never appeared
        assert all(n.startswith(".out.npy.") for n in _leftovers(tmp_path))
    else:
        assert proc.returncode == 130, err
        assert "interrupted" in err
        assert _leftovers(tmp_path) == []
    # a later run succeeds
    assert main(["convert", str(big_store), str(dst), "-q"]) == 0
    assert len(np.load(dst, allow_pickle=True)) == len(npystream.open(big_store))


def test_public_names_stay_functions_whatever_is_imported_first():
    code = ("import npystream, npystream.conversion, npystream.verification, npystream.cli.convert; "
            "import npystream.cli.verify; "
            "assert callable(npystream.convert) and callable(npystream.verify), "
            "(npystream.convert, npystream.verify); "
            "assert callable(npystream.save_objects)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
