"""Benchmarks stay runnable: each bench script's smallest configuration, end to end, JSON keys checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, args: list[str], out: Path) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_cache_step_bench_quick(tmp_path):
    report = _run("cache_step.py", ["--quick"], tmp_path / "cache.json")
    assert {r["variant"] for r in report["rows"]} == {"inbatch", "cache"}
    row = report["summary"][0]
    assert row["cache_work_s"] > 0 and row["negs_per_q_per_s_ratio"] > 0 and "commit" in report
    cache = next(r for r in report["rows"] if r["variant"] == "cache")
    assert set(cache["times_s"]) == {"encode_grad", "cache_work", "optimizer"}


def test_train_step_bench_small(tmp_path):
    args = ["--layers", "1", "--hidden", "64", "--batch-size", "2", "--group-size", "2", "--query-len", "8",
            "--passage-len", "16", "--repeats", "1"]  # fmt: skip
    report = _run("train_step.py", args, tmp_path / "train.json")
    assert [r["precision"] for r in report["rows"]] == ["no", "bf16"]
    assert all(r["step_s"] > 0 and r["peak_mib"] >= 0 for r in report["rows"])
