"""recipes/scifact_frontier.sh's plumbing, run as written with a stand-in `python` that logs its arguments.

The recipe's runs take hours; what can go wrong in minutes is the shell around them: a method name turned
into the wrong config or overrides, a learning-rate suffix dropped, a bad name found after hours of training,
a pair or a mining cost missing from the frontier. The stand-in writes the files each step would, so the
recipe's skip-if-done logic runs too.
"""

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/usr/bin/env bash
# stand-in for python: log the call, write what the step would write
printf '%s\\n' "$*" >> "$FAKE_LOG"
prev=
for a in "$@"; do
  case $a in output_dir=*) d=${a#output_dir=}; mkdir -p "$d"; echo '{}' > "$d/train_summary.json" ;; esac
  case $prev in
    --output-json|--output) mkdir -p "$(dirname "$a")"; echo '{}' > "$a" ;;
    --output-dir) mkdir -p "$a"; echo '{}' > "$a/train_summary.json" ;;
  esac
  prev=$a
done
"""


@pytest.fixture
def recipe(tmp_path: Path):
    """The recipes copied beside a stand-in python; returns run(methods, **env) -> (result, logged calls)."""
    repo = tmp_path / "repo"
    (repo / "recipes").mkdir(parents=True)
    for name in ("scifact_frontier.sh", "hard_negative_round.sh"):
        shutil.copy(ROOT / "recipes" / name, repo / "recipes" / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    log = tmp_path / "calls.log"

    def run(methods: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
        log.write_text("")
        full_env = {
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "FAKE_LOG": str(log),
            "OUT": str(out),
            "METHODS": methods,
            **env,
        }
        result = subprocess.run(
            ["bash", str(repo / "recipes" / "scifact_frontier.sh")],
            env=full_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return result, log.read_text().splitlines()

    run.out = out
    return run


def _calls(calls: list[str], script: str) -> list[str]:
    return [c for c in calls if c.startswith(script)]


def _frontier_args(calls: list[str]) -> list[str]:
    (frontier,) = _calls(calls, "eval/frontier.py")
    return frontier.split()


def _train_calls_by_run(calls: list[str]) -> dict[str, list[str]]:
    """The trainer's calls, split into arguments, by the name of their output_dir."""
    runs = {}
    for call in _calls(calls, "recipes/train.py"):
        args = call.split()
        (out_dir,) = [a.removeprefix("output_dir=") for a in args if a.startswith("output_dir=")]
        runs[Path(out_dir).name] = args
    return runs


def _pairs(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == "--pair"]


def test_a_learning_rate_suffix_reaches_the_trainer_and_sentence_transformers(recipe):
    result, calls = recipe("cache_b32_lr8e-5 inbatch_b16_lr1.6e-4 st_mnrl_b32_lr8e-5 inbatch_b32")
    assert result.returncode == 0, result.stderr
    train = _calls(calls, "recipes/train.py")
    assert len(train) == 3
    cache, b16, plain = (c.split() for c in train)
    assert "recipes/configs/scifact_cache.yaml" in cache and cache[-1] == "learning_rate=8e-5"
    assert f"output_dir={recipe.out}/cache_b32_lr8e-5_s42" in cache
    assert "per_device_train_batch_size=16" in b16 and b16[-1] == "learning_rate=1.6e-4"
    assert not any(a.startswith("learning_rate=") for a in plain)  # no suffix: the config's rate
    (st,) = _calls(calls, "eval/st_scifact.py")
    assert "--loss mnrl --batch-size 32 --lr 8e-5 --seed 42" in st
    scored = _calls(calls, "eval/beir_scifact.py")
    assert len(scored) == 5  # zero-shot and the four runs
    assert any(f"--model {recipe.out}/st_mnrl_b32_lr8e-5_s42/best_model" in c for c in scored)


