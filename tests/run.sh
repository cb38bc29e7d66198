#!/usr/bin/env bash
# The test command from the README: the whole suite on the C accelerator,
# then again on the pure-Python fallback (NPYSTREAM_PURE_PYTHON=1).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q -n 2 -p no:cacheprovider "$@"
NPYSTREAM_PURE_PYTHON=1 python -m pytest -q -n 2 -p no:cacheprovider "$@"
