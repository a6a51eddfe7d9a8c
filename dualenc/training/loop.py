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
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from dualenc.errors import InputError
from dualenc.evaluation.dev_set import load_dev_set
from dualenc.io.lock import output_lock
from dualenc.model.encoder import DualEncoder
from dualenc.model.model_card import training_facts
from dualenc.negcache.negative_cache import NegativeCache
from dualenc.training.batches import GroupDataset, TrainCollator
from dualenc.training.build import (
    build_loss,
    build_model,
    check_processes,
    make_accelerator,
    optimizer_groups,
)
from dualenc.training.checkpoint import TrainerState, restore_checkpoint, save_checkpoint
from dualenc.training.config import RunConfig, config_to_dict
from dualenc.training.cost_meter import CostMeter
from dualenc.training.data import TrainData, load_train_data
from dualenc.training.dev_selection import evaluate_and_keep_best
from dualenc.training.no_duplicates import epoch_sampler
from dualenc.training.plan import EpochSampler, StepPlan, micro_seed
from dualenc.training.run_log import JsonlLog, log_startup, step_logs, write_summary
from dualenc.training.step import TrainingModule, backward_micro_batch

logger = logging.getLogger(__name__)


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
    accelerator = accelerator or make_accelerator(cfg)
    check_processes(cfg, accelerator.num_processes)
    if Path(cfg.train.output_dir).exists() and not Path(cfg.train.output_dir).is_dir():
        raise InputError("is a file, not a directory: cannot write a run there", path=cfg.train.output_dir)
    # one run per output_dir: the main process holds its lock (a second run is refused with the pid)
    lock = output_lock(cfg.train.output_dir) if accelerator.is_main_process else contextlib.nullcontext()
    with lock, contextlib.ExitStack() as cleanup:  # cleanup: undone however _train ends, an error included
        return _train(cfg, accelerator, model, cleanup)


