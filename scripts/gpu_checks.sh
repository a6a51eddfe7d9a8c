#!/usr/bin/env bash
# Every GPU check of the project in one call, for a machine with a GPU that has torch, transformers and
# accelerate but maybe not datasets, faiss, ir-measures or pytest, and maybe no network:
#
#   bash scripts/gpu_checks.sh
#
# Where the GPU machine is offline and lacks pytest, fetch its wheels first, from the checkout on a machine
# with network access, and bring .gpu_wheels/ along with the checkout; the script installs them from there:
#   python -m pip download --no-deps -d .gpu_wheels pytest pluggy iniconfig
# Smoke test on a CPU (tiny sizes, no CUDA tests):
#   DEVICE=cpu QUICK=1 OUT=/tmp/gpu bash scripts/gpu_checks.sh
#
# Writes under $OUT: env.txt, pytest.txt (the CUDA tests), and the GPU columns of the benchmarks:
# loss_memory_cuda.json/png, cache_step_cuda.json, train_step_cuda.json, grad_cache_step_cuda.json (+ their
# printed tables in *.txt).
# Each step has its own time limit and a failing step does not stop the others; the exit code counts failures.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failures=0
step() {  # step NAME SECONDS CMD...: run with a limit, keep its output, count a failure
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date +%T))"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.txt"
  [ "$rc" -eq 0 ] || { echo "!! $name failed (rc $rc)"; failures=$((failures + 1)); }
}

{ nvidia-smi 2>&1 || true; python -c "import torch, transformers, accelerate as a; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), \
'transformers', transformers.__version__, 'accelerate', a.__version__)"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "$DEVICE" = cuda ]; then
  python -c "import pytest" 2>/dev/null || python -m pip install -q --no-index --no-deps .gpu_wheels/*.whl
  step pytest 120 python -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_topk.py
fi

if [ "$QUICK" = 1 ]; then
  step loss_memory 120 python bench/loss_memory.py --device "$DEVICE" --quick \
    --out "$OUT/loss_memory_$DEVICE.json"
  step cache_step 120 python bench/cache_step.py --device "$DEVICE" --quick \
    --out "$OUT/cache_step_$DEVICE.json"
  step train_step 120 python bench/train_step.py --device "$DEVICE" --layers 1 --hidden 64 --batch-size 2 \
    --group-size 2 --query-len 8 --passage-len 16 --repeats 1 --out "$OUT/train_step_$DEVICE.json"
  step grad_cache_step 120 python bench/grad_cache_step.py --device "$DEVICE" --quick \
    --out "$OUT/grad_cache_step_$DEVICE.json"
else  # the whole script fits in 10 minutes on one GPU: the per-step limits add up to 600 s
  # BERT-base, batch 64, bf16 table: the cache's own work vs an in-batch step (issue 5: <= 15% at 1M x 768)
  step cache_step 120 python bench/cache_step.py --device "$DEVICE" --layers 12 --batch-size 64 \
    --passage-len 128 --table-dtype bfloat16 --out "$OUT/cache_step_$DEVICE.json"
  # the msmarco_inbatch shape: BERT-base, 64 queries x group 8, fp32 vs bf16 (issue 4)
  step train_step 90 python bench/train_step.py --device "$DEVICE" --layers 12 --batch-size 64 \
    --group-size 8 --out "$OUT/train_step_$DEVICE.json"
  # GradCache against the plain step (time, memory) and sentence-transformers' cached loss: BERT-base, B = 512
  step grad_cache_step 120 python bench/grad_cache_step.py --device "$DEVICE" --layers 12 --hidden 768 \
    --heads 12 --intermediate 3072 --batch-size 512 --chunk 64 --out "$OUT/grad_cache_step_$DEVICE.json"
  # SCE vs full CE at d = 768, N = 512 (issue 7); CE's logits alone need ~4 GiB per 10^6 items
  step loss_memory 150 python bench/loss_memory.py --device "$DEVICE" --dim 768 --num-rows 512 \
    --losses ce sce bce gbce ce_minus --catalog-sizes 100000 1000000 --max-gib 100 \
    --out "$OUT/loss_memory_$DEVICE.json"
fi
echo "== done: $failures failed step(s); files in $OUT"
exit "$failures"
