"""`dualenc report`: real tiny training runs (in-batch with a dev set and a test evaluation; negative cache
without dev set) -> report.md, report.json and PNGs whose numbers are the log's; bad input is one error
line."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, read_log, tiny_overrides, write_triples

from dualenc.cli import main
from dualenc.errors import InputError
from dualenc.reporting import read_run_dir, write_report
from dualenc.reporting.plots import comparison_figure, run_figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MEASURE = "RR@10"


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()


def _dev_set(tmp: Path) -> dict[str, str]:
    triples = write_triples(tmp / "triples.tsv", 40, seed=1)
    rows = [line.split("\t") for line in triples.read_text().splitlines()]
    (tmp / "dev_corpus.tsv").write_text("".join(f"d{i}\t{pos}\n" for i, (_, pos, _) in enumerate(rows[:20])))
    (tmp / "dev_topics.tsv").write_text("".join(f"q{i}\t{q}\n" for i, (q, _, _) in enumerate(rows[:20])))
    (tmp / "dev_qrels.txt").write_text("".join(f"q{i} 0 d{i} 1\n" for i in range(20)))
    return {
        "train_file": str(triples),
        "dev_corpus_file": str(tmp / "dev_corpus.tsv"),
        "dev_topics_file": str(tmp / "dev_topics.tsv"),
        "dev_qrels_file": str(tmp / "dev_qrels.txt"),
    }


def _test_evaluation(run_dir: Path, dev: dict[str, str]) -> None:
    """``test.json`` as the eval scripts write it: the pipeline's report on the run's best model."""
    from dualenc.evaluation.pipeline import PipelineConfig, run_pipeline

    cfg = PipelineConfig(
        model=str(run_dir / "best_model"),
        collection=dev["dev_corpus_file"],
        topics=dev["dev_topics_file"],
        qrels=dev["dev_qrels_file"],
        work_dir=str(run_dir.parent / "eval_work"),
        measures="RR@10 nDCG@10",
        device="cpu",
        hits=10,
    )
    (run_dir / "test.json").write_text(json.dumps(run_pipeline(cfg), indent=2))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two real runs: ``inbatch`` (dev RR@10 every 4 steps, test.json) and ``cache`` (no dev set)."""
    from dualenc.training.config import load_config
    from dualenc.training.loop import train

    tmp = tmp_path_factory.mktemp("runs")
    dev = _dev_set(tmp)
    configs = REPO / "recipes" / "configs"
    inbatch = tiny_overrides(
        tmp, **dev, output_dir=tmp / "inbatch", max_steps=8, eval_steps=4, eval_measure=MEASURE
    )
    cache = tiny_overrides(tmp, train_file=dev["train_file"], output_dir=tmp / "cache", max_steps=6)
    try:
        _reset_accelerate()
        train(load_config(configs / "tiny.yaml", inbatch))
        _reset_accelerate()
        train(load_config(configs / "tiny_cache.yaml", cache))
    finally:
        _reset_accelerate()
    _test_evaluation(tmp / "inbatch", dev)
    return {"inbatch": tmp / "inbatch", "cache": tmp / "cache"}


def _check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert width >= 800 and height >= 300 and len(data) > 20_000, (path, width, height, len(data))


def _expected_row(run_dir: Path) -> dict:
    """The table's numbers computed here, independently, from the jsonl."""
    log = read_log(run_dir)
    losses = [(r["step"], r["loss"]) for r in log if "loss" in r]
    dev = [(r["step"], r[f"dev/{MEASURE}"]) for r in log if f"dev/{MEASURE}" in r]
    best = max(dev, key=lambda p: (p[1], -p[0])) if dev else (None, None)
    return {
        "steps": max(r["step"] for r in log),
        "last loss": max(losses)[1],
        "best dev": best[1],
        "best step": best[0],
    }