def _train(
    cfg: RunConfig, accelerator: Accelerator, model: DualEncoder | None, cleanup: contextlib.ExitStack
) -> TrainResult:
    """The training loop of :func:`train` (which made the Accelerator, holds the output_dir's lock and
    closes ``cleanup`` when this returns or raises)."""
    started, cpu_started = time.perf_counter(), time.process_time()
    out, seed, rank = Path(cfg.train.output_dir), cfg.train.seed, accelerator.process_index
    set_seed(seed)
    data, model = _data_and_model(cfg, accelerator, model)
    dev = None
    if cfg.data.dev_corpus_file:
        d = cfg.data
        dev = load_dev_set(
            d.dev_corpus_file,
            d.dev_topics_file,
            d.dev_qrels_file,
            cache_dir=d.datasets_cache_dir,
            columns=d.corpus_columns,
        )
    dataset, sampler, loader, plan = _batches(cfg, data, model, accelerator.num_processes)
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
        log_startup(cfg, accelerator.num_processes, len(dataset), len(data.corpus), plan)
    cache = None
    if cfg.loss.loss != "inbatch":
        cache = NegativeCache(cfg.cache, data.corpus, accelerator, model.dim, seed=seed, sce=cfg.sce)
    config_yaml = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    log = JsonlLog(out / "train_log.jsonl", enabled=accelerator.is_main_process)
    resume, state = restore_checkpoint(
        accelerator, out, cfg.train.resume_from, cache, config=config_to_dict(cfg)
    )
    # drop the lines written after the checkpoint this run restarts from: all of them when a run killed before
    # its first checkpoint starts over, or its steps would be logged twice
    log.truncate_after(state.step)
    clock_origin = started - state.elapsed_s  # the training clock continues across resumes
    cpu_origin = cpu_started - state.cpu_s  # and so does the main process's CPU clock
    meter = CostMeter(state.cost)  # where the time and the encodes go, by phase, carried over resumes too
    for hook in meter.watch([model.query_encoder, model.doc_encoder]):  # off the user's model once done
        cleanup.callback(hook.remove)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_yaml, encoding="utf-8")
    if cfg.train.report_to != "none":
        accelerator.init_trackers(
            "dualenc", config={f"{s}.{k}": v for s, d in config_to_dict(cfg).items() for k, v in d.items()}
        )
    if cache is not None and resume is None and cfg.cache.cache_mode == "corpus":
        with meter.phase("cache_fill"):
            reused = cache.fill(model, out / "cache_fill", batch_size=cfg.cache.cache_fill_batch_size)
        meter.add("cache_fill", cpu_s=reused.cpu_s, wall_s=reused.wall_s)
        # a run killed after its fill and before its first checkpoint starts over but keeps the fill: its
        # clocks count the encode the earlier session did (zero when the fill was encoded now)
        clock_origin, cpu_origin = clock_origin - reused.wall_s, cpu_origin - reused.cpu_s

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
            num_micro, micro_logs = plan.batches_in(step), []
            for micro in range(num_micro):
                batch = next(batches)
                draw_id = plan.micro_id(step, micro)
                torch.manual_seed(micro_seed(seed, rank, draw_id))  # dropout masks from the position alone
                last = micro == num_micro - 1
                # DDP reduces the gradients once, at the step's last micro-batch; the step's gradient is the
                # mean over its micro-batches (a short last step of an epoch counts as much as a full one)
                output = backward_micro_batch(
                    accelerator, module, batch, cache, draw_id, cfg.train, scale=1 / num_micro, sync=last
                )
                if cache is not None:  # fresh embeddings of the batch's documents and drawn negatives
                    cache.write_back(
                        output.fresh_idx, output.fresh_emb, insert=torch.arange(output.num_batch_docs)
                    )
                micro_logs.append(output.logs)
            grad_norm = None
            if cfg.train.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(module.parameters(), cfg.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            if cache is not None:  # re-encode the oldest slots with the updated towers; all slots age
                with meter.phase("cache_refresh"):
                    micro_logs[-1].update({k: torch.tensor(v) for k, v in cache.refresh(encoder).items()})
            step += 1
            bar.update(1)
            if step % cfg.train.logging_steps == 0 or step == plan.total_steps:
                logs = step_logs(accelerator, micro_logs, scheduler, grad_norm, tick, clock_origin, epoch)
                log.write(step, logs)
                accelerator.log(logs, step=step)
                bar.set_postfix(loss=f"{logs['loss']:.4f}")
            if dev is not None and (
                (cfg.train.eval_steps and step % cfg.train.eval_steps == 0) or step == plan.total_steps
            ):
                with meter.phase("dev_eval"):
                    evaluate_and_keep_best(accelerator, module, dev, cfg, step, state, log)
            state.step = step
            if (cfg.train.save_steps and step % cfg.train.save_steps == 0) or step == plan.total_steps:
                state.elapsed_s = time.perf_counter() - clock_origin
                state.cpu_s, state.cost = time.process_time() - cpu_origin, meter.totals(accelerator)
                per_process = {"cache": cache.table.state_dict()} if cache is not None else None
                with meter.phase("checkpoint"):
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
    cost = meter.totals(accelerator)  # a collective: the encodes of every process
    final = out / "final_model"
    if accelerator.is_main_process:
        facts = training_facts(cfg, step, accelerator.num_processes, state.best_metric, state.best_step)
        encoder.save_pretrained(final, training=facts)
        write_summary(
            out,
            cfg,
            plan,
            state,
            resume,
            cost,
            started=started,
            clock_origin=clock_origin,
            cpu_origin=cpu_origin,
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    best = out / "best_model" if state.best_step is not None else None
    return TrainResult(step, str(final), None if best is None else str(best), state.best_metric, logs)


def _data_and_model(
    cfg: RunConfig, accelerator: Accelerator, model: DualEncoder | None
) -> tuple[TrainData, DualEncoder]:
    """The training data, and the model: the given one (checked to be saveable now, not after training) or one
    built from ``cfg.model``."""
    data = load_train_data(
        cfg.data.train_file,
        format=cfg.data.train_format,
        corpus_file=cfg.data.corpus_file,
        queries_file=cfg.data.queries_file,
        qrels_file=cfg.data.qrels_file,
        min_relevance=cfg.data.min_relevance,
        cache_dir=cfg.data.datasets_cache_dir,
        corpus_columns=cfg.data.corpus_columns,
    )
    if model is None:
        init_dir = Path(cfg.train.output_dir) / "initial_model"
        model = build_model(cfg.model, data, seed=cfg.train.seed, init_dir=init_dir, accelerator=accelerator)
    else:
        model.check_saveable()
    return data, model


def _batches(
    cfg: RunConfig, data: TrainData, model: DualEncoder, processes: int
) -> tuple[GroupDataset, EpochSampler, torch.utils.data.DataLoader, StepPlan]:
    """The dataset, its epoch order, the loader and the step plan: P processes with batch b see exactly the
    batches of one process with batch P·b."""
    batch_size, seed = cfg.train.per_device_train_batch_size, cfg.train.seed
    dataset = GroupDataset(data, cfg.data.train_group_size, seed=seed)
    sampler = epoch_sampler(
        cfg.data.batch_sampling, data.groups, seed=seed, multiple_of=batch_size * processes
    )
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
    return dataset, sampler, loader, plan


__all__ = ["TrainResult", "TrainerState", "train"]
