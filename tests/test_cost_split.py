"""eval/cost_split.py: per-method means of each run's cost_by_phase, runs without it left out, bad input
refused. (Its reading of a real training run's summary is checked in test_train.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import load_script

from dualenc.training.cost_meter import PHASES


@pytest.fixture(scope="module")
def cost_split():
    return load_script("eval/cost_split.py")


def _phase(cpu_s: float, grad: int = 0, nograd: int = 0) -> dict:
    clocks = {"cpu_s": cpu_s, "wall_s": cpu_s / 2}
    counts = {"grad_sequences": grad, "grad_tokens": 9 * grad}
    return clocks | counts | {"nograd_sequences": nograd, "nograd_tokens": 9 * nograd}


def _run(root: Path, name: str, cost: dict | None) -> Path:
    run = root / name
    run.mkdir(parents=True)
    summary = {"steps": 10, "cpu_s": sum(p["cpu_s"] for p in (cost or {"x": {"cpu_s": 60.0}}).values())}
    if cost is not None:
        summary["cost_by_phase"] = cost
    (run / "train_summary.json").write_text(json.dumps(summary))
    return run


def _cost(training: float, fill: float, refresh: float, dev: float, grad: int, nograd: int) -> dict:
    return {
        "training": _phase(training, grad=grad),
        "cache_fill": _phase(fill, nograd=nograd),
        "cache_refresh": _phase(refresh, nograd=nograd),
        "dev_eval": _phase(dev, nograd=1000),
        "checkpoint": _phase(0.0),
    }


def test_per_method_means_by_phase(cost_split, tmp_path, capsys):
    root = tmp_path / "runs"
    _run(root, "inbatch_s1", _cost(1800, 0, 0, 1800, grad=6000, nograd=0))
    _run(root, "inbatch_s2", _cost(2520, 0, 0, 1080, grad=6000, nograd=0))
    _run(root, "cache_s1", _cost(3600, 720, 1440, 1440, grad=12000, nograd=5000))
    _run(root, "old_s1", None)  # made before cost_by_phase
    (root / "cache_s2").mkdir()  # unfinished: no summary
    result = cost_split.main(["--out", str(tmp_path / "split.json"), str(root)])
    assert "old_s1: no cost_by_phase (made before train_summary.json recorded it" in capsys.readouterr().err
    rows = {row["method"]: row for row in result["methods"]}
    assert list(rows) == ["cache", "inbatch"]  # directory order
    inbatch, cache = rows["inbatch"], rows["cache"]
    assert inbatch["runs"] == 2 and inbatch["cpu_h"] == pytest.approx(1.0)  # (3600 + 3600) / 2 s
    assert inbatch["training_cpu_h"] == pytest.approx(0.6) and inbatch["dev_eval_cpu_h"] == pytest.approx(0.4)
    assert inbatch["dev_eval_share"] == pytest.approx(0.4)
    assert inbatch["grad_ksequences"] == pytest.approx(6.0)
    assert inbatch["nograd_ksequences"] == pytest.approx(1.0)  # dev evaluation only
    assert cache["cpu_h"] == pytest.approx(2.0) and cache["cache_refresh_cpu_h"] == pytest.approx(0.4)
    assert cache["cache_fill_cpu_h"] == pytest.approx(0.2) and cache["dev_eval_share"] == pytest.approx(0.2)
    assert cache["nograd_ksequences"] == pytest.approx(11.0)  # fill 5000 + refresh 5000 + dev 1000
    saved = json.loads((tmp_path / "split.json").read_text())
    assert saved["methods"] == result["methods"] and "dev eval %" in saved["table"]
    assert [line.split()[0] for line in saved["table"].splitlines()[2:]] == ["cache", "inbatch"]


def test_named_run_dirs(cost_split, tmp_path):
    run = _run(tmp_path, "anything", _cost(10, 0, 0, 0, grad=1, nograd=0))
    result = cost_split.main(["--out", str(tmp_path / "s.json"), f"mine={run}"])
    assert [row["method"] for row in result["methods"]] == ["mine"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: _run(root, "x_s1", None), "no finished run recorded cost_by_phase"),
        (lambda root: _run(root, "x_s1", {p: _phase(1.0) for p in PHASES[:-1]}), "has the phases"),
        (lambda root: (root / "x_s1").mkdir(parents=True), "no finished run recorded"),
    ],
)
def test_bad_input_is_one_clear_error_and_writes_nothing(cost_split, tmp_path, capsys, make, message):
    root = tmp_path / "runs"
    root.mkdir()
    make(root)
    with pytest.raises(SystemExit) as exit_info:
        cost_split.main(["--out", str(tmp_path / "split.json"), str(root)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "split.json").exists()


def test_a_named_dir_without_a_summary_is_refused(cost_split, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cost_split.main(["--out", str(tmp_path / "s.json"), f"x={tmp_path / 'missing'}"])
    assert "no train_summary.json: not a finished training run" in capsys.readouterr().err