def test_one_run_report_next_to_its_log(runs, tmp_path):
    run_dir = shutil.copytree(runs["inbatch"], tmp_path / "inbatch")
    log_before = (run_dir / "train_log.jsonl").read_bytes()
    assert write_report([run_dir]) == run_dir  # default: the run's own directory
    assert (run_dir / "train_log.jsonl").read_bytes() == log_before  # the run's files are left alone
    assert (run_dir / "final_model").is_dir() and (run_dir / "best_model").is_dir()
    _check_png(run_dir / "report_figures" / "inbatch_training.png")
    data = json.loads((run_dir / "report.json").read_text())
    (row,) = data["rows"]
    expected = _expected_row(run_dir)
    assert expected["best step"] is not None and expected["steps"] == 8
    assert {k: row[k] for k in expected} == pytest.approx(expected)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert (row["best step"], row["best dev"]) == (
        summary["best_step"],
        pytest.approx(summary["best_metric"]),
    )
    test = json.loads((run_dir / "test.json").read_text())["measures"]
    assert row["test"] == "test.json" and row["test RR@10"] == pytest.approx(test["RR@10"])
    text = (run_dir / "report.md").read_text()
    assert f"| inbatch | inbatch | 8 | yes | {expected['last loss']:.4f} | RR@10 |" in text
    assert f"RR@10 {expected['best dev']:.4f} at step {expected['best step']}" in text
    assert f"RR@10 {test['RR@10']:.4f}, nDCG@10 {test['nDCG@10']:.4f}" in text
    assert "![training curves of inbatch](report_figures/inbatch_training.png)" in text
    assert (
        "- **commit**: `" in text and "- **temperature**: 0.05" in text and "no test evaluation" not in text
    )


def _check_figure(fig) -> None:
    """Every panel has a title and labelled axes, and every line a legend label."""
    for ax in fig.axes:
        assert ax.get_title() and ax.get_xlabel() == "optimizer step" and ax.get_ylabel(), ax
        for line in ax.get_lines():
            assert line.get_label() and not line.get_label().startswith("_"), (ax.get_title(), line)
        if ax.get_lines():
            legend = [t.get_text() for t in ax.get_legend().get_texts()]
            assert legend == [line.get_label() for line in ax.get_lines()]


def test_two_runs_are_compared(runs, tmp_path):
    out = tmp_path / "report"
    write_report([runs["inbatch"], runs["cache"]], out)
    for name in ("inbatch_training.png", "cache_training.png", "compare_curves.png"):
        _check_png(out / "report_figures" / name)
    data = json.loads((out / "report.json").read_text())
    assert [row["run"] for row in data["rows"]] == ["inbatch", "cache"]
    for row, run_dir in zip(data["rows"], (runs["inbatch"], runs["cache"]), strict=True):
        assert {k: row[k] for k in _expected_row(run_dir)} == pytest.approx(_expected_row(run_dir))
    assert data["rows"][1]["test"] == "no test evaluation" and data["rows"][1]["best dev"] is None
    text = (out / "report.md").read_text()
    assert "| inbatch | inbatch | 8 |" in text and "| cache | cache | 6 |" in text
    assert "![loss and dev curves of the runs](report_figures/compare_curves.png)" in text
    cache_section = text[text.index("## Run `cache`") :]
    assert "no test evaluation" in cache_section and "no dev points" in cache_section
    assert "- **cache**: cache_mode=corpus" in cache_section and "interpretable -log p+" in cache_section


def test_figures_label_every_line(runs):
    inbatch, cache = read_run_dir(runs["inbatch"]), read_run_dir(runs["cache"])
    for fig in (run_figure(inbatch), run_figure(cache), comparison_figure([inbatch, cache])):
        _check_figure(fig)
    titles = [ax.get_title() for ax in run_figure(cache).axes]
    assert {"Negative cache: staleness", "Negative cache: rank of the positive"} <= set(titles)
    dev = comparison_figure([inbatch, cache]).axes[1]
    labels = [line.get_label() for line in dev.get_lines()]
    assert "cache: no dev points" in labels and any(label.startswith("inbatch: best") for label in labels)
    assert "no dev points in the log" in " ".join(t.get_text() for t in run_figure(cache).axes[1].texts)


