"""Training SASRec for next-item prediction with any of the SCE paper's losses (Mezentsev et al., RecSys 2024;
ALGORITHMS.md Part B 2.4-2.5): one seed's run with early stopping on validation NDCG@10.

Every position with a non-pad target is a training example. Per seed: fresh weights, batch order, negatives
and SCE centres, each from its own seeded ``torch.Generator``; dropout uses the global RNG, seeded with the
same seed. Memory on CPU is the resident set size: ``peak_rss_mib`` is ``ru_maxrss`` (the peak of the
whole process so far); ``peak_rss_run_mib`` is the kernel's VmHWM, reset through ``/proc/self/clear_refs``
when the seed starts (Linux; None elsewhere).
"""

from __future__ import annotations

import copy
import logging
import resource
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor

from dualenc.losses.dense import full_ce
from dualenc.losses.sampled import bce_loss, ce_minus_loss, gbce_loss
from dualenc.losses.sce import ScalableCE
from dualenc.losses.uniform_negatives import sample_uniform, sample_unseen
from dualenc.recsys.config import SASRecConfig
from dualenc.recsys.data import (
    PAD,
    SequenceSplit,
    batch_order,
    filter_interactions,
    read_interactions,
    recbole_example_path,
    temporal_split,
    training_batch,
)
from dualenc.recsys.evaluate import evaluate
from dualenc.recsys.sasrec import SASRec

logger = logging.getLogger(__name__)


def load_split(cfg: SASRecConfig) -> SequenceSplit:
    """Read, filter and split the interactions named by the config."""
    path = cfg.data_path
    if path.startswith("recbole:"):  # a dataset shipped inside the recbole package
        path = recbole_example_path(path.removeprefix("recbole:"))
    inter = read_interactions(path, fmt=cfg.data_format, delimiter=cfg.delimiter)
    if cfg.min_item_count > 1 or cfg.min_user_count > 1:
        inter = filter_interactions(inter, cfg.min_item_count, cfg.min_user_count)
    return temporal_split(inter, cfg.test_quantile)


def batch_loss(
    cfg: SASRecConfig,
    model: SASRec,
    sce: ScalableCE,
    batch: tuple[Tensor, Tensor, Tensor],
    generator: torch.Generator,
) -> tuple[Tensor, dict[str, float]]:
    """Next-item loss of one batch; every position with a non-pad target is a training example."""
    inputs, targets, history = batch  # (B, L), (B, L), (B, H)
    hidden = model(inputs)  # (B, L, D)
    x, y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)  # (B*L, D), (B*L,)
    mask = y != PAD  # (B*L,)
    table = model.item_table  # (C+1, D): row 0 is the pad item
    num_rows = table.shape[0]  # C+1
    if cfg.loss == "ce_minus":  # one negative set per sequence, shared by its positions
        negatives = sample_unseen(history, num_rows, cfg.num_negatives, generator, pad_item=PAD)  # (B, n)
        return ce_minus_loss(x, table, y, negatives, mask=mask), {}
    x, y = x[mask], y[mask]  # (N, D), (N,) real positions only
    if cfg.loss == "ce":
        return full_ce(x, table[1:], y - 1), {}  # softmax over the C items, pad row left out
    if cfg.loss == "sce":
        out = sce(x, table, y, generator=generator)
        logs = {"sce_coverage": float(out.logs["coverage"]), "sce_n_buckets": float(out.logs["n_buckets"])}
        return out.loss, logs
    if cfg.loss == "bce":  # fresh negatives per position, none from the user's history
        seq_of_row = torch.arange(inputs.shape[0]).repeat_interleave(inputs.shape[1])[mask]  # (N,)
        negatives = sample_unseen(history[seq_of_row], num_rows, cfg.num_negatives, generator, pad_item=PAD)
        return bce_loss(x, table, y, negatives), {}
    negatives = sample_uniform(len(y), num_rows, cfg.num_negatives, generator, pad_item=PAD)  # (N, n) gbce
    return gbce_loss(x, table, y, negatives, t=cfg.gbce_t, num_items=num_rows - 1), {}


