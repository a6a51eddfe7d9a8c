"""Two-tower training on HF Accelerate: one explicit loop, no Trainer subclass.

``train(cfg)`` = build model and data -> prepare -> for each optimizer step: accumulate its micro-batches
(forward, backward, write fresh embeddings back to the negative cache), clip, step optimizer and schedule,
refresh the cache, log, evaluate, save -> save the final model as a dualenc model dir (loadable by ``dualenc
encode`` and sentence-transformers). Step arithmetic (epochs, accumulation, resume, seeds) lives in
``dualenc.training.plan``; one micro-batch's loss in ``dualenc.training.step``. Run it with
``accelerate launch recipes/train.py --config ... key=value`` (GPUs) or ``torchrun --nproc_per_node N
recipes/train.py ... cpu=true`` (N CPU processes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
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
from torch import nn
from tqdm.auto import tqdm
from transformers import get_scheduler

from dualenc.errors import InputError
from dualenc.io import atomic
from dualenc.losses.base import CachedCE, InBatchCE
from dualenc.model.encoder import DualEncoder
from dualenc.training.checkpoint import load_process_state, read_state, resolve_resume, save_checkpoint
from dualenc.training.config import RunConfig, config_to_dict
from dualenc.training.plan import EpochSampler, StepPlan, micro_seed
from dualenc.training.setup import (
    DevSet,
    JsonlLog,
    build_model,
    load_dev_set,
    optimizer_groups,
    save_trained_model,
)
from dualenc.training.step import StepOutput, TrainingModule

if TYPE_CHECKING:
    from dualenc.negcache.negative_cache import NegativeCache
    from dualenc.training.data import TrainData

logger = logging.getLogger(__name__)


def build_loss(cfg: RunConfig) -> nn.Module:
    """The loss module of ``cfg.loss.loss`` (it owns the temperature)."""
    t, learn = cfg.loss.temperature, cfg.loss.learn_temperature
    if cfg.loss.loss == "sce":
        from dualenc.losses.table_sce import TableSCE

        s = cfg.sce
        return TableSCE(
            t,
            learn,
            n_buckets=s.sce_n_buckets or None,
            bucket_size_x=s.sce_bucket_size_x or None,
            bucket_size_y=s.sce_bucket_size_y,
            mix=s.sce_mix,
            block_size=s.sce_block_size,
        )
    if cfg.loss.loss in ("cache", "cache_ce"):
        return CachedCE(t, learn, inbatch=cfg.cache.cache_inbatch, sampled=cfg.loss.loss == "cache")
    return InBatchCE(t, learn)


def check_processes(cfg: RunConfig, num_processes: int) -> None:
    """Refuse, before any data is read or encoded, what cannot run on ``num_processes`` processes."""
    if cfg.loss.loss == "sce" and num_processes > 1:
        raise InputError(
            f"loss=sce runs on one process (SCE over a table sharded over {num_processes} processes is not "
            "implemented); use loss=cache_ce (the exact softmax over the sharded table) or loss=cache"
        )


def make_accelerator(cfg: RunConfig) -> Accelerator:
    """An Accelerator for ``cfg.train``; refuses a launcher/Accelerate mismatch that would train P copies.

    Gradient accumulation is done by the loop (``StepPlan``), not by Accelerate's step counter.
    """
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
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
    if accelerator.num_processes == 1 and "MASTER_PORT" in os.environ and "WORLD_SIZE" not in os.environ:
        # accelerate launch --num_processes N with --cpu (or without --multi_gpu) starts ONE process
        logger.warning(
            "a launcher asked for several processes but this run has ONE; `accelerate launch --cpu "
            "--num_processes N` starts a single process: use `torchrun --nproc_per_node N recipes/train.py ... "
            "cpu=true` on CPU, `accelerate launch --multi_gpu --num_processes N` on GPUs"
        )
    return accelerator


@dataclass
class TrainerState:
    """What a checkpoint stores beyond Accelerate's state: the step, the best dev score, the training clock."""

    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    elapsed_s: float = 0.0

    @classmethod
    def from_dict(cls, values: dict) -> TrainerState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclass
class TrainResult:
    step: int
    final_model: str
    best_model: str | None
    best_metric: float | None
    last_logs: dict


