"""One optimizer step at a large in-batch batch: dualenc's plain step and GradCache step against
sentence-transformers' CachedMultipleNegativesRankingLoss and MultipleNegativesRankingLoss, side by side.

    python bench/grad_cache_step.py        # CPU: MiniLM-shaped random BERT (6 x 384), 128 x (32 + 128 tokens)
    python bench/grad_cache_step.py --device cuda   # the same shapes on a GPU

Every configuration steps the same randomly initialised BERT (dropout 0, seed 0) on the same random token ids,
B queries x 1 positive, in-batch softmax cross-entropy at τ = 0.05 (ST: ``scale`` = 1/τ), mean pooling,
L2-normalised, AdamW (lr 1e-5), fp32; one step = forward + backward + AdamW step:

- ``plain``: dualenc's ``TrainingModule`` over the whole batch + ``accelerator.backward`` (the training loop's
  step without ``grad_cache``).
- ``grad_cache``: ``dualenc.training.grad_cache.grad_cache_step`` with chunks of ``--chunk`` queries and
  passages.
- ``st_cached``: sentence-transformers' ``CachedMultipleNegativesRankingLoss(mini_batch_size=--chunk)`` on a
  SentenceTransformer (Transformer + Pooling(mean) + Normalize) loaded from the same BERT saved to a folder.
- ``st_plain``: sentence-transformers' ``MultipleNegativesRankingLoss`` (the uncached reference).
- ``plain_chunk``: dualenc's plain step at B = ``--chunk`` (the memory a chunked step should approach).

Without dropout the first four are one objective at the same weights: their first step's loss (``loss_diff``
vs plain, 1e-4) and gradient norm (``grad_rdiff``, relative 1e-4) must agree, else the script exits 1 after
writing its report. (The loss alone says little at random weights: mean-pooled embeddings of a random BERT
are nearly parallel, so it is close to log B.) Each configuration runs in a fresh subprocess. Time: median of
``--repeats`` steps after a warm-up step and the memory step. Memory: CUDA ``max_memory_allocated``; CPU: peak
RSS of one step above the RSS after the warm-up step (VmHWM reset through /proc/self/clear_refs). Output: a
table and ``bench/results/grad_cache_step_<device>.json``; ``grad_cache_step_cpu.json`` came from
``python bench/grad_cache_step.py`` (about 19 minutes on 2 cores shared with other jobs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bench_common

if TYPE_CHECKING:
    import torch

VARIANTS = ("plain", "grad_cache", "st_cached", "st_plain", "plain_chunk")
LOSS_TOLERANCE = 1e-4  # first-step losses of the same-objective configurations vs plain's (absolute)
GRAD_RTOL = 1e-4  # their first-step gradient norms vs plain's (relative)
Backward = Callable[[], "torch.Tensor"]  # one forward + backward; returns the loss, detached


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=30522, help="at least 30000 (random ids are 1000-29999)")
    p.add_argument("--batch-size", type=int, default=128, help="queries per step (B), one positive each")
    p.add_argument("--chunk", type=int, default=32, help="rows per GradCache chunk / ST mini-batch")
    p.add_argument("--query-len", type=int, default=32)
    p.add_argument("--passage-len", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.05, help="τ; sentence-transformers scale = 1/τ")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--repeats", type=int, default=3, help="timed steps (median) after warm-up + memory step")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.heads, args.intermediate = 1, 32, 2, 64
        args.batch_size, args.chunk, args.query_len, args.passage_len, args.repeats = 8, 3, 8, 16, 1
    if args.vocab < 30000:
        p.error("--vocab must be at least 30000: bench_common.random_tokens draws ids 1000-29999")
    if "plain" not in args.variants:
        p.error("--variants must include plain: the ratios and loss differences are against it")
    args.out = args.out or bench_common.REPO / "bench" / "results" / f"grad_cache_step_{args.device}.json"
    return args


def make_bert(cfg: dict):
    """The randomly initialised BERT every configuration starts from (seeded, no dropout)."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=cfg["vocab"],
        hidden_size=cfg["hidden"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        intermediate_size=cfg["intermediate"],
        max_position_embeddings=max(512, cfg["query_len"], cfg["passage_len"]),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertModel(config)


def dualenc_step(cfg: dict, bert, query: dict, doc: dict, device: torch.device) -> tuple[Backward, Any]:
    """dualenc's forward + backward (plain or GradCache) through Accelerate, and its AdamW."""
    import torch
    from accelerate import Accelerator

    from dualenc.losses.inbatch import InBatchCE
    from dualenc.model import DualEncoder, DualEncoderConfig, HFEncoder
    from dualenc.training.config import load_config
    from dualenc.training.grad_cache import grad_cache_step
    from dualenc.training.step import TrainingModule

    accelerator = Accelerator(cpu=device.type == "cpu")
    tower = HFEncoder(bert, pooling="mean", normalize=True)
    model = DualEncoder(tower, None, None, DualEncoderConfig(pooling="mean", normalize=True))
    run_cfg = load_config(None, ["random_init=true", "train_group_size=1"])
    module = TrainingModule(model.train(), InBatchCE(cfg["temperature"]), run_cfg.loss)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5)
    module, optimizer = accelerator.prepare(module, optimizer)
    b, chunks = query["input_ids"].shape[0], {"query_chunk": cfg["chunk"], "doc_chunk": cfg["chunk"]}
    batch = {
        "query": query,  # (B, Lq)
        "doc": doc,  # (B, Ld)
        "doc_idx": torch.arange(b, device=device),  # (B,)
        "positives": torch.arange(b, device=device)[:, None],  # (B, 1)
    }

    def backward() -> torch.Tensor:
        if cfg["variant"] == "grad_cache":
            output = grad_cache_step(accelerator, module, batch, None, 0, **chunks, loss_scale=1.0, sync=True)
        else:
            output = module(batch)
            accelerator.backward(output.loss)
        return output.loss.detach()

    return backward, optimizer


