"""CostMeter: encodes counted by phase and autograd mode, clocks charged to the phase they ran in, carried
figures kept apart from the session's, and the phases adding up to the run. (Its use in training, on 1 and 2
processes and across a kill -9, is checked in test_train.py and test_train_processes.py.)"""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from dualenc.training.cost_meter import PHASES, CostMeter, by_phase


class SumTower(nn.Module):
    """A tower mapping features to one vector per input: (B, L) ids (or other inputs) -> (B, 1)."""

    def forward(self, features):
        return next(iter(features.values())).float().sum(dim=1, keepdim=True)


class OneProcess:
    num_processes, device = 1, torch.device("cpu")


def _ids(batch: int, length: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.ones(batch, length, dtype=torch.long)}


def test_encodes_are_counted_by_phase_and_autograd_mode():
    query, doc = SumTower(), SumTower()
    meter = CostMeter()
    hooks = meter.watch([query, doc])
    query(_ids(4, 7))  # training, autograd on: 4 sequences of 7 padded tokens
    doc(features=_ids(8, 5))  # passed by keyword: counted too
    with torch.no_grad():
        doc(_ids(3, 5))  # a no-grad encode outside a phase (GradCache's first pass) is training's
    with meter.phase("dev_eval"), torch.no_grad():
        doc(_ids(10, 6))
        query(_ids(2, 3))
    with meter.phase("cache_refresh"), torch.no_grad():
        doc(_ids(5, 4))
    doc({"embeddings": torch.ones(2, 3)})  # no input_ids: a custom tower's own inputs are not counted
    totals = meter.totals(OneProcess())
    assert totals["training"] | {"cpu_s": 0, "wall_s": 0} == {
        "cpu_s": 0,
        "wall_s": 0,
        "grad_sequences": 4 + 8,
        "grad_tokens": 28 + 40,
        "nograd_sequences": 3,
        "nograd_tokens": 15,
    }
    assert (totals["dev_eval"]["nograd_sequences"], totals["dev_eval"]["nograd_tokens"]) == (12, 66)
    assert totals["dev_eval"]["grad_sequences"] == 0
    assert (totals["cache_refresh"]["nograd_sequences"], totals["cache_refresh"]["nograd_tokens"]) == (5, 20)
    assert totals["cache_fill"]["nograd_sequences"] == totals["checkpoint"]["nograd_sequences"] == 0
    for hook in hooks:
        hook.remove()
    doc(_ids(100, 100))
    assert meter.totals(OneProcess())["training"]["grad_sequences"] == 12  # removed hooks count nothing


def test_a_shared_tower_counts_each_call_once():
    shared = SumTower()
    meter = CostMeter()
    meter.watch([shared, shared])  # DualEncoder's query and doc towers are one module when shared
    shared(_ids(6, 2))
    assert meter.totals(OneProcess())["training"]["grad_sequences"] == 6


def test_a_phase_is_charged_the_time_spent_inside_it():
    meter = CostMeter()
    with meter.phase("checkpoint"):
        until = time.process_time() + 0.2
        while time.process_time() < until:  # busy: CPU and wall time
            pass
    with meter.phase("dev_eval"):
        time.sleep(0.2)  # idle: wall time only
    totals = meter.totals(OneProcess())
    assert 0.2 <= totals["checkpoint"]["cpu_s"] <= totals["checkpoint"]["wall_s"] + 0.05
    assert totals["dev_eval"]["wall_s"] >= 0.2 and totals["dev_eval"]["cpu_s"] < 0.1
    assert totals["cache_fill"]["cpu_s"] == totals["cache_fill"]["wall_s"] == 0.0


def test_phases_nest_and_restore_the_outer_phase_even_after_an_error():
    doc, meter = SumTower(), CostMeter()
    meter.watch([doc])
    with pytest.raises(RuntimeError), meter.phase("dev_eval"):
        raise RuntimeError("evaluation failed")
    doc(_ids(2, 2))  # back in training
    with meter.phase("cache_fill"):
        with meter.phase("checkpoint"):
            doc(_ids(1, 2))
        doc(_ids(3, 2))
    totals = meter.totals(OneProcess())
    assert totals["training"]["grad_sequences"] == 2
    assert totals["checkpoint"]["grad_sequences"] == 1 and totals["cache_fill"]["grad_sequences"] == 3


def test_carried_figures_add_to_the_session_and_survive_a_round_trip():
    doc, first = SumTower(), CostMeter()
    first.watch([doc])
    doc(_ids(4, 3))
    first.add("cache_fill", cpu_s=2.0, wall_s=1.5)  # a fill an earlier session encoded
    saved = first.totals(OneProcess())
    second = CostMeter(saved)  # the resumed session
    second.watch([doc])
    doc(_ids(1, 3))
    totals = second.totals(OneProcess())
    assert totals["training"]["grad_sequences"] == 5 and totals["training"]["grad_tokens"] == 15
    assert totals["cache_fill"]["cpu_s"] == 2.0 and totals["cache_fill"]["wall_s"] == 1.5
    assert set(totals) == set(PHASES)


def test_by_phase_gives_training_the_rest_so_the_phases_add_up_to_the_run():
    meter = CostMeter()
    meter.add("cache_fill", cpu_s=3.0, wall_s=2.0)
    meter.add("dev_eval", cpu_s=1.0, wall_s=0.5)
    phases = by_phase(meter.totals(OneProcess()), cpu_s=10.0, wall_s=6.0)
    assert phases["training"]["cpu_s"] == 6.0 and phases["training"]["wall_s"] == 3.5
    assert sum(p["cpu_s"] for p in phases.values()) == 10.0
    assert sum(p["wall_s"] for p in phases.values()) == 6.0


def test_unknown_phases_are_refused():
    with pytest.raises(ValueError, match="unknown cost phases \\['warmup'\\]"):
        CostMeter({"warmup": {}})
    with pytest.raises(ValueError, match="phase 'training'"):
        with CostMeter().phase("training"):
            pass
