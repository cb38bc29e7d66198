"""convert: object .npy (file, .npz member, .npy.gz, stdin) -> ragged store; safety; mismatched
elements; --resume; atomicity under real signals; the memory bound (two input sizes)."""

from __future__ import annotations

import fractions
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from objcases import save_float32_arrays

pytest.importorskip("npystream.objects", reason="iter_objects (issue 3) not in the tree yet")

import npystream  # noqa: E402
from npystream.cli import main  # noqa: E402
from npystream.conversion import convert  # noqa: E402
from npystream.demo import measure  # noqa: E402
from npystream.errors import CastError, UnsafePickleError  # noqa: E402
from npystream.formats.objwriter import object_npy_header, save_objects  # noqa: E402
from npystream.verification import equal, verify  # noqa: E402


def _f32(n=200, seed=0, lo=0, hi=300):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(int(k), dtype=np.float32) for k in rng.integers(lo, hi, n)]


def _save(path, items):
    arr = np.empty(len(items), object)
    for i, x in enumerate(items):
        arr[i] = x
    np.save(path, arr, allow_pickle=True)


def _leftovers(d):
    return sorted(n for n in os.listdir(d) if "npystream-tmp" in n or ".tmp-" in n)


@pytest.mark.parametrize("items", [
    _f32(),
    [np.arange(i * 6, dtype="<i8").reshape(i, 2, 3) for i in range(5)],
    ["héllo", "", "wörld"] * 10,
    [b"ab", b"", b"\x00"],
    [np.float64(1.5) * np.ones((), "<f8")] * 3,
])
def test_object_npy_to_ragged(tmp_path, items):
    _save(tmp_path / "a.npy", items)
    res = convert(tmp_path / "a.npy", tmp_path / "a.ragged")
    r = npystream.open(tmp_path / "a.ragged")
    assert len(r) == len(items) == res.elements
    assert verify(tmp_path / "a.npy", tmp_path / "a.ragged").equal
    assert res.bytes_in == os.path.getsize(tmp_path / "a.npy") and res.bytes_out > 0
    assert _leftovers(tmp_path) == []


def test_round_trip_npy_ragged_npy_is_byte_identical(tmp_path):
    items = _f32(2500)
    _save(tmp_path / "a.npy", items)
    assert main(["convert", str(tmp_path / "a.npy"), str(tmp_path / "a.ragged"), "-q"]) == 0
    assert main(["convert", str(tmp_path / "a.ragged"), str(tmp_path / "b.npy"), "-q", "--verify"]) == 0
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()


def test_npz_member_gzip_and_stdin_sources(tmp_path):
    items = _f32(50)
    _save(tmp_path / "a.npy", items)
    arr = np.load(tmp_path / "a.npy", allow_pickle=True)
    np.savez(tmp_path / "s.npz", objs=arr, other=np.arange(3))
    np.savez_compressed(tmp_path / "c.npz", objs=arr)
    with open(tmp_path / "a.npy", "rb") as f, gzip.open(tmp_path / "a.npy.gz", "wb") as g:
        shutil.copyfileobj(f, g)
    for i, src in enumerate((f"{tmp_path / 's.npz'}:objs", f"{tmp_path / 'c.npz'}:objs.npy",
                             str(tmp_path / "a.npy.gz"))):
        convert(src, tmp_path / f"o{i}.ragged")
        assert verify(tmp_path / "a.npy", tmp_path / f"o{i}.ragged").equal
    for i, name in enumerate(("a.npy", "a.npy.gz")):
        for how in ("pipe", "redirect"):
            dst = tmp_path / f"stdin{i}{how}.ragged"
            if how == "pipe":
                cat = subprocess.Popen(["cat", str(tmp_path / name)], stdout=subprocess.PIPE)
                out = subprocess.run([sys.executable, "-m", "npystream", "convert", "-", str(dst)],
                                     stdin=cat.stdout, capture_output=True, text=True)
                cat.stdout.close()
                cat.wait()
            else:
                with open(tmp_path / name, "rb") as f:
                    out = subprocess.run([sys.executable, "-m", "npystream", "convert", "-", str(dst)],
                                         stdin=f, capture_output=True, text=True)
            assert out.returncode == 0, out.stderr
            assert out.stdout == ""
            assert verify(tmp_path / "a.npy", dst).equal


def test_mismatched_element_names_index_and_fix(tmp_path, capsys):
    items = [np.arange(3, dtype="<f4"), np.arange(2, dtype="<f4"), {"a": 1}, np.arange(1, dtype="<f4")]
    _save(tmp_path / "a.npy", items)
    with pytest.raises(CastError) as ei:
        convert(tmp_path / "a.npy", tmp_path / "a.ragged")
    assert ei.value.index == 2 and "--kind object" in str(ei.value)
    assert not (tmp_path / "a.ragged").exists() and _leftovers(tmp_path) == []
    assert main(["convert", str(tmp_path / "a.npy"), str(tmp_path / "a.ragged")]) == 1
    err = capsys.readouterr().err
    assert "element 2" in err and "--kind object" in err and err.count("\n") == 1
    assert main(["convert", str(tmp_path / "a.npy"), str(tmp_path / "a.ragged"), "--kind", "object", "-q"]) == 0
    assert equal(npystream.open(tmp_path / "a.ragged")[2], {"a": 1})


