"""Every ```python block of the README runs, against small files of the names it uses.

The recipes are checked too: the per-element sums of the ragged-store tour equal a Python loop's,
empty elements included.
"""

from __future__ import annotations

import gzip
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from objcases import obj_array

import npystream

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.M | re.S)


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


@pytest.fixture
def readme_files(tmp_path, monkeypatch, numpy_testdata):
    """The files the README's snippets name, small, in a fresh working directory."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    np.save("sequences.npy", obj_array([rng.integers(0, 9, int(n)) for n in rng.integers(0, 20, 30)]))
    np.save("ragged.npy", obj_array([rng.standard_normal(int(n)).astype("<f4") for n in rng.integers(0, 50, 200)]))
    shutil.copy(numpy_testdata / "py2-objarr.npy", "py2.npy")
    np.save("big.npy", rng.standard_normal((1000, 8)))
    with open("big.npy", "rb") as f, gzip.open("big.npy.gz", "wb") as g:
        shutil.copyfileobj(f, g)
    with zipfile.ZipFile("data.npz", "w") as z:
        z.writestr("a.npy", _npy_bytes(np.arange(10.0)), compress_type=zipfile.ZIP_STORED)
        z.writestr("compressed_member.npy", _npy_bytes(np.arange(9000)), compress_type=zipfile.ZIP_DEFLATED)
    for name in ("a.npy", "b.npy", "memmap.npy", "other.npy"):  # deferred arithmetic
        np.save(name, rng.random((2000, 8)))
    for name in ("x0.npy", "x1.npy", "part0.npy", "part1.npy", "part2.npy"):  # concatenation
        np.save(name, rng.standard_normal((1000, 4)))
    np.save("objs.npy", obj_array([rng.integers(0, 9, int(n)) for n in rng.integers(1, 20, 50)]))  # Dask
    return tmp_path


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("number", range(len(BLOCKS)))
def test_readme_block_runs(readme_files, number):
    code = BLOCKS[number]
    if "init_process_group" in code:
        pytest.skip("a torchrun snippet: needs several processes and GPUs (nccl)")
    if "to_arrow" in code:
        pytest.importorskip("pyarrow")
        pytest.importorskip("awkward")
    if "to_dask" in code:
        pytest.importorskip("dask.bag")
    if "torch" in code:
        pytest.importorskip("torch")
    if "tokens.ragged" in code and 'save_ragged("tokens.ragged"' not in code:
        npystream.save_ragged("tokens.ragged", (np.arange(n, dtype="<i4") for n in range(1, 200)))
    seen = []
    namespace = {
        "np": np,
        "npystream": npystream,  # later blocks continue the tour
        "train_step": lambda *batch: seen.append(batch),  # the README's stand-ins for a user's code
        "model": lambda x: x,
        "generator": lambda: (np.arange(k) for k in range(3)),
        "rows": np.zeros((5, 8)),
        "f": len,
    }
    exec(compile(code, f"README.md python block {number + 1}", "exec"), namespace)  # noqa: S102
    if "sequences.npy" in code:
        assert len(seen) == 30


def test_readme_segment_sums_recipe_handles_empty_elements(tmp_path):
    """The tour's recipe, extracted from the README, on elements with empty ones (also last)."""
    block = next(b for b in BLOCKS if "reduceat" in b)
    lines = block.splitlines()
    at = next(i for i, line in enumerate(lines) if "iter_batches(65536)" in line)
    body = [line[4:].split("#")[0].rstrip() for line in lines[at + 1 : at + 4]]
    rows = [[5, 6], [], [7, 8, 9], [], [1], []]
    store = npystream.save_ragged(tmp_path / "t.ragged", [np.array(r, dtype="<i8") for r in rows])
    got = []
    for values, offsets in npystream.open(tmp_path / "t.ragged").iter_batches(4):
        scope = {"np": np, "values": values, "offsets": offsets}
        exec("\n".join(body), scope)  # noqa: S102
        got.extend(scope["sums"].tolist())
    assert got == [sum(r) for r in rows]
    del store
