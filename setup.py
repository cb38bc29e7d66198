"""Build the optional C accelerator; the package works without it.

Everything else lives in pyproject.toml.  The extension is ``optional``: when
no compiler is present the build skips it and npystream runs its pure-Python
fallback (``NPYSTREAM_PURE_PYTHON=1`` selects the fallback explicitly).
"""

from pathlib import Path

from setuptools import Extension, setup

_here = Path(__file__).parent
_ext_sources = sorted(str(p.relative_to(_here)) for p in (_here / "npystream").glob("_speedups*.c"))
ext_modules = [
    Extension(
        "npystream._speedups",
        sources=_ext_sources,
        optional=True,
        extra_compile_args=["-O2"],
    )
] if _ext_sources else []

setup(ext_modules=ext_modules)