def test_mixed_dtypes_need_cast(tmp_path):
    items = [np.arange(3, dtype="<f8"), np.arange(2, dtype="<f4"), np.arange(2, dtype="<i8")]
    _save(tmp_path / "a.npy", items)
    with pytest.raises(CastError, match="--cast same_kind") as ei:
        convert(tmp_path / "a.npy", tmp_path / "a.ragged")
    assert ei.value.index == 1 and not (tmp_path / "a.ragged").exists()
    convert(tmp_path / "a.npy", tmp_path / "a.ragged", cast="same_kind")
    r = npystream.open(tmp_path / "a.ragged")
    assert r.dtype == np.dtype("<f8") and r[2].tolist() == [0.0, 1.0] and r[1].dtype == np.dtype("<f8")
    _save(tmp_path / "c.npy", items + [np.array([1j])])
    with pytest.raises(CastError) as ei:
        convert(tmp_path / "c.npy", tmp_path / "c.ragged", cast="same_kind")
    assert ei.value.index == 3 and not (tmp_path / "c.ragged").exists()
    assert _leftovers(tmp_path) == []


def test_safe_mode_refuses_unknown_globals(tmp_path, capsys):
    items = [fractions.Fraction(1, 3), fractions.Fraction(2, 3)]
    _save(tmp_path / "a.npy", items)
    with pytest.raises(UnsafePickleError):
        convert(tmp_path / "a.npy", tmp_path / "a.ragged")
    assert not (tmp_path / "a.ragged").exists() and _leftovers(tmp_path) == []
    assert main(["convert", str(tmp_path / "a.npy"), str(tmp_path / "a.ragged")]) == 1
    assert "fractions" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "a.npy"), str(tmp_path / "b.ragged"), "-q",
                 "--allow-global", "fractions.Fraction", "--kind", "object"]) == 0
    assert main(["convert", str(tmp_path / "a.npy"), str(tmp_path / "c.ragged"), "-q",
                 "--trusted", "--kind", "object"]) == 0
    assert len(npystream.open(tmp_path / "c.ragged")) == 2


def test_code_execution_global_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    payload = (b"\x80\x04cos\nsystem\n(V touch " + str(marker).encode() + b"\ntR.")
    (tmp_path / "evil.npy").write_bytes(object_npy_header(1) + payload)
    assert main(["convert", str(tmp_path / "evil.npy"), str(tmp_path / "e.ragged"), "-q"]) == 1
    assert not marker.exists() and not (tmp_path / "e.ragged").exists()


def test_existing_dst_and_overwrite(tmp_path):
    _save(tmp_path / "a.npy", _f32(10))
    convert(tmp_path / "a.npy", tmp_path / "a.ragged")
    with pytest.raises(FileExistsError):
        convert(tmp_path / "a.npy", tmp_path / "a.ragged")
    _save(tmp_path / "b.npy", _f32(7, seed=3))
    convert(tmp_path / "b.npy", tmp_path / "a.ragged", overwrite=True)
    assert len(npystream.open(tmp_path / "a.ragged")) == 7 and _leftovers(tmp_path) == []


# --------------------------------------------------------------------------- real processes

def _big_object_file(path, mb):
    rng = np.random.default_rng(0)
    n = max(1, int(mb * 1e6 / 4 / 25_000))
    save_objects(path, (rng.standard_normal(int(k), dtype=np.float32)
                        for k in rng.integers(1000, 49_000, n)), length=n)
    return n


@pytest.fixture(scope="module")
def big_npy(tmp_path_factory):
    d = tmp_path_factory.mktemp("bigobj")
    _big_object_file(d / "big.npy", 200)
    return d / "big.npy"


def _spawn(*args):
    return subprocess.Popen([sys.executable, "-m", "npystream", "convert", *map(str, args), "-q"],
                            stderr=subprocess.PIPE, text=True)