def _vm_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def train_epoch(
    cfg: SASRecConfig,
    model: SASRec,
    optimizer: torch.optim.Optimizer,
    sce: ScalableCE,
    sequences: list,
    order_gen: torch.Generator,
    sample_gen: torch.Generator,
) -> dict[str, float]:
    """One shuffled pass over the training sequences; returns the epoch means of the loss and its logs.

    ``order_gen`` shuffles the batches; ``sample_gen`` draws the negatives (or the SCE centres).
    """
    model.train()
    losses, logs = [], []
    for idx in batch_order(len(sequences), cfg.batch_size, order_gen):
        batch = training_batch([sequences[i] for i in idx.tolist()], cfg.maxlen)
        loss, batch_logs = batch_loss(cfg, model, sce, batch, sample_gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        logs.append(batch_logs)
    log_means = {k: statistics.fmean(g[k] for g in logs) for k in logs[0]}
    return {"train_loss": statistics.fmean(losses), **log_means}


def score(cfg: SASRecConfig, model: SASRec, split: SequenceSplit, part: str) -> dict[str, float]:
    """NDCG@10, HR@10 and COV@10 of ``model`` on the ``"valid"`` or ``"test"`` users of ``split``."""
    inputs, targets = {
        "valid": (split.valid_inputs, split.valid_targets),
        "test": (split.test_inputs, split.test_targets),
    }[part]
    return evaluate(model, inputs, targets, split.num_items, batch_size=cfg.eval_batch_size)


def fit(
    cfg: SASRecConfig,
    model: SASRec,
    split: SequenceSplit,
    seed: int,
    order_gen: torch.Generator,
    sample_gen: torch.Generator,
) -> tuple[list[dict], int]:
    """Train until ``max_epochs``, or until ``patience`` validations bring no better NDCG@10; leave ``model``
    with the weights of its best validation. Returns the per-epoch history and the best epoch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, betas=(0.9, cfg.adam_beta2))
    sce = ScalableCE(cfg.n_buckets, cfg.bucket_size_x, cfg.bucket_size_y, mix=cfg.mix, pad_item=PAD)
    sequences = [s for s in split.train if len(s) >= 2]
    best, best_epoch, best_state, waited, history = -1.0, 0, None, 0, []
    for epoch in range(1, cfg.max_epochs + 1):
        row = {"epoch": epoch} | train_epoch(cfg, model, optimizer, sce, sequences, order_gen, sample_gen)
        if epoch % cfg.eval_every == 0 or epoch == cfg.max_epochs:
            row["valid_NDCG@10"] = score(cfg, model, split, "valid")["NDCG@10"]
            waited += 1
            if row["valid_NDCG@10"] > best:
                best, best_epoch, waited = row["valid_NDCG@10"], epoch, 0
                best_state = copy.deepcopy(model.state_dict())
        history.append(row)
        rounded = {k: round(v, 4) for k, v in row.items() if k != "epoch"}
        logger.info("seed %d epoch %d %s", seed, epoch, rounded)
        if waited >= cfg.patience:
            break
    model.load_state_dict(best_state)
    return history, best_epoch


def train_seed(cfg: SASRecConfig, split: SequenceSplit, seed: int) -> dict:
    """Train one model, keep the weights of the best validation NDCG@10, return its metrics and costs."""
    torch.manual_seed(seed)  # dropout masks only; everything else has its own generator
    init_gen, order_gen, sample_gen = (
        torch.Generator().manual_seed(seed + offset) for offset in (0, 1_000_003, 2_000_006)
    )
    model = SASRec(
        split.num_items,
        cfg.maxlen,
        cfg.hidden,
        cfg.num_blocks,
        cfg.num_heads,
        cfg.dropout,
        generator=init_gen,
    )
    reset_ok, rss_start = _reset_peak_rss(), _vm_kib("VmRSS")
    start = time.perf_counter()
    history, best_epoch = fit(cfg, model, split, seed, order_gen, sample_gen)
    train_s = time.perf_counter() - start
    hwm = _vm_kib("VmHWM") if reset_ok else None
    return {
        "seed": seed,
        "epochs": len(history),
        "best_epoch": best_epoch,
        "train_s": train_s,
        "s_per_epoch": train_s / len(history),
        "valid": score(cfg, model, split, "valid"),
        "test": score(cfg, model, split, "test"),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_run_mib": hwm / 1024 if hwm else None,
        "rss_start_mib": rss_start / 1024 if rss_start else None,
        "history": history,
    }
