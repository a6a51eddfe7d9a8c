"""bench/grad_cache_step.py at tiny shapes (``--quick``: 1-layer BERT of width 32, 8 queries, chunks of 3).

The configurations run in this process (``bench_common.run_config`` replaced by the script's ``run_single``):
a fresh subprocess per configuration would import torch, transformers and sentence-transformers five times,
about a minute on the 2-core machine. The subprocess path itself is the one every bench shares
(tests/test_bench.py runs it). Timings and memory of a tiny model are noise: only the structure, the
agreement of the first-step losses and the ratios' arithmetic are checked.
"""

from __future__ import annotations

import json
import math
import statistics
import sys

import pytest
from helpers import load_script

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture
def bench(monkeypatch):
    """The bench module, its configurations run in-process with a fresh Accelerate state each."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    module = load_script("bench/grad_cache_step.py")

    def in_process(script, cfg: dict) -> dict:
        for state in (AcceleratorState, GradientState, PartialState):
            state._reset_state()
        return json.loads(json.dumps(module.run_single(json.loads(json.dumps(cfg)))))  # as through a pipe

    monkeypatch.setattr(module.bench_common, "run_config", in_process)
    return module


def test_every_configuration_runs_and_the_same_objective_gives_the_same_loss(bench, tmp_path):
    out = tmp_path / "gc.json"
    bench.main(["--quick", "--out", str(out)])
    report = json.loads(out.read_text())
    rows, summary = report["rows"], report["summary"]
    assert [r["variant"] for r in rows] == list(bench.VARIANTS) == [s["variant"] for s in summary]
    assert all(r["status"] == "ok" and r["step_s"] > 0 and r["peak_mib"] is not None for r in rows)
    assert "commit" in report and "versions" in report and report["table"]
    assert report["losses_agree"] and report["grads_agree"]
    assert {r["variant"] for r in rows if "st_version" in r} == {"st_cached", "st_plain"}

    by = {r["variant"]: r for r in rows}
    plain = by["plain"]
    assert plain["batch"] == 8 and by["plain_chunk"]["batch"] == 3  # chunks of 3 do not divide 8
    for name in ("grad_cache", "st_cached", "st_plain"):  # same weights, batch and objective
        assert by[name]["batch"] == 8
        assert by[name]["loss"] == pytest.approx(plain["loss"], abs=1e-4), name
        assert by[name]["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-4), name
    # a smaller batch is another objective (fewer in-batch negatives): its loss really differs
    assert abs(by["plain_chunk"]["loss"] - plain["loss"]) > 1e-2
    assert abs(by["plain_chunk"]["grad_norm"] / plain["grad_norm"] - 1) > 1e-2
    assert 0 < plain["loss"] < math.log(8) + 1  # random embeddings: about log(B)

    for r, s in zip(rows, summary, strict=True):  # the ratios are the measured values' ratios
        assert r["step_s"] == statistics.median(r["times_s"]) and len(r["times_s"]) == 1
        assert s["step_s"] == r["step_s"] and s["time_ratio"] == pytest.approx(r["step_s"] / plain["step_s"])
        if plain["peak_mib"] > 0:
            assert s["mem_ratio"] == pytest.approx(r["peak_mib"] / plain["peak_mib"])
        same = r["batch"] == 8
        assert s["loss_diff"] == (pytest.approx(abs(r["loss"] - plain["loss"])) if same else None)
        assert s["grad_rdiff"] == (
            pytest.approx(abs(r["grad_norm"] / plain["grad_norm"] - 1)) if same else None
        )
    assert [s["chunk"] for s in summary] == [None, 3, 3, None, None]


def test_without_sentence_transformers_its_rows_are_unavailable(bench, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import raises ImportError
    out = tmp_path / "gc.json"
    bench.main(["--quick", "--variants", "plain", "st_cached", "--out", str(out)])
    report = json.loads(out.read_text())
    st = report["rows"][1]
    assert st["status"] == "unavailable" and "sentence_transformers" in st["error"]
    assert report["summary"][1].get("step_s") is None and report["losses_agree"] and report["grads_agree"]
    assert "unavailable" in report["table"]


def _fake(values: dict[str, tuple[float, float, float, float]]):
    """A run_config whose configurations 'measured' (step_s, peak_mib, loss, grad_norm)."""

    def run_config(script, cfg: dict) -> dict:
        step_s, peak, loss, grad_norm = values[cfg["variant"]]
        batch = cfg["chunk"] if cfg["variant"] == "plain_chunk" else cfg["batch_size"]
        measured = {
            "step_s": step_s,
            "times_s": [step_s],
            "peak_mib": peak,
            "loss": loss,
            "grad_norm": grad_norm,
        }
        return {**cfg, "status": "ok", "batch": batch, **measured}

    return run_config


def test_ratios_and_disagreements_come_from_the_measured_values(monkeypatch, tmp_path):
    module = load_script("bench/grad_cache_step.py")
    values = {
        "plain": (2.0, 400.0, 4.85, 2.0),
        "grad_cache": (3.0, 100.0, 4.85, 2.1),
        "st_plain": (2.5, 500.0, 4.86, 2.0),
        "plain_chunk": (0.5, 90.0, 3.4, 5.0),
    }
    monkeypatch.setattr(module.bench_common, "run_config", _fake(values))
    out = tmp_path / "gc.json"
    with pytest.raises(SystemExit, match="differs"):  # st_plain's loss is 0.01 off, grad_cache's gradient 5%
        module.main(["--variants", *values, "--out", str(out)])
    report = json.loads(out.read_text())  # written before the exit
    summary = {s["variant"]: s for s in report["summary"]}
    assert not report["losses_agree"] and not report["grads_agree"]
    assert summary["grad_cache"]["time_ratio"] == pytest.approx(1.5)
    assert summary["grad_cache"]["mem_ratio"] == pytest.approx(0.25)
    assert summary["st_plain"]["loss_diff"] == pytest.approx(0.01)
    assert summary["grad_cache"]["grad_rdiff"] == pytest.approx(0.05)
    assert summary["st_plain"]["grad_rdiff"] == 0
    assert summary["plain_chunk"]["loss_diff"] is None and summary["plain_chunk"]["grad_rdiff"] is None
    assert summary["plain_chunk"]["mem_ratio"] == pytest.approx(0.225)