def _wait(cond, proc, timeout=30.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_signal_leaves_no_dst(tmp_path, big_npy, sig):
    dst = tmp_path / "out.ragged"
    for _attempt in range(5):  # a fast machine may finish before the signal lands: try again
        proc = _spawn(big_npy, dst)
        seen = _wait(lambda: _leftovers(tmp_path), proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        if seen and proc.returncode != 0:
            break
        shutil.rmtree(dst, ignore_errors=True)
    else:
        pytest.fail("every conversion finished before it could be interrupted")
    assert not dst.exists()
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130, err
        assert _leftovers(tmp_path) == []
    assert main(["convert", str(big_npy), str(dst), "-q"]) == 0  # a later run starts over and succeeds
    assert _leftovers(tmp_path) == []
    assert verify(big_npy, dst).equal


def _partial_count(d):
    for n in os.listdir(d):
        meta = os.path.join(d, n, "meta.json")
        if n.endswith("partial.npystream-tmp") and os.path.exists(meta):
            try:
                with open(meta) as f:
                    return json.load(f)["count"]
            except (OSError, ValueError):
                return 0
    return 0


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_resume_after_interruption(tmp_path, big_npy, sig, capsys):
    dst = tmp_path / "out.ragged"
    for _attempt in range(5):  # a fast machine may finish before the signal lands: try again
        proc = _spawn(big_npy, dst, "--resume")
        seen = _wait(lambda: _partial_count(tmp_path) > 0, proc)
        proc.send_signal(sig)
        proc.communicate(timeout=60)
        if seen and proc.returncode != 0:
            break
        shutil.rmtree(dst, ignore_errors=True)
    else:
        pytest.fail("every conversion finished before a commit could be interrupted")
    assert not dst.exists()
    done = _partial_count(tmp_path)
    assert done > 0
    res = convert(big_npy, dst, resume=True)
    assert res.resumed_from >= done and res.resumed_from < res.elements
    assert verify(big_npy, dst).equal
    assert _leftovers(tmp_path) == []


def test_resume_refuses_a_different_source(tmp_path):
    _save(tmp_path / "a.npy", _f32(10))
    _save(tmp_path / "b.npy", _f32(12, seed=1))
    # leave a partial conversion of a.npy behind (what a killed --resume run leaves)
    from npystream._atomic import temp_name
    from npystream.formats.ragged import save_ragged

    partial = temp_name(str(tmp_path / "o.ragged"), "partial")
    save_ragged(partial, _f32(10)[:4])
    info = npystream.conversion.describe_source(str(tmp_path / "a.npy")).identity
    with open(partial + ".json", "w") as f:
        json.dump(dict(info, kind=None, cast=None), f)
    with pytest.raises(npystream.FormatError, match="different source"):
        convert(tmp_path / "b.npy", tmp_path / "o.ragged", resume=True)
    res = convert(tmp_path / "a.npy", tmp_path / "o.ragged", resume=True)
    assert res.resumed_from == 4 and verify(tmp_path / "a.npy", tmp_path / "o.ragged").equal


_CONVERT_CHILD = """
import json, sys
from npystream.conversion import convert
r = convert(sys.argv[1], sys.argv[2], progress=False)
print(json.dumps({"n": r.elements}))
"""


@pytest.mark.slow
def test_memory_bounded_on_two_sizes(tmp_path):
    peaks = {}
    for mb in (60, 400):
        src = tmp_path / f"m{mb}.npy"
        n = _big_object_file(src, mb)
        m = measure(_CONVERT_CHILD, str(src), str(tmp_path / f"m{mb}.ragged"))
        assert m.returncode == 0, m.stderr
        assert m.out["n"] == n
        if m.peak is None:
            pytest.skip("no /proc: cannot sample RssAnon")
        peaks[mb] = m.peak
        os.unlink(src)
        shutil.rmtree(tmp_path / f"m{mb}.ragged")
    assert peaks[400] < 200 * 2**20, peaks  # the bound
    assert peaks[400] < peaks[60] + 32 * 2**20, peaks  # does not grow with the input


def test_progress_bar_on_stderr_with_element_total(tmp_path, capsys):
    _save(tmp_path / "a.npy", _f32(300))
    assert main(["convert", str(tmp_path / "a.npy"), str(tmp_path / "a.ragged"), "--progress"]) == 0
    cap = capsys.readouterr()
    assert cap.out == ""
    assert "300/300" in cap.err and "el" in cap.err  # elements done / header's element count
    lines = [ln for ln in cap.err.replace("\r", "\n").splitlines() if ln.strip()]
    assert lines[-1].startswith("converted ") and "300 elements" in lines[-1] and "MB/s" in lines[-1]
    assert main(["convert", str(tmp_path / "a.npy"), str(tmp_path / "b.ragged")]) == 0
    err = capsys.readouterr().err  # stderr is not a terminal here: no bar, only the summary
    assert "%|" not in err and err.count("\n") == 1


def test_many_elements_are_streamed_without_an_index(tmp_path, monkeypatch, index_builds):
    """Above elements.STREAM_ABOVE elements a plain file is read front to back (no 16-byte-per-element
    index is built): the same store, and --resume works from the stream too."""
    import npystream.elements as elements

    built = index_builds
    monkeypatch.setattr(elements, "STREAM_ABOVE", 10)
    p = tmp_path / "o.npy"
    arr = save_float32_arrays(p, 2500, 50, seed=5)
    npystream.convert(str(p), str(tmp_path / "s.ragged"), progress=False)
    assert built == []
    r = npystream.RaggedArray(str(tmp_path / "s.ragged"))
    assert len(r) == 2500 and all(np.array_equal(a, b) for a, b in zip(arr, r))
    # from element 1000 (what --resume does): the first 1000 are read and dropped
    got = list(elements.open_elements(elements.describe_source(str(p)), start=1000, views=True))
    assert len(got) == 1500 and all(np.array_equal(a, b) for a, b in zip(arr[1000:], got))
    assert built == []
    monkeypatch.setattr(elements, "STREAM_ABOVE", 10_000)  # below it: the indexed one-pass reader
    npystream.convert(str(p), str(tmp_path / "t.ragged"), progress=False)
    assert built
