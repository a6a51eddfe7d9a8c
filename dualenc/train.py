"""Two-tower training on HF Accelerate: one explicit loop, no Trainer subclass.

``train(cfg)`` = build model and data -> prepare -> loop (accumulate, backward, clip, step, schedule, log,
evaluate, save) -> save the final model as a dualenc model dir (loadable by ``dualenc encode`` and
sentence-transformers). Run it with ``accelerate launch recipes/train.py --config ... key=value``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import get_scheduler

from dualenc import atomic
from dualenc.checkpoint import load_process_state, read_state, resolve_resume, save_checkpoint
from dualenc.config import RunConfig, config_to_dict
from dualenc.distributed import all_gather_with_grad
from dualenc.encoder import DualEncoder
from dualenc.errors import InputError
from dualenc.losses import CachedCE, InBatchCE, LossOutput, false_negative_mask
from dualenc.train_setup import (
    DevSet,
    EpochSampler,
    JsonlLog,
    build_model,
    load_dev_set,
    optimizer_groups,
    save_trained_model,
    step_seed,
)

if TYPE_CHECKING:
    from dualenc.negative_cache import NegativeCache
    from dualenc.train_data import TrainData

logger = logging.getLogger(__name__)


class TrainingModule(nn.Module):
    """What Accelerate wraps (DDP): the dual encoder plus the loss, whose learned temperature is a parameter."""

    def __init__(self, encoder: nn.Module, loss: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.loss = loss

    def forward(self, query, doc) -> tuple[Tensor, Tensor]:
        return self.encoder(query, doc)  # (B, D), (B*G, D)


def training_step(module: nn.Module, batch: dict, accelerator: Accelerator, cfg: RunConfig) -> LossOutput:
    """Encode the micro-batch, gather documents across processes (with gradients), compute the loss.

    Shapes: query (B, Lq), doc (B*G, Ld), doc_idx (B*G,), positives (B, P).
    """
    q_emb, d_emb = module(batch["query"], batch["doc"])  # (B, D), (B*G, D)
    doc_idx = batch["doc_idx"]  # (B*G,)
    group = d_emb.shape[0] // q_emb.shape[0]
    offset = 0
    if cfg.loss.negatives_x_device and accelerator.num_processes > 1:
        offset = accelerator.process_index * d_emb.shape[0]
        d_emb = all_gather_with_grad(d_emb)  # (P*B*G, D)
        doc_idx = accelerator.gather(doc_idx)  # (P*B*G,)
    targets = offset + torch.arange(q_emb.shape[0], device=q_emb.device) * group  # (B,)
    mask = (
        false_negative_mask(doc_idx, batch["positives"], targets) if cfg.loss.mask_false_negatives else None
    )
    return accelerator.unwrap_model(module).loss(q_emb, d_emb, targets=targets, mask=mask)


def cache_training_step(
    module: nn.Module,
    batch: dict,
    accelerator: Accelerator,
    cfg: RunConfig,
    cache: NegativeCache,
    draw_step: int,
) -> LossOutput:
    """``training_step`` against the negative cache (A3-A4), by ``cfg.loss.loss``:

    - ``cache``: + m negatives per query drawn from the table by Gumbel-max, re-encoded with gradient;
    - ``cache_ce``: + the exact softmax over the whole table as constants (one lumped logit whose gradient is the
      softmax-weighted mean of the stale embeddings: to the queries only);
    - ``sce``: Scalable CE of the queries against the table (see dualenc/table_sce.py).

    Shapes: as ``training_step``; m = num_cache_negatives.
    """
    q_emb, d_emb = module(batch["query"], batch["doc"])  # (B, D), (B*G, D)
    unwrapped = accelerator.unwrap_model(module)
    batch_size, group = q_emb.shape[0], d_emb.shape[0] // q_emb.shape[0]
    local_targets = torch.arange(batch_size, device=q_emb.device) * group  # (B,)
    if cfg.loss.loss == "sce":
        return _table_sce_step(unwrapped, q_emb, d_emb, batch, accelerator, cache, draw_step, local_targets)
    scale = unwrapped.loss.temperature().detach()
    pos_score = scale * (q_emb * d_emb[local_targets]).sum(-1)  # (B,)
    cross = cfg.loss.negatives_x_device and accelerator.num_processes > 1
    exact = cfg.loss.loss == "cache_ce"
    draw = cache.sample(q_emb, pos_score, batch["positives"], batch["doc_idx"], scale, draw_step,
                        cross_device=cross, with_mean=exact)  # fmt: skip
    if exact:  # one constant "negative": the softmax-weighted mean of the table, its weight P_R
        neg_emb, weight, written = (
            draw.mean.to(q_emb.dtype)[:, None],
            torch.ones_like(draw.weight[:, :1]),
            None,
        )
    else:
        neg_emb = q_emb.new_zeros(*draw.doc_idx.shape, q_emb.shape[1])  # (B, m, D)
        texts = cache.negative_texts(draw)
        if texts:  # the document tower outside DDP's forward: its gradients still reach the same parameters
            features = unwrapped.encoder.tokenize_docs(texts).to(q_emb.device)
            neg_emb[draw.doc_idx >= 0] = unwrapped.encoder.encode_docs(features).to(neg_emb.dtype)  # (n, D)
        weight, written = draw.weight, draw.doc_idx.flatten()  # (B, m), (B*m,)
    doc_idx, offset, d_all = batch["doc_idx"], 0, d_emb
    if cross:
        offset = accelerator.process_index * d_emb.shape[0]
        d_all = all_gather_with_grad(d_emb)  # (P*B*G, D)
        doc_idx = accelerator.gather(doc_idx)  # (P*B*G,)
    targets = offset + local_targets  # (B,)
    mask = (
        false_negative_mask(doc_idx, batch["positives"], targets) if cfg.loss.mask_false_negatives else None
    )
    output = unwrapped.loss(q_emb, d_all, targets=targets, mask=mask, neg_emb=neg_emb, neg_weight=weight,
                            rest_lse=draw.rest_lse)  # fmt: skip
    if written is None:
        cache.write_back(batch["doc_idx"], d_emb, insert=torch.arange(d_emb.shape[0]))
    else:
        cache.write_back(torch.cat([batch["doc_idx"], written]), torch.cat([d_emb, neg_emb.flatten(0, 1)]),
                         insert=torch.arange(d_emb.shape[0]))  # fmt: skip
    output.logs["cache/pos_rank"] = draw.pos_rank.float().mean()
    output.logs["cache/draws"] = (draw.doc_idx >= 0).float().sum(1).mean()
    return output


def _table_sce_step(
    unwrapped, q_emb, d_emb, batch, accelerator, cache, draw_step, local_targets
) -> LossOutput:
    """loss=sce: Scalable CE of the live queries against the whole cached table (one process)."""
    from dualenc.negative_cache import generator_for

    if accelerator.num_processes > 1:
        raise InputError("loss=sce runs on one process (SCE over a sharded table is not implemented); "
                         "use loss=cache_ce or loss=cache with several processes")  # fmt: skip
    target_slots = cache.table.locate(batch["doc_idx"][local_targets])  # (B,)
    generator = generator_for(cache.seed, accelerator.process_index, draw_step, 2, q_emb.device)
    output = unwrapped.loss(q_emb, d_emb[local_targets], target_slots=target_slots, table=cache.table.emb,
                            generator=generator)  # fmt: skip
    cache.write_back(batch["doc_idx"], d_emb, insert=torch.arange(d_emb.shape[0]))
    return output


def build_loss(cfg: RunConfig) -> nn.Module:
    """The loss module of ``cfg.loss.loss`` (it owns the temperature)."""
    if cfg.loss.loss == "sce":
        from dualenc.table_sce import TableSCE

        s = cfg.sce
        return TableSCE(cfg.loss.temperature, cfg.loss.learn_temperature, n_buckets=s.sce_n_buckets or None,
                        bucket_size_x=s.sce_bucket_size_x or None, bucket_size_y=s.sce_bucket_size_y, mix=s.sce_mix,
                        block_size=s.sce_block_size)  # fmt: skip
    if cfg.loss.loss in ("cache", "cache_ce"):
        return CachedCE(cfg.loss.temperature, cfg.loss.learn_temperature, inbatch=cfg.cache.cache_inbatch)
    return InBatchCE(cfg.loss.temperature, cfg.loss.learn_temperature)


def make_accelerator(cfg: RunConfig) -> Accelerator:
    """An Accelerator for ``cfg.train``; refuses a launcher/Accelerate mismatch that would train P copies."""
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        cpu=cfg.train.cpu,
        log_with=None if cfg.train.report_to == "none" else cfg.train.report_to,
        project_dir=cfg.train.output_dir,
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and accelerator.num_processes == 1:
        raise InputError(
            f"launched with WORLD_SIZE={world} but Accelerate set up a single process (on CPU add cpu=true; "
            "with GPUs use `accelerate launch --multi_gpu`)"
        )
    return accelerator


@dataclass
class TrainResult:
    step: int
    final_model: str
    best_model: str | None
    best_metric: float | None
    last_logs: dict


def _log_startup(accelerator: Accelerator, cfg: RunConfig, num_groups: int, num_docs: int, total_steps: int):
    b, g, p = cfg.train.per_device_train_batch_size, cfg.data.train_group_size, accelerator.num_processes
    shown = b * g * (p if cfg.loss.negatives_x_device else 1)
    logger.info(
        "training: %d query groups, %d corpus documents, %d processes, batch %d per process x %d accumulation "
        "= effective batch %d queries; documents per query %d -> negatives per query %d (%d in-batch/cross-device "
        "+ %d hard); %d optimizer steps",
        num_groups, num_docs, p, b, cfg.train.gradient_accumulation_steps,
        b * p * cfg.train.gradient_accumulation_steps, shown, shown - 1, shown - g, g - 1, total_steps,
    )  # fmt: skip


def train(
    cfg: RunConfig, accelerator: Accelerator | None = None, model: DualEncoder | None = None
) -> TrainResult:
    """Train a dual encoder as ``cfg`` says; returns where the final (and best) model went.

    Args:
        cfg: the run configuration.
        accelerator: an existing Accelerator (default: one made from ``cfg.train``).
        model: a ready ``DualEncoder`` (e.g. with custom towers) to train instead of building one from
            ``cfg.model``. Custom towers are saved as a ``model.safetensors`` state dict.
    """
    from dualenc.collate import GroupDataset, TrainCollator  # datasets/pyarrow: only where data is loaded
    from dualenc.train_data import load_train_data

    started = time.perf_counter()
    accelerator = accelerator or make_accelerator(cfg)
    out = Path(cfg.train.output_dir)
    set_seed(cfg.train.seed)
    data: TrainData = load_train_data(
        cfg.data.train_file, format=cfg.data.train_format, corpus_file=cfg.data.corpus_file,
        queries_file=cfg.data.queries_file, qrels_file=cfg.data.qrels_file, min_relevance=cfg.data.min_relevance,
        cache_dir=cfg.data.datasets_cache_dir,
    )  # fmt: skip
    model = build_model(
        cfg.model, data, seed=cfg.train.seed, init_dir=out / "initial_model", accelerator=accelerator
    )
    dev: DevSet | None = load_dev_set(cfg.data) if cfg.data.dev_corpus_file else None
    dataset = GroupDataset(data, cfg.data.train_group_size, seed=cfg.train.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.train.per_device_train_batch_size, sampler=EpochSampler(len(dataset), seed=cfg.train.seed), drop_last=True,
        collate_fn=TrainCollator(model, data.corpus), num_workers=cfg.data.dataloader_num_workers,
    )  # fmt: skip
    module = TrainingModule(model, build_loss(cfg))
    optimizer = torch.optim.AdamW(
        optimizer_groups(module, cfg.train.weight_decay), lr=cfg.train.learning_rate
    )
    module, optimizer, loader = accelerator.prepare(module, optimizer, loader)
    steps_per_epoch = max(1, len(loader) // cfg.train.gradient_accumulation_steps)
    total_steps = (
        cfg.train.max_steps
        if cfg.train.max_steps > 0
        else math.ceil(cfg.train.num_train_epochs * steps_per_epoch)
    )
    scheduler = get_scheduler(
        cfg.train.lr_scheduler_type, optimizer, num_warmup_steps=int(cfg.train.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )  # fmt: skip
    scheduler = accelerator.prepare(scheduler)
    if accelerator.is_main_process:
        _log_startup(accelerator, cfg, len(dataset), len(data.corpus), total_steps)
    config_yaml = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    log = JsonlLog(out / "train_log.jsonl", enabled=accelerator.is_main_process)
    state = {"step": 0, "best_metric": None, "best_step": None}
    resume = resolve_resume(out, cfg.train.resume_from)
    cache = None
    if cfg.loss.loss != "inbatch":
        from dualenc.negative_cache import NegativeCache

        cache = NegativeCache(
            cfg.cache, data.corpus, accelerator, model.dim, seed=cfg.train.seed, sce=cfg.sce
        )
    if resume is not None:
        accelerator.load_state(str(resume))
        state = read_state(resume)
        if cache is not None:
            cache.table.load_state_dict(load_process_state(resume, accelerator, "cache"))
        log.truncate_after(state["step"])
        logger.info("resumed from %s at step %d", resume, state["step"])
    # the training clock continues from the checkpoint: elapsed_s counts the sessions that made this model
    clock_origin = started - state.get("elapsed_s", 0.0)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_yaml, encoding="utf-8")
    if cfg.train.report_to != "none":
        accelerator.init_trackers(
            "dualenc", config={f"{s}.{k}": v for s, d in config_to_dict(cfg).items() for k, v in d.items()}
        )

    if cache is not None and resume is None and cfg.cache.cache_mode == "corpus":
        cache.fill(model, out / "cache_fill", batch_size=cfg.cache.cache_fill_batch_size)
    step = state["step"]
    bar = tqdm(total=total_steps, initial=step, disable=not accelerator.is_local_main_process, desc="train")
    logs: dict = {}
    module.train()
    while step < total_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        epoch_loader, skipped = loader, done_in_epoch * cfg.train.gradient_accumulation_steps
        if skipped:  # resuming mid-epoch: skip the micro-batches already trained on
            epoch_loader = accelerator.skip_first_batches(loader, skipped)
        epoch_loader.set_epoch(epoch)  # reaches EpochSampler through Accelerate's wrappers
        dataset.set_epoch(
            epoch
        )  # Accelerate only forwards set_epoch to the dataset when the sampler lacks it
        tick = time.perf_counter()
        for micro, batch in enumerate(epoch_loader):
            # dropout noise from (seed, rank, position in training) alone: a resumed run draws the same masks
            torch.manual_seed(step_seed(cfg.train.seed, accelerator.process_index, epoch, skipped, micro))
            with accelerator.accumulate(module):
                if cache is None:
                    output = training_step(module, batch, accelerator, cfg)
                else:
                    draw_step = (
                        step * cfg.train.gradient_accumulation_steps
                        + micro % cfg.train.gradient_accumulation_steps
                    )
                    output = cache_training_step(module, batch, accelerator, cfg, cache, draw_step)
                accelerator.backward(output.loss)
                grad_norm = None
                if accelerator.sync_gradients and cfg.train.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(module.parameters(), cfg.train.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            if cache is not None:
                output.logs.update(
                    {
                        k: torch.tensor(v)
                        for k, v in cache.end_step(accelerator.unwrap_model(module).encoder).items()
                    }
                )
            step += 1
            bar.update(1)
            if step % cfg.train.logging_steps == 0 or step == total_steps:
                logs = _step_logs(accelerator, output, scheduler, grad_norm, tick, clock_origin, epoch)
                log.write(step, logs)
                accelerator.log(logs, step=step)
                bar.set_postfix(loss=f"{logs['loss']:.4f}")
            if dev is not None and (
                (cfg.train.eval_steps and step % cfg.train.eval_steps == 0) or step == total_steps
            ):
                _evaluate_and_keep_best(accelerator, module, dev, cfg, step, state, log)
            state["step"] = step
            if (cfg.train.save_steps and step % cfg.train.save_steps == 0) or step == total_steps:
                state["elapsed_s"] = time.perf_counter() - clock_origin
                per_process = {"cache": cache.table.state_dict()} if cache is not None else None
                save_checkpoint(
                    accelerator, out, step, state, config_yaml, cfg.train.save_total_limit, per_process
                )
            tick = time.perf_counter()
            if step >= total_steps:
                break
    bar.close()
    final = out / "final_model"
    if accelerator.is_main_process:
        save_trained_model(accelerator.unwrap_model(module).encoder, final)
        now = time.perf_counter()
        summary = {
            "steps": step,
            "best_step": state["best_step"],
            "best_metric": state["best_metric"],
            "eval_measure": cfg.train.eval_measure,
            "wall_s": now - clock_origin,
            "session_wall_s": now - started,
            "peak_rss_gib": _peak_rss_gib(),
            "resumed_from": None if resume is None else str(resume),
        }
        if torch.cuda.is_available():
            summary["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        atomic.write_json(out / "train_summary.json", summary)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    best = out / "best_model" if state["best_step"] is not None else None
    return TrainResult(step, str(final), None if best is None else str(best), state["best_metric"], logs)


def _step_logs(
    accelerator, output: LossOutput, scheduler, grad_norm, tick: float, clock_origin: float, epoch: int
) -> dict:
    """Loss logs averaged over processes, plus learning rate, gradient norm, times and peak memory.

    ``step_time_s`` is the last optimizer step, ``elapsed_s`` the wall time of training so far (data loading,
    cache fill and dev evaluations included), continued across resumes from the checkpoint's ``elapsed_s``;
    ``peak_rss_gib`` is the main process's resident-set high-water mark (``ru_maxrss``), ``peak_mem_gib`` the CUDA
    allocator's peak.
    """
    now = time.perf_counter()
    names = sorted(output.logs)
    values = torch.stack([output.logs[n].detach().float() for n in names])  # (K,)
    values = accelerator.reduce(values, reduction="mean")
    logs = {n: float(v) for n, v in zip(names, values.tolist(), strict=True)}
    logs.update(
        lr=scheduler.get_last_lr()[0], epoch=epoch, step_time_s=now - tick, elapsed_s=now - clock_origin
    )
    rss = _peak_rss_gib()
    if rss is not None:
        logs["peak_rss_gib"] = rss
    if grad_norm is not None:
        logs["grad_norm"] = float(grad_norm)
    if torch.cuda.is_available():
        logs["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return logs


def _peak_rss_gib() -> float | None:
    """This process's resident-set high-water mark in GiB (``ru_maxrss``), None where unavailable."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    scale = 2**30 if sys.platform == "darwin" else 2**20  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def _evaluate_and_keep_best(
    accelerator, module, dev: DevSet, cfg: RunConfig, step: int, state: dict, log
) -> None:
    """Score the dev set on the main process; save ``best_model`` when the measure improves."""
    if accelerator.is_main_process:
        encoder = accelerator.unwrap_model(module).encoder
        scores = dev.evaluate(
            encoder, cfg.train.eval_measure, batch_size=cfg.train.eval_batch_size, device=accelerator.device
        )
        value = scores[cfg.train.eval_measure]
        log.write(step, {f"dev/{k}": v for k, v in scores.items()})
        accelerator.log({f"dev/{k}": v for k, v in scores.items()}, step=step)
        logger.info("step %d: dev %s", step, json.dumps(scores))
        if state["best_metric"] is None or value > state["best_metric"]:
            state["best_metric"], state["best_step"] = value, step
            save_trained_model(encoder, Path(cfg.train.output_dir) / "best_model")
    module.train()
    accelerator.wait_for_everyone()
    state_list = [state["best_metric"], state["best_step"]]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(state_list, from_process=0)
    state["best_metric"], state["best_step"] = state_list


__all__ = ["TrainResult", "TrainingModule", "make_accelerator", "train", "training_step"]
