#!/usr/bin/env bash
# Files written by numpy 1.x read by npystream under numpy 2, and the reverse, on both backends
# (numpy 1.x and 2 pickle some dtype states differently).  Makes a throw-away venv with numpy<2 and
# npystream installed from this tree; `python` must be the numpy-2 environment.  Called by .ci/run.
# NUMPY1='numpy==1.23.5' picks another numpy 1.x (the default resolves to the newest, 1.26).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" -m venv "$WORK/np1"
NP1="$WORK/np1/bin/python"
"$NP1" -m pip install -q "${NUMPY1:-numpy>=1.23,<2}" more-itertools cloudpickle tqdm
"$NP1" -m pip install -q --no-deps "$ROOT"
"$NP1" tests/cross_numpy.py write "$WORK/by-numpy1"
python tests/cross_numpy.py write "$WORK/by-numpy2"
for pure in 0 1; do
  NPYSTREAM_PURE_PYTHON=$pure python tests/cross_numpy.py read "$WORK/by-numpy1"
  # from outside the tree, so that the numpy-1 venv imports its installed npystream
  (cd "$WORK" && NPYSTREAM_PURE_PYTHON=$pure "$NP1" "$ROOT/tests/cross_numpy.py" read "$WORK/by-numpy2")
done