def test_pairs_hold_at_every_learning_rate_and_none_is_given_twice(recipe):
    methods = (
        "inbatch_b32_lr8e-5 cache_b32_lr8e-5 inbatch_b32_5ep_lr8e-5 cache_b16_lr8e-5 inbatch_b16_lr8e-5"
        " cache_b32_5ep_lr8e-5 inbatch_b32_9ep_lr8e-5"
    )
    result, calls = recipe(methods, BASELINE="inbatch_b32_lr8e-5")
    assert result.returncode == 0, result.stderr
    train = _train_calls_by_run(calls)
    cache_5ep = train["cache_b32_5ep_lr8e-5_s42"]
    assert "recipes/configs/scifact_cache.yaml" in cache_5ep and "num_train_epochs=5" in cache_5ep
    assert "num_train_epochs=9" in train["inbatch_b32_9ep_lr8e-5_s42"]
    args = _frontier_args(calls)
    pairs = _pairs(args)
    assert sorted(pairs) == [
        "cache_b16_lr8e-5=inbatch_b16_lr8e-5",
        "cache_b32_5ep_lr8e-5=inbatch_b32_9ep_lr8e-5",
        "cache_b32_lr8e-5=inbatch_b32_5ep_lr8e-5",
    ]  # every pair against the baseline is in the table already
    assert args[args.index("--baseline") + 1] == "inbatch_b32_lr8e-5"
    # against the default baseline, the rate's own in-batch B = 32 is each method's control
    result, calls = recipe("inbatch_b32")  # adds a run at the default rate; the earlier ones are done
    assert result.returncode == 0, result.stderr
    assert len(_calls(calls, "recipes/train.py")) == 1
    args = _frontier_args(calls)
    pairs = _pairs(args)
    assert len(pairs) == len(set(pairs))
    assert "cache_b32_lr8e-5=inbatch_b32_lr8e-5" in pairs
    assert "cache_b16_lr8e-5=inbatch_b16_lr8e-5" in pairs
    assert "inbatch_b32_lr8e-5=inbatch_b32_lr8e-5" not in pairs


def test_a_mined_run_at_another_rate_mines_once_and_carries_the_mining_cost(recipe):
    result, calls = recipe("mined_b32_lr4e-5", SEEDS="42 43", BASELINE="mined_b32_lr4e-5")
    assert result.returncode == 0, result.stderr
    assert len(_calls(calls, "-m dualenc mine")) == 1  # the second seed reuses the round
    train = [c.split() for c in _calls(calls, "recipes/train.py")]
    assert len(train) == 2
    assert all("train_group_size=2" in t and t[-1] == "learning_rate=4e-5" for t in train)
    args = _frontier_args(calls)
    assert f"mined_b32_lr4e-5={recipe.out}/mined/mining_cpu.tsv" in args


def test_mined_negatives_with_the_cache_train_the_mined_groups_on_the_cache_config(recipe):
    methods = "inbatch_b32_lr8e-5 mined_b32_lr8e-5 cache_b32_lr8e-5 mined_cache_b32_lr8e-5"
    result, calls = recipe(methods, BASELINE="inbatch_b32_lr8e-5")
    assert result.returncode == 0, result.stderr
    assert len(_calls(calls, "-m dualenc mine")) == 1  # one round serves both mined methods
    both = _train_calls_by_run(calls)["mined_cache_b32_lr8e-5_s42"]
    assert "recipes/configs/scifact_cache.yaml" in both
    groups = f"train_file={recipe.out}/mined/train_groups.jsonl"
    assert {"train_format=groups", groups, "train_group_size=2", "qrels_file=null"} <= set(both)
    assert both[-1] == "learning_rate=8e-5"
    args = _frontier_args(calls)
    assert f"mined_cache_b32_lr8e-5={recipe.out}/mined/mining_cpu.tsv" in args  # the round counts here too
    pairs = _pairs(args)
    assert "mined_cache_b32_lr8e-5=mined_b32_lr8e-5" in pairs  # what the cache adds to mined negatives
    assert "mined_cache_b32_lr8e-5=cache_b32_lr8e-5" in pairs  # what mining adds to the cache


def test_mined_negatives_for_5_epochs_meet_the_5_epoch_cache(recipe):
    methods = "inbatch_b32_lr8e-5 cache_b32_5ep_lr8e-5 mined_b32_5ep_lr8e-5"
    result, calls = recipe(methods, BASELINE="inbatch_b32_lr8e-5")
    assert result.returncode == 0, result.stderr
    assert len(_calls(calls, "-m dualenc mine")) == 1
    mined = _train_calls_by_run(calls)["mined_b32_5ep_lr8e-5_s42"]
    assert "recipes/configs/scifact_inbatch.yaml" in mined
    groups = f"train_file={recipe.out}/mined/train_groups.jsonl"
    assert {"train_format=groups", groups, "train_group_size=2", "num_train_epochs=5"} <= set(mined)
    assert mined[-1] == "learning_rate=8e-5"
    args = _frontier_args(calls)
    assert f"mined_b32_5ep_lr8e-5={recipe.out}/mined/mining_cpu.tsv" in args
    assert "mined_b32_5ep_lr8e-5=cache_b32_5ep_lr8e-5" in _pairs(args)  # about the same CPU time


