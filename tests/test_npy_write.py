"""create_npy / append_npy: standard headers, appends in place, the no-room rewrite, crash safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import npystream
from npystream.formats.npy import read_header


@pytest.mark.parametrize("shape,dtype,fortran", [((3, 4), "<f8", False), ((5,), ">i2", False),
                                                 ((2, 3, 4), "<c8", True), ((0, 3), "u1", False),
                                                 ((), "<f4", False)])
def test_create_npy_matches_np_save(tmp_path, shape, dtype, fortran):
    path = tmp_path / "c.npy"
    mm = npystream.create_npy(path, shape, dtype, fortran_order=fortran)
    assert mm.shape == shape and mm.dtype == np.dtype(dtype)
    want = np.arange(int(np.prod(shape))).astype(dtype).reshape(shape, order="F" if fortran else "C")
    mm[...] = want
    if isinstance(mm, np.memmap):
        mm.flush()
    del mm
    np.testing.assert_array_equal(np.load(path), want)
    ref = tmp_path / "ref.npy"
    np.save(ref, np.asfortranarray(want) if fortran else want)
    assert path.read_bytes()[:read_header(ref).data_offset] == ref.read_bytes()[:read_header(ref).data_offset]
    with pytest.raises(FileExistsError, match="overwrite"):
        npystream.create_npy(path, shape, dtype)
    with pytest.raises(npystream.UnsupportedError, match="save_objects"):
        npystream.create_npy(tmp_path / "o.npy", 3, object)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npy", "ref.npy"]


def test_accepted_answer_out_create_npy(tmp_path):
    a = np.arange(10.0)
    np.add(a, 2, out=npystream.create_npy(tmp_path / "b.npy", a.shape, a.dtype))
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), a + 2)


def test_append_in_place_many_times(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, np.arange(6, dtype="<i4").reshape(2, 3))
    offset = read_header(path).data_offset
    want = [np.arange(6, dtype="<i4").reshape(2, 3)]
    for i in range(1, 30):
        rows = np.full((i % 4, 3), i, dtype="<i4")
        assert npystream.append_npy(path, rows, durable=False) == (sum(len(w) for w in want) + len(rows), 3)
        want.append(rows)
    assert npystream.append_npy(path, [7, 8, 9]) == (sum(len(w) for w in want) + 1, 3)  # one row, a list
    want.append(np.array([[7, 8, 9]], "<i4"))
    np.testing.assert_array_equal(np.load(path), np.concatenate(want))
    assert read_header(path).data_offset == offset  # grew in place
    assert os.path.getsize(path) == offset + np.concatenate(want).nbytes


def test_append_rewrites_once_when_the_header_has_no_room(tmp_path):
    path = tmp_path / "tight.npy"
    body = b"{'descr': '<f4', 'fortran_order': False, 'shape': (9,), }\n"
    with open(path, "wb") as f:  # no padding at all (valid, unaligned): 9 rows -> 10 needs a digit
        f.write(b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body)
        f.write(np.arange(9, dtype="<f4").tobytes())
    from npystream.formats.npy import encode_header_in_place

    assert np.load(path).shape == (9,)
    assert encode_header_in_place(read_header(path), (10,)) is None
    before = read_header(path).data_offset
    npystream.append_npy(path, np.arange(10 ** 3, dtype="<f4"))
    assert read_header(path).data_offset % 64 == 0  # rewritten with numpy's aligned, roomy header
    assert npystream.append_npy(path, np.ones(1, "<f4")) == (1010,)
    np.testing.assert_array_equal(np.load(path), np.concatenate([np.arange(9), np.arange(1000), [1]]).astype("<f4"))
    assert read_header(path).data_offset >= before
    assert [p.name for p in tmp_path.iterdir()] == ["tight.npy"]  # no temporary left behind


def test_append_refuses_bad_input(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, np.zeros((2, 3), "<f8"))
    with pytest.raises(npystream.ShapeError, match=r"\(2, 4\).*\(2, 3\)"):
        npystream.append_npy(path, np.zeros((2, 4)))
    with pytest.raises(npystream.CastError, match="astype"):
        npystream.append_npy(path, np.zeros((2, 3), np.float32))
    npystream.append_npy(path, np.zeros((1, 3), ">f8"))  # same values, other byte order: fine
    f = tmp_path / "f.npy"
    np.save(f, np.asfortranarray(np.zeros((2, 3))))
    with pytest.raises(npystream.UnsupportedError, match="Fortran"):
        npystream.append_npy(f, np.zeros((1, 3)))
    s = tmp_path / "s.npy"
    np.save(s, np.float64(3))
    with pytest.raises(npystream.UnsupportedError, match="0-d"):
        npystream.append_npy(s, np.zeros(1))
    t = tmp_path / "t.npy"
    np.save(t, np.zeros(100))
    os.truncate(t, 200)
    with pytest.raises(npystream.TruncatedError):
        npystream.append_npy(t, np.zeros(3))
    o = tmp_path / "o.npy"
    np.save(o, np.array([None]), allow_pickle=True)
    with pytest.raises(npystream.UnsupportedError):
        npystream.append_npy(o, np.zeros(1))
    np.testing.assert_array_equal(np.load(path), np.zeros((3, 3)))


CHILD = textwrap.dedent("""
    import sys, numpy as np, npystream
    path = sys.argv[1]
    i = 0
    while True:
        i += 1
        npystream.append_npy(path, np.full((1 + i % 3, 64), i, dtype="<i8"), durable=False)
        if i % 50 == 0:
            sys.stdout.write("."); sys.stdout.flush()
""")


@pytest.mark.slow  # four child interpreters: about 3-5 s
def test_sigkill_at_any_instant_leaves_a_loadable_file(tmp_path):
    path = tmp_path / "grow.npy"
    rng = np.random.default_rng(0)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    np.save(path, np.zeros((0, 64), "<i8"))
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, env=env)
        proc.stdout.read(1)  # it is appending
        time.sleep(float(rng.uniform(0, 0.05)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        arr = np.load(path)  # never a header promising more than the file holds
        assert arr.shape[1] == 64
        h = read_header(path)
        assert os.path.getsize(path) >= h.data_offset + h.nbytes
        # every row holds one run's counter: rows come in whole appends, in order
        firsts = arr[:, 0]
        assert (arr == firsts[:, None]).all()
    assert len(np.load(path)) > 0
