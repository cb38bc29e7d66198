#!/usr/bin/env bash
# The test command from the README: the suite on the C accelerator, then again on the
# pure-Python fallback (NPYSTREAM_PURE_PYTHON=1) minus the files that never reach the
# accelerator (tests/conftest.py: BACKEND_INDEPENDENT).  Tests marked slow are left out;
# `bash tests/run.sh -m slow` runs only those (CI runs both).  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q -n 2 -p no:cacheprovider -m "not slow" "$@"
NPYSTREAM_PURE_PYTHON=1 python -m pytest -q -n 2 -p no:cacheprovider -m "not slow" \
    --skip-backend-independent "$@"
