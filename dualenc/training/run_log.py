"""What a run writes about itself: ``train_log.jsonl``, the logged values of a step, the startup line,
``train_summary.json``."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dualenc.io import atomic
from dualenc.io.provenance import environment_info
from dualenc.training.config import RunConfig
from dualenc.training.cost_meter import by_phase
from dualenc.training.plan import StepPlan

if TYPE_CHECKING:
    from dualenc.training.checkpoint import TrainerState

logger = logging.getLogger(__name__)


class JsonlLog:
    """Append-only ``train_log.jsonl`` (one object per logged step), written by the main process only."""

    def __init__(self, path: str | os.PathLike, *, enabled: bool):
        self.path, self.enabled = Path(path), enabled

    def write(self, step: int, values: dict) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": step, **values}) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop entries past ``step`` (written after the checkpoint a resumed run restarts from)."""
        if not self.enabled or not self.path.exists():
            return
        lines = [ln for ln in self.path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        kept = [ln for ln in lines if json.loads(ln)["step"] <= step]
        atomic.write_lines(self.path, kept)


def log_startup(cfg: RunConfig, processes: int, num_groups: int, num_docs: int, plan: StepPlan) -> None:
    """One line that spells out the run's arithmetic: batch x processes x accumulation, negatives, steps."""
    b, g, gas = cfg.train.per_device_train_batch_size, cfg.data.train_group_size, plan.accumulation
    shown = b * g * (processes if cfg.loss.negatives_x_device else 1)
    logger.info(
        "training: %d query groups, %d corpus documents, %d processes, batch %d per process x %d "
        "processes x %d accumulation = %d queries per optimizer step; documents per query %d -> negatives "
        "per query %d (%d in-batch/cross-device + %d hard); %d micro-batches per process per epoch = %d "
        "optimizer steps per epoch; %d optimizer steps (%d epochs)",
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
    if cfg.train.grad_cache:
        logger.info(
            "GradCache: each micro-batch of %d queries is encoded and back-propagated in chunks of %d "
            "queries and %d documents",
            b,
            cfg.train.grad_cache_query_chunk,
            cfg.train.grad_cache_passage_chunk,
        )


def step_logs(
    accelerator, step_logs: list[dict], scheduler, grad_norm, tick: float, clock_origin: float, epoch: int
) -> dict:
    """Loss logs averaged over the step's micro-batches and the processes, plus learning rate, gradient norm,
    times and peak memory.

    ``step_time_s`` is the last optimizer step, ``elapsed_s`` the wall time of training so far (data loading,
    cache fill and dev evaluations included), continued across resumes from the checkpoint's ``elapsed_s``;
    ``peak_rss_gib`` is the main process's resident-set high-water mark (``ru_maxrss``), ``peak_mem_gib`` the
    CUDA allocator's peak.
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
    rss = peak_rss_gib()
    if rss is not None:
        logs["peak_rss_gib"] = rss
    if grad_norm is not None:
        logs["grad_norm"] = float(grad_norm)
    if torch.cuda.is_available():
        logs["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return logs


def peak_rss_gib() -> float | None:
    """This process's resident-set high-water mark in GiB (``ru_maxrss``), None where unavailable."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    scale = 2**30 if sys.platform == "darwin" else 2**20  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def write_summary(
    out: Path,
    cfg: RunConfig,
    plan: StepPlan,
    state: TrainerState,
    resume: Path | None,
    cost: dict[str, dict],
    *,
    started: float,
    clock_origin: float,
    cpu_origin: float,
) -> None:
    """``train_summary.json``: steps, epochs, best dev score, wall and CPU times, peak memory, where it
    resumed, and what made the run (commit, machine, versions; the settings are ``config.yaml`` beside it).

    ``cpu_s`` is the main process's CPU time (user + system, all its threads) since the run began, carried
    over resumes like ``wall_s`` (a restart that reuses an earlier session's cache fill counts the fill:
    :mod:`~dualenc.negcache.fill_cost`): the cost that does not grow when other jobs share the machine.
    With several processes, each spends about as much. ``cost_by_phase`` splits both clocks and counts the
    encodes by phase (``cost``: :meth:`~dualenc.training.cost_meter.CostMeter.totals`)."""
    now, cpu_s = time.perf_counter(), time.process_time() - cpu_origin
    summary = {
        "steps": state.step,
        "epochs": plan.num_epochs(),
        "best_step": state.best_step,
        "best_metric": state.best_metric,
        "eval_measure": cfg.train.eval_measure,
        "wall_s": now - clock_origin,
        "session_wall_s": now - started,
        "cpu_s": cpu_s,
        "peak_rss_gib": peak_rss_gib(),
        "resumed_from": None if resume is None else str(resume),
        "cost_by_phase": by_phase(cost, cpu_s, now - clock_origin),
    }
    if torch.cuda.is_available():
        summary["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    summary["made_by"] = environment_info(Path(__file__).parent)  # dualenc commit, machine, library versions
    atomic.write_json(out / "train_summary.json", summary)