def train(
    cfg: RunConfig, accelerator: Accelerator | None = None, model: DualEncoder | None = None
) -> TrainResult:
    """Train a dual encoder as ``cfg`` says; returns where the final (and best) model went.

    Args:
        cfg: the run configuration.
        accelerator: an existing Accelerator (default: one made from ``cfg.train``).
        model: a ready ``DualEncoder`` (e.g. with custom towers) to train instead of building one from
            ``cfg.model`` (whose settings are then ignored).
    """
    from dualenc.training.batches import (  # datasets/pyarrow: only where data is loaded
        GroupDataset,
        TrainCollator,
    )
    from dualenc.training.data import load_train_data

    started = time.perf_counter()
    accelerator = accelerator or make_accelerator(cfg)
    check_processes(cfg, accelerator.num_processes)
    out, seed, rank = Path(cfg.train.output_dir), cfg.train.seed, accelerator.process_index
    batch_size, processes = cfg.train.per_device_train_batch_size, accelerator.num_processes
    set_seed(seed)
    data: TrainData = load_train_data(
        cfg.data.train_file,
        format=cfg.data.train_format,
        corpus_file=cfg.data.corpus_file,
        queries_file=cfg.data.queries_file,
        qrels_file=cfg.data.qrels_file,
        min_relevance=cfg.data.min_relevance,
        cache_dir=cfg.data.datasets_cache_dir,
    )
    if model is None:
        model = build_model(
            cfg.model, data, seed=seed, init_dir=out / "initial_model", accelerator=accelerator
        )
    else:
        model.check_saveable()  # a tower that cannot be saved is refused now, not after training
    dev: DevSet | None = load_dev_set(cfg.data) if cfg.data.dev_corpus_file else None

    # data: P processes with batch b see exactly the batches of one process with batch P·b
    dataset = GroupDataset(data, cfg.data.train_group_size, seed=seed)
    sampler = EpochSampler(len(dataset), seed=seed, multiple_of=batch_size * processes)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=TrainCollator(model, data.corpus),
        num_workers=cfg.data.dataloader_num_workers,
    )
    plan = StepPlan.make(
        len(sampler) // (batch_size * processes),
        cfg.train.gradient_accumulation_steps,
        cfg.train.max_steps,
        cfg.train.num_train_epochs,
    )
    module = TrainingModule(model, build_loss(cfg), cfg.loss)
    optimizer = torch.optim.AdamW(
        optimizer_groups(module, cfg.train.weight_decay), lr=cfg.train.learning_rate
    )
    module, optimizer, loader = accelerator.prepare(module, optimizer, loader)
    # sized in optimizer steps and stepped once per optimizer step: not wrapped by prepare (whose wrapper
    # steps it once per process), registered so that save_state/load_state carry it
    scheduler = get_scheduler(
        cfg.train.lr_scheduler_type,
        optimizer,
        num_warmup_steps=int(cfg.train.warmup_ratio * plan.total_steps),
        num_training_steps=plan.total_steps,
    )
    accelerator.register_for_checkpointing(scheduler)
    if accelerator.is_main_process:
        _log_startup(cfg, processes, len(dataset), len(data.corpus), plan)

    cache: NegativeCache | None = None
    if cfg.loss.loss != "inbatch":
        from dualenc.negcache.negative_cache import NegativeCache

        cache = NegativeCache(cfg.cache, data.corpus, accelerator, model.dim, seed=seed, sce=cfg.sce)
    config_yaml = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    log = JsonlLog(out / "train_log.jsonl", enabled=accelerator.is_main_process)
    state = TrainerState()
    resume = resolve_resume(out, cfg.train.resume_from)
    if resume is not None:
        accelerator.load_state(str(resume))
        state = TrainerState.from_dict(read_state(resume))
        if cache is not None:
            cache.table.load_state_dict(load_process_state(resume, accelerator, "cache"))
        log.truncate_after(state.step)
        logger.info("resumed from %s at step %d", resume, state.step)
    clock_origin = started - state.elapsed_s  # the training clock continues across resumes
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_yaml, encoding="utf-8")
    if cfg.train.report_to != "none":
        accelerator.init_trackers(
            "dualenc", config={f"{s}.{k}": v for s, d in config_to_dict(cfg).items() for k, v in d.items()}
        )
    if cache is not None and resume is None and cfg.cache.cache_mode == "corpus":
        cache.fill(model, out / "cache_fill", batch_size=cfg.cache.cache_fill_batch_size)

    encoder = accelerator.unwrap_model(module).encoder
    step, logs = state.step, {}
    bar = tqdm(
        total=plan.total_steps, initial=step, disable=not accelerator.is_local_main_process, desc="train"
    )
    module.train()
    while step < plan.total_steps:
        # one epoch (or the rest of it, when resuming mid-epoch)
        epoch = plan.epoch(step)
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        epoch_loader = loader
        if plan.batches_before(step):
            epoch_loader = accelerator.skip_first_batches(loader, plan.batches_before(step))
        epoch_loader.set_epoch(epoch)  # Accelerate's loader re-sets the sampler's epoch from its own counter
        batches = iter(epoch_loader)
        while step < plan.total_steps and plan.epoch(step) == epoch:
            tick = time.perf_counter()
            num_micro, step_logs = plan.batches_in(step), []
            for micro in range(num_micro):
                batch = next(batches)
                draw_id = plan.micro_id(step, micro)
                torch.manual_seed(micro_seed(seed, rank, draw_id))  # dropout masks from the position alone
                last = micro == num_micro - 1
                # DDP reduces the gradients once, at the step's last micro-batch; the step's gradient is the
                # mean over its micro-batches (a short last step of an epoch counts as much as a full one)
                with contextlib.nullcontext() if last else accelerator.no_sync(module):
                    output: StepOutput = module(batch, cache=cache, draw_id=draw_id)
                    accelerator.backward(output.loss / num_micro)
                if cache is not None:  # fresh embeddings of the batch's documents and drawn negatives
                    cache.write_back(
                        output.fresh_idx, output.fresh_emb, insert=torch.arange(output.num_batch_docs)
                    )
                step_logs.append(output.logs)
            grad_norm = None
            if cfg.train.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(module.parameters(), cfg.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            if cache is not None:  # re-encode the oldest slots with the updated towers; all slots age
                step_logs[-1].update({k: torch.tensor(v) for k, v in cache.refresh(encoder).items()})
            step += 1
            bar.update(1)
            if step % cfg.train.logging_steps == 0 or step == plan.total_steps:
                logs = _step_logs(accelerator, step_logs, scheduler, grad_norm, tick, clock_origin, epoch)
                log.write(step, logs)
                accelerator.log(logs, step=step)
                bar.set_postfix(loss=f"{logs['loss']:.4f}")
            if dev is not None and (
                (cfg.train.eval_steps and step % cfg.train.eval_steps == 0) or step == plan.total_steps
            ):
                _evaluate_and_keep_best(accelerator, module, dev, cfg, step, state, log)
            state.step = step
            if (cfg.train.save_steps and step % cfg.train.save_steps == 0) or step == plan.total_steps:
                state.elapsed_s = time.perf_counter() - clock_origin
                per_process = {"cache": cache.table.state_dict()} if cache is not None else None
                save_checkpoint(
                    accelerator,
                    out,
                    step,
                    dataclasses.asdict(state),
                    config_yaml,
                    cfg.train.save_total_limit,
                    per_process,
                )
    bar.close()
    final = out / "final_model"
    if accelerator.is_main_process:
        save_trained_model(encoder, final)
        now = time.perf_counter()
        summary = {
            "steps": step,
            "epochs": plan.num_epochs(),
            "best_step": state.best_step,
            "best_metric": state.best_metric,
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
    best = out / "best_model" if state.best_step is not None else None
    return TrainResult(step, str(final), None if best is None else str(best), state.best_metric, logs)


def _log_startup(cfg: RunConfig, processes: int, num_groups: int, num_docs: int, plan: StepPlan) -> None:
    b, g, gas = cfg.train.per_device_train_batch_size, cfg.data.train_group_size, plan.accumulation
    shown = b * g * (processes if cfg.loss.negatives_x_device else 1)
    logger.info(
        "training: %d query groups, %d corpus documents, %d processes, batch %d per process x %d processes x %d "
        "accumulation = %d queries per optimizer step; documents per query %d -> negatives per query %d "
        "(%d in-batch/cross-device + %d hard); %d micro-batches per process per epoch = %d optimizer steps per "
        "epoch; %d optimizer steps (%d epochs)",
        num_groups,
        num_docs,
        processes,
        b,
        processes,
        gas,
        b * processes * gas,
        shown,
        shown - 1,
        shown - g,
        g - 1,
        plan.batches_per_epoch,
        plan.steps_per_epoch,
        plan.total_steps,
        plan.num_epochs(),
    )


def _step_logs(
    accelerator, step_logs: list[dict], scheduler, grad_norm, tick: float, clock_origin: float, epoch: int
) -> dict:
    """Loss logs averaged over the step's micro-batches and the processes, plus learning rate, gradient norm,
    times and peak memory.

    ``step_time_s`` is the last optimizer step, ``elapsed_s`` the wall time of training so far (data loading,
    cache fill and dev evaluations included), continued across resumes from the checkpoint's ``elapsed_s``;
    ``peak_rss_gib`` is the main process's resident-set high-water mark (``ru_maxrss``), ``peak_mem_gib`` the CUDA
    allocator's peak.
    """
    now = time.perf_counter()
    names = sorted({n for logs in step_logs for n in logs})
    values = torch.stack(
        [
            torch.stack([logs[n].detach().float().cpu() for logs in step_logs if n in logs]).mean()
            for n in names
        ]
    ).to(accelerator.device)  # (K,)
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
    accelerator, module, dev: DevSet, cfg: RunConfig, step: int, state: TrainerState, log: JsonlLog
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
        if state.best_metric is None or value > state.best_metric:
            state.best_metric, state.best_step = value, step
            save_trained_model(encoder, Path(cfg.train.output_dir) / "best_model")
    module.train()
    accelerator.wait_for_everyone()
    best = [state.best_metric, state.best_step]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(best, from_process=0)
    state.best_metric, state.best_step = best


__all__ = ["TrainResult", "TrainerState", "build_loss", "check_processes", "make_accelerator", "train"]