def _assert_cache_b16_run(calls, method: str, epochs: int) -> None:
    """METHOD's seed-42 run trains the cache's config at batch 16 for EPOCHS epochs at 8e-5."""
    run = _train_calls_by_run(calls)[f"{method}_s42"]
    assert "recipes/configs/scifact_cache.yaml" in run
    batch_16 = {"per_device_train_batch_size=16", "eval_steps=46", "save_steps=46"}
    assert batch_16 | {f"num_train_epochs={epochs}"} <= set(run)
    assert run[-1] == "learning_rate=8e-5"


def test_the_cache_at_batch_16_for_5_epochs_meets_both_5_epoch_runs_and_its_3_epoch_self(recipe):
    methods = (
        "inbatch_b32_lr8e-5 cache_b16_5ep_lr8e-5 cache_b32_5ep_lr8e-5 mined_b32_5ep_lr8e-5 cache_b16_lr8e-5"
    )
    result, calls = recipe(methods, BASELINE="inbatch_b32_lr8e-5")
    assert result.returncode == 0, result.stderr
    _assert_cache_b16_run(calls, "cache_b16_5ep_lr8e-5", epochs=5)
    pairs = _pairs(_frontier_args(calls))
    assert {
        "cache_b16_5ep_lr8e-5=cache_b32_5ep_lr8e-5",  # halving the batch at 5 epochs
        "cache_b16_5ep_lr8e-5=cache_b16_lr8e-5",  # 5 epochs against 3
        "cache_b16_5ep_lr8e-5=mined_b32_5ep_lr8e-5",  # against the best 5-epoch method
    } <= set(pairs)


def test_the_cache_at_batch_16_for_7_epochs_meets_its_5_epoch_self(recipe):
    result, calls = recipe(
        "inbatch_b32_lr8e-5 cache_b16_7ep_lr8e-5 cache_b16_5ep_lr8e-5", BASELINE="inbatch_b32_lr8e-5"
    )
    assert result.returncode == 0, result.stderr
    _assert_cache_b16_run(calls, "cache_b16_7ep_lr8e-5", epochs=7)
    assert "cache_b16_7ep_lr8e-5=cache_b16_5ep_lr8e-5" in _pairs(_frontier_args(calls))  # 7 epochs against 5


def test_a_finished_run_is_not_run_again(recipe):
    recipe("cache_b32_lr8e-5", BASELINE="cache_b32_lr8e-5")
    result, calls = recipe("cache_b32_lr8e-5", BASELINE="cache_b32_lr8e-5")
    assert result.returncode == 0, result.stderr
    assert not _calls(calls, "recipes/train.py") and not _calls(calls, "eval/beir_scifact.py")
    assert len(_calls(calls, "eval/frontier.py")) == 1


def test_without_a_baseline_run_the_runs_are_kept_and_the_table_is_left_to_frontier_py(recipe):
    result, calls = recipe("cache_b32_lr8e-5 mined_b32_lr8e-5", BASELINE="inbatch_b32_lr8e-5")
    assert result.returncode == 0, result.stderr  # hours of training are not reported as a failure
    assert sorted(_train_calls_by_run(calls)) == ["cache_b32_lr8e-5_s42", "mined_b32_lr8e-5_s42"]
    assert len(_calls(calls, "eval/beir_scifact.py")) == 3  # zero-shot and both runs are scored
    assert not _calls(calls, "eval/frontier.py")
    assert f"no scored run of BASELINE=inbatch_b32_lr8e-5 in {recipe.out}" in result.stderr
    assert "--baseline inbatch_b32_lr8e-5" in result.stderr
    result, calls = recipe("inbatch_b32_lr8e-5", BASELINE="inbatch_b32_lr8e-5")  # the baseline comes later
    assert result.returncode == 0, result.stderr
    assert "mined_b32_lr8e-5=cache_b32_lr8e-5" in _pairs(_frontier_args(calls))


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("cache_b32_lrfast", "method cache_b32_lrfast: learning rate 'fast' is not a positive number"),
        ("cache_b32_lr0", "learning rate '0' is not a positive number"),
        ("cache_b32_lr0.0e-3", "learning rate '0.0e-3' is not a positive number"),
        ("inbatch_b32_lr-1e-5", "learning rate '-1e-5' is not a positive number"),
        ("cache_b8", "unknown method: cache_b8"),
        ("nosuch_lr8e-5", "unknown method: nosuch_lr8e-5"),
    ],
)
def test_a_bad_method_stops_the_recipe_before_any_work(recipe, method, message):
    result, calls = recipe(f"inbatch_b32 {method}")  # the good name first: nothing of it may run either
    assert result.returncode == 2
    assert message in result.stderr
    assert calls == []
    assert not recipe.out.exists()
