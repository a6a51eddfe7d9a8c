"""Where a training run's cost goes: CPU time, wall time and encoder work, by phase.

The phases are the negative cache's fill (one no-grad pass over the corpus) and refresh (re-encoding the
oldest slots after each optimizer step), dev evaluation, checkpoint writing, and ``training``: everything else
(the training steps' forward and backward passes, and the startup: reading data, building the model). Encoder
work is counted by a forward pre-hook on each tower: the inputs (sequences) and their padded tokens
(``input_ids`` elements), apart for passes with autograd on (each followed by a backward pass, about twice a
forward's work) and passes without (no-grad encodes, GradCache's first pass). The encodes are summed over
processes (2 processes count what 1 process with their global batch counts); the clocks are the main
process's, as ``cpu_s`` of ``train_summary.json`` is. Both are carried over resumes in the trainer state. A
cache fill that a run killed before its first checkpoint left, and its restart reused, is on the clocks (its
recorded cost) but not in the counts.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

PHASES = ("training", "cache_fill", "cache_refresh", "dev_eval", "checkpoint")


@dataclass
class PhaseCost:
    """One phase's clocks (seconds) and encoder work (sequences and padded tokens through a tower)."""

    cpu_s: float = 0.0
    wall_s: float = 0.0
    grad_sequences: int = 0  # encoded with autograd on: a forward and, later, a backward pass
    grad_tokens: int = 0
    nograd_sequences: int = 0  # encoded without autograd: a forward pass only
    nograd_tokens: int = 0


COUNTS = ("grad_sequences", "grad_tokens", "nograd_sequences", "nograd_tokens")


class CostMeter:
    """Clocks and encoder-work counters of one training run, by phase (see the module docstring).

    ``carried`` is what :meth:`totals` returned when the checkpoint this run resumes from was saved; this
    session's figures are kept apart from it, so that the encodes can be summed over processes without
    counting the carried ones once per process.
    """

    def __init__(self, carried: Mapping[str, Mapping] | None = None):
        carried = carried or {}
        unknown = set(carried) - set(PHASES)
        if unknown:
            raise ValueError(f"unknown cost phases {sorted(unknown)}: the phases are {list(PHASES)}")
        self.carried = {name: PhaseCost(**carried.get(name, {})) for name in PHASES}
        self.session = {name: PhaseCost() for name in PHASES}  # this process, since this session began
        self._current = "training"

    def watch(self, towers: list[nn.Module]) -> list[RemovableHandle]:
        """Count each forward call of every distinct module in ``towers``; remove the handles when done."""
        distinct = {id(t): t for t in towers}.values()  # a shared tower is one module: counted once per call
        return [t.register_forward_pre_hook(self._count, with_kwargs=True) for t in distinct]

    def _count(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        features = args[0] if args else kwargs.get("features")
        ids = features.get("input_ids") if isinstance(features, Mapping) else None
        if not isinstance(ids, torch.Tensor) or ids.dim() == 0:
            return  # a custom tower called with something else: its work is not counted
        cost = self.session[self._current]
        sequences, tokens = int(ids.shape[0]), int(ids.numel())  # ids: (B, L)
        if torch.is_grad_enabled():
            cost.grad_sequences += sequences
            cost.grad_tokens += tokens
        else:
            cost.nograd_sequences += sequences
            cost.nograd_tokens += tokens

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Charge the encodes inside to phase ``name``, and its CPU (all threads) and wall time."""
        if name not in PHASES or name == "training":
            raise ValueError(f"phase {name!r}: choose one of {list(PHASES[1:])}")
        outer, self._current = self._current, name
        cpu_0, wall_0 = time.process_time(), time.perf_counter()
        try:
            yield
        finally:
            self.add(name, cpu_s=time.process_time() - cpu_0, wall_s=time.perf_counter() - wall_0)
            self._current = outer

    def add(self, name: str, *, cpu_s: float, wall_s: float) -> None:
        """Charge time spent elsewhere to phase ``name`` (a cache fill an earlier session encoded and this one
        reused)."""
        self.session[name].cpu_s += cpu_s
        self.session[name].wall_s += wall_s

    def totals(self, accelerator) -> dict[str, dict]:
        """The run's figures so far: carried plus this session's, the encodes summed over processes and the
        clocks this process's. A collective: every process calls it (the main process's result is the one
        to keep)."""
        counts = torch.tensor(
            [[getattr(self.session[name], field) for field in COUNTS] for name in PHASES],
            dtype=torch.int64,
            device=accelerator.device,
        )  # (phases, 4)
        if accelerator.num_processes > 1:
            counts = accelerator.reduce(counts, reduction="sum")
        totals = {}
        for name, row in zip(PHASES, counts.tolist(), strict=True):
            carried, session = self.carried[name], self.session[name]
            totals[name] = {
                "cpu_s": carried.cpu_s + session.cpu_s,
                "wall_s": carried.wall_s + session.wall_s,
                **{field: getattr(carried, field) + n for field, n in zip(COUNTS, row, strict=True)},
            }
        return totals


def by_phase(totals: Mapping[str, Mapping], cpu_s: float, wall_s: float) -> dict[str, dict]:
    """``train_summary.json``'s ``cost_by_phase``: :meth:`CostMeter.totals` of a run that took ``cpu_s`` and
    ``wall_s`` in all, with ``training`` given what the other phases did not take (the phases add up to the
    run)."""
    phases = {name: dict(values) for name, values in totals.items()}
    others = [values for name, values in phases.items() if name != "training"]
    phases["training"]["cpu_s"] = cpu_s - sum(values["cpu_s"] for values in others)
    phases["training"]["wall_s"] = wall_s - sum(values["wall_s"] for values in others)
    return phases


__all__ = ["COUNTS", "PHASES", "CostMeter", "PhaseCost", "by_phase"]