def _bad_copy(run_dir: Path, tmp_path: Path, line_no: int | None = None, text: str = "") -> Path:
    """The run's config and log in a new directory, line ``line_no`` of the log replaced by ``text``."""
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(run_dir / "config.yaml", bad / "config.yaml")
    lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    if line_no is not None:
        lines[line_no - 1] = text
    (bad / "train_log.jsonl").write_text("\n".join(lines) + "\n")
    return bad


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"step": 3, "loss": 1.0', "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"loss": 1.0}', 'no "step"'),
        ('{"step": 3, "loss": "low"}', "'loss' is not a number"),
    ],
)
def test_a_malformed_log_line_names_file_and_line(runs, tmp_path, text, problem):
    bad = _bad_copy(runs["inbatch"], tmp_path, 3, text)
    with pytest.raises(InputError) as err:
        write_report([bad], tmp_path / "out")
    assert err.value.path.endswith("train_log.jsonl") and err.value.line == 3 and problem in err.value.problem
    assert not (tmp_path / "out").exists()


def test_a_last_line_being_written_is_left_out(runs, tmp_path):
    """A running trainer's half-written last line (no newline yet) is not an error."""
    bad = _bad_copy(runs["inbatch"], tmp_path)
    with open(bad / "train_log.jsonl", "a") as fh:
        fh.write('{"step": 9, "lo')
    assert len(read_run_dir(bad).records) == len(read_log(runs["inbatch"]))


@pytest.mark.parametrize(
    ("config", "line", "problem"),
    [
        (None, None, "file not found"),
        ("model:\n  pooling: mean\ntrain: [1, 2\n", 4, "invalid YAML"),
        ("model:\n  pooling: mean\ntrain: 5\n", 3, "section 'train' is not a mapping"),
    ],
)
def test_a_bad_config_names_file_and_line(runs, tmp_path, config, line, problem):
    bad = _bad_copy(runs["inbatch"], tmp_path)
    if config is None:
        (bad / "config.yaml").unlink()
    else:
        (bad / "config.yaml").write_text(config)
    with pytest.raises(InputError) as err:
        write_report([bad], tmp_path / "out")
    assert err.value.path.endswith("config.yaml") and err.value.line == line and problem in err.value.problem


def test_cli_report(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "report", str(runs["inbatch"]), str(runs["cache"])]) == 0  # default: ./report
    assert "report: report/report.md" in capsys.readouterr().out
    for name in ("report.md", "report.json", "report_figures/compare_curves.png"):
        assert (tmp_path / "report" / name).is_file()
    # a report of one run into the same folder replaces it whole: the comparison figure is gone
    assert main(["-q", "report", str(runs["cache"]), "--out", "report"]) == 0
    assert sorted(p.name for p in (tmp_path / "report" / "report_figures").iterdir()) == [
        "cache_training.png"
    ]
    bad = _bad_copy(runs["inbatch"], tmp_path, 2, "not json")
    assert main(["-q", "report", str(bad), "--out", "bad_report"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dualenc: error: ") and err.endswith(
        "train_log.jsonl:2: invalid JSON: Expecting value (column 1)"
    )
    assert main(["-q", "report", str(tmp_path / "missing")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    assert not (tmp_path / "bad_report").exists()


def test_without_matplotlib_the_report_says_so(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    write_report([runs["cache"]], tmp_path / "out")
    assert "matplotlib is not installed" in (tmp_path / "out" / "report.md").read_text()
    assert not (tmp_path / "out" / "report_figures").exists()


def test_the_package_imports_without_matplotlib():
    code = "import sys, dualenc.reporting, dualenc.cli; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