def write_vocab(folder: Path, size: int) -> None:
    """A WordPiece vocabulary of ``size`` entries (the ids matter, not the strings): ST loads a tokenizer."""
    from dualenc.model.random_bert import SPECIAL_TOKENS

    tokens = SPECIAL_TOKENS + [f"[unused{i}]" for i in range(size - len(SPECIAL_TOKENS))]
    (folder / "vocab.txt").write_text("".join(f"{t}\n" for t in tokens), encoding="utf-8")
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def st_api() -> dict:
    """The sentence-transformers classes the ST configurations use; ImportError where it is not installed
    (or, as with 6.2, where it cannot import without ``datasets``)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import losses, modules

    return {
        "SentenceTransformer": SentenceTransformer,
        "st_cached": losses.CachedMultipleNegativesRankingLoss,
        "st_plain": losses.MultipleNegativesRankingLoss,
        "modules": [modules.Transformer, modules.Pooling, modules.Normalize],
    }


def st_step(cfg: dict, bert, query: dict, doc: dict, device: torch.device) -> tuple[Backward, Any]:
    """sentence-transformers' (cached) MNRL forward + backward, the same BERT loaded from a folder; AdamW."""
    import torch

    api = st_api()
    transformer, pooling, normalize = api["modules"]
    with tempfile.TemporaryDirectory() as tmp:
        bert.save_pretrained(tmp)
        write_vocab(Path(tmp), cfg["vocab"])
        length = max(cfg["query_len"], cfg["passage_len"])
        parts = [transformer(tmp, max_seq_length=length), pooling(cfg["hidden"], "mean"), normalize()]
        model = api["SentenceTransformer"](modules=parts, device=str(device)).train()
    scale = 1 / cfg["temperature"]
    if cfg["variant"] == "st_cached":
        loss_fn = api["st_cached"](model, scale=scale, mini_batch_size=cfg["chunk"])
    else:
        loss_fn = api["st_plain"](model, scale=scale)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def backward() -> torch.Tensor:
        loss = loss_fn([dict(query), dict(doc)], None)  # copies: ST modules write their outputs into them
        loss.backward()
        return loss.detach()

    return backward, optimizer


def st_version(variant: str) -> dict:
    """The sentence-transformers version for an ST row (not in the provenance's package list)."""
    if not variant.startswith("st_"):
        return {}
    import sentence_transformers

    return {"st_version": sentence_transformers.__version__}


