"""Benchmarks stay runnable: each bench script's smallest configuration, end to end, JSON keys checked.

They run with ``datasets``, ``faiss``, ``ir_measures`` and ``pyarrow`` made unimportable, as on a GPU
machine that has torch, transformers and accelerate only: a bench that needed them would otherwise fail only
there, on the GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import REPO, gpu_machine_env


def _run(script: str, args: list[str], out: Path) -> dict:
    """Run a bench script as it would run on the GPU machine."""
    env = gpu_machine_env(out.parent)
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_the_blocker_blocks(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", "import ir_measures"],
        capture_output=True,
        text=True,
        env=gpu_machine_env(tmp_path),
    )
    assert proc.returncode != 0 and "not installed on the GPU machine" in proc.stderr


def test_cache_step_bench_quick(tmp_path):
    report = _run("cache_step.py", ["--quick"], tmp_path / "cache.json")
    assert {r["variant"] for r in report["rows"]} == {"inbatch", "cache"}
    row = report["summary"][0]
    assert row["cache_work_s"] > 0 and row["negs_per_q_per_s_ratio"] > 0 and "commit" in report
    cache = next(r for r in report["rows"] if r["variant"] == "cache")
    assert set(cache["times_s"]) == {"encode_grad", "cache_work", "optimizer"}


def test_train_step_bench_small(tmp_path):
    args = [
        "--layers",
        "1",
        "--hidden",
        "64",
        "--batch-size",
        "2",
        "--group-size",
        "2",
        "--query-len",
        "8",
        "--passage-len",
        "16",
        "--repeats",
        "1",
    ]
    report = _run("train_step.py", args, tmp_path / "train.json")
    assert [r["precision"] for r in report["rows"]] == ["no", "bf16"]
    assert all(r["step_s"] > 0 and r["peak_mib"] >= 0 for r in report["rows"])


def test_loss_memory_bench_quick_without_data_libraries(tmp_path):
    report = _run("loss_memory.py", ["--quick", "--losses", "ce", "sce"], tmp_path / "loss.json")
    assert [r["status"] for r in report["rows"]] == ["ok", "ok"]


def test_gpu_checks_script_smoke_on_cpu(tmp_path):
    """scripts/gpu_checks.sh (the checks for a machine with a GPU) in its CPU smoke mode, data libraries
    blocked."""
    out = tmp_path / "gpu"
    env = gpu_machine_env(tmp_path, DEVICE="cpu", QUICK="1", OUT=str(out))
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_checks.sh")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 failed step(s)" in proc.stdout
    for name in (
        "loss_memory_cpu.json",
        "cache_step_cpu.json",
        "train_step_cpu.json",
        "grad_cache_step_cpu.json",
    ):
        assert json.loads((out / name).read_text())["rows"], name