def run_single(cfg: dict) -> dict:
    """One configuration's steps in this process: first-step loss, median step time, peak memory."""
    import torch

    if cfg["variant"].startswith("st_"):
        try:
            st_api()
        except ImportError as err:
            return {**cfg, "status": "unavailable", "error": f"{type(err).__name__}: {err}"}
    device = torch.device(cfg["device"])
    bert = make_bert(cfg)
    query = bench_common.random_tokens(cfg["batch_size"], cfg["query_len"], device)  # (B, Lq)
    doc = bench_common.random_tokens(cfg["batch_size"], cfg["passage_len"], device)  # (B, Ld)
    b = cfg["chunk"] if cfg["variant"] == "plain_chunk" else cfg["batch_size"]
    query, doc = ({k: v[:b] for k, v in f.items()} for f in (query, doc))
    make = st_step if cfg["variant"].startswith("st_") else dualenc_step
    backward, optimizer = make(cfg, bert.to(device), query, doc, device)
    first = {}

    def step() -> None:
        loss = backward()
        if not first:  # the objective's value and gradient at the shared initial weights
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            norm = torch.stack([g.double().norm() for g in grads]).norm()
            first.update(loss=loss.item(), grad_norm=norm.item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    peak = bench_common.peak_of_step(step, device)
    times = bench_common.step_times(step, cfg["repeats"])
    row = {"status": "ok", "batch": b, **first, "step_s": statistics.median(times), "times_s": times}
    return {**cfg, **row, "peak_mib": peak / 2**20, **st_version(cfg["variant"])}


def summarise(rows: list[dict]) -> list[dict]:
    """One row per configuration: time and memory ratios, and the first step's loss and gradient norm against
    plain's where the objective is the same (the same batch)."""
    base = next(r for r in rows if r["variant"] == "plain")
    summary = []
    for r in rows:
        row = {"variant": r["variant"], "status": r["status"], "batch": r.get("batch")}
        row["chunk"] = r["chunk"] if r["variant"] in ("grad_cache", "st_cached") else None
        same = r.get("batch") == base["batch"]  # the same objective (plain_chunk's is another)
        if r["status"] == "ok":
            row.update(
                step_s=r["step_s"],
                time_ratio=r["step_s"] / base["step_s"],
                peak_mib=r["peak_mib"],
                mem_ratio=r["peak_mib"] / base["peak_mib"] if base["peak_mib"] > 0 else None,
                loss=r["loss"],
                loss_diff=abs(r["loss"] - base["loss"]) if same else None,
                grad_norm=r["grad_norm"],
                grad_rdiff=abs(r["grad_norm"] / base["grad_norm"] - 1) if same else None,
            )
        summary.append(row)
    return summary


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if bench_common.serve_single(args.single, run_single):
        return {}
    rows = []
    for variant in args.variants:
        cfg = {k: v for k, v in vars(args).items() if k not in ("out", "single", "quick", "variants")}
        cfg["variant"] = variant
        try:
            rows.append(bench_common.run_config(__file__, cfg))
        except bench_common.ConfigFailed as err:
            raise SystemExit(f"{variant} failed:\n{err.stderr[-4000:]}") from None
    summary = summarise(rows)
    diffs = ("loss_diff", "grad_rdiff")
    shown = [{**s, **{k: f"{s[k]:.1e}" for k in diffs if s.get(k) is not None}} for s in summary]
    title = (
        f"{args.layers}-layer BERT (hidden {args.hidden}, {args.heads} heads), batch {args.batch_size} x 1 "
        f"positive, {args.query_len}/{args.passage_len} tokens, chunk {args.chunk}, τ {args.temperature}, "
        f"fp32, {args.device}"
    )
    table = bench_common.print_table(shown, title)
    agree = {
        f"{name}_agree": all(s.get(key) is None or s[key] <= tol for s in summary)
        for name, key, tol in (("losses", "loss_diff", LOSS_TOLERANCE), ("grads", "grad_rdiff", GRAD_RTOL))
    }
    config = {k: str(v) for k, v in vars(args).items()}
    report = {"config": config, "rows": rows, "summary": summary, "table": table, **agree}
    out = bench_common.write_report(args.out, report)
    if not all(agree.values()):
        raise SystemExit(f"the same objective's first step differs from plain's: {agree}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
