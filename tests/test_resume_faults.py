"""Training runs that cannot resume as asked are refused with one clear line before anything is loaded or
written: other settings, another process count, a damaged checkpoint, a second run in the same output_dir."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from helpers import REPO, last_logged_step, tiny_overrides, train_subprocess

from dualenc.errors import InputError
from dualenc.training import load_config, train
from dualenc.training.config import config_to_dict
from dualenc.training.resume_check import (
    MAY_CHANGE,
    check_same_processes,
    check_same_settings,
    write_manifest,
)

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # each test builds its own Accelerator

TINY = REPO / "recipes" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 6-step run with checkpoints at steps 3 and 6, and the overrides that made it."""
    tmp = tmp_path_factory.mktemp("run")
    overrides = tiny_overrides(tmp, max_steps=6, save_steps=3, save_total_limit=0, dev_corpus_file=None)
    train(load_config(TINY, overrides))
    return tmp / "run", overrides


def _resume(overrides: list[str], *extra: str):
    return train(load_config(TINY, [*overrides, "resume_from=latest", *extra]))


def _snapshot(run) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("change", "listed"),
    [
        ("random_hidden_size=64", "model.random_hidden_size: checkpoint 32, now 64"),  # other shapes
        ("learning_rate=0.01", "train.learning_rate: checkpoint 0.001, now 0.01"),
        ("loss=cache", "loss.loss: checkpoint 'inbatch', now 'cache'"),
        ("max_steps=12", "train.max_steps: checkpoint 6, now 12"),
        ("batch_sampling=no_duplicates", "data.batch_sampling: checkpoint 'random', now 'no_duplicates'"),
    ],
)
def test_resuming_with_other_settings_is_refused(finished_run, change, listed):
    run, overrides = finished_run
    before = _snapshot(run)
    with pytest.raises(InputError) as err:
        _resume(overrides, change)
    assert listed in str(err.value) and "cannot resume" in str(err.value)
    assert _snapshot(run) == before  # nothing written


def test_settings_that_may_change_resume(finished_run):
    run, overrides = finished_run
    assert {"train.logging_steps", "train.resume_from"} <= MAY_CHANGE
    result = _resume(overrides, "logging_steps=2", "save_total_limit=1")
    assert result.step == 6  # already finished: the resumed run ends at once


def test_a_setting_added_since_the_checkpoint_counts_at_its_default(finished_run, tmp_path):
    """A checkpoint saved before a setting existed (its config.yaml lacks the key) resumes at the setting's
    default and is refused at any other value."""
    run, overrides = finished_run
    saved = yaml.safe_load((run / "checkpoints" / "step_00000006" / "config.yaml").read_text())
    assert saved["data"].pop("batch_sampling") == "random"
    old = tmp_path / "old_checkpoint"
    old.mkdir()
    (old / "config.yaml").write_text(yaml.safe_dump(saved))
    check_same_settings(old, config_to_dict(load_config(TINY, overrides)))  # the default: no error
    with pytest.raises(InputError, match="data.batch_sampling: checkpoint 'random', now 'no_duplicates'"):
        check_same_settings(
            old, config_to_dict(load_config(TINY, [*overrides, "batch_sampling=no_duplicates"]))
        )


def test_resuming_on_another_process_count_is_refused(finished_run, tmp_path):
    run, overrides = finished_run
    state = json.loads((run / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["num_processes"] == 1  # recorded by the run
    with pytest.raises(InputError, match=r"saved by 2 process\(es\); this run has 1: resume with 2"):
        check_same_processes(run, {**state, "num_processes": 2}, 1)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "checkpoints").mkdir()
    source = run / "checkpoints" / "step_00000006"
    target = copy / "checkpoints" / "step_00000006"
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    (target / "trainer_state.json").write_text(json.dumps({**state, "num_processes": 2}))
    write_manifest(target)  # as a 2-process run would have saved it
    with pytest.raises(InputError, match=r"saved by 2 process\(es\); this run has 1"):
        _resume(overrides, f"output_dir={copy}")


@pytest.mark.parametrize(
    "victim", ["model.safetensors", "optimizer.bin", "random_states_0.pkl", "trainer_state.json"]
)
def test_a_damaged_checkpoint_is_refused(finished_run, tmp_path, victim):
    run, overrides = finished_run
    copy = tmp_path / "copy"
    target = copy / "checkpoints" / "step_00000003"
    target.mkdir(parents=True)
    for path in (run / "checkpoints" / "step_00000003").iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    damaged = target / victim
    assert damaged.exists(), sorted(p.name for p in target.iterdir())
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # truncated
    with pytest.raises(InputError, match=r"checkpoint .*step_00000003 is damaged and cannot be loaded"):
        _resume(overrides, f"output_dir={copy}")
    assert not (copy / "final_model").exists()


def test_a_second_run_in_the_same_output_dir_is_refused(tmp_path):
    overrides = tiny_overrides(tmp_path, max_steps=200, dev_corpus_file=None)
    first = train_subprocess(tmp_path, True, overrides)  # slowed: still running when the second starts
    try:
        deadline = time.time() + 300
        while last_logged_step(tmp_path / "run") < 1:
            assert first.poll() is None and time.time() < deadline, "the first run ended too soon"
            time.sleep(0.05)
        with pytest.raises(InputError, match=rf"output directory .*run is in use by pid {first.pid}"):
            train(load_config(TINY, overrides))
        assert first.poll() is None  # refused while the first was really running
    finally:
        first.send_signal(signal.SIGKILL)
        assert first.wait(timeout=60) == -signal.SIGKILL


# ---------------------------------------------------------------- kill -9 at other points of a run

SLOWED_SCRIPT = """
import sys, time
import dualenc.retrieval.encode_to_disk as encode_to_disk
import dualenc.training.checkpoint as checkpoint
from dualenc.training import load_config, train

point = sys.argv[1]
if point == "fill":  # every batch of the cache fill's encode
    encode_texts = encode_to_disk.encode_texts
    def slow_encode(*args, **kwargs):
        time.sleep(5.0)
        return encode_texts(*args, **kwargs)
    encode_to_disk.encode_texts = slow_encode
if point == "checkpoint":  # inside save_checkpoint: state files written, manifest and rename not yet
    write_manifest = checkpoint.write_manifest
    def slow_manifest(folder, *args, **kwargs):
        if str(folder).endswith("step_00000008"):  # the last checkpoint only
            time.sleep(60.0)
        return write_manifest(folder, *args, **kwargs)
    checkpoint.write_manifest = slow_manifest
train(load_config(sys.argv[2], sys.argv[3:]))
"""


def _run_slowed(tmp_path, point: str, overrides: list[str]) -> subprocess.Popen:
    script = tmp_path / "slowed_train.py"
    script.write_text(SLOWED_SCRIPT)
    return subprocess.Popen(
        [sys.executable, str(script), point, str(TINY), *overrides],
        env={**os.environ, "PYTHONHASHSEED": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _weights(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("point", ["fill", "checkpoint"])
def test_kill_9_in_the_cache_fill_or_a_checkpoint_write_then_resume_is_exact(tmp_path, point):
    common = {
        "loss": "cache",
        "max_steps": 8,
        "save_steps": 4,
        "save_total_limit": 0,
        "dev_corpus_file": None,
    }
    base = tiny_overrides(tmp_path, **common)
    reference = tmp_path / "reference"
    train(load_config(TINY, [*base, f"output_dir={reference}"]))
    killed = tmp_path / "killed"
    victim = _run_slowed(tmp_path, point, [*base, f"output_dir={killed}"])
    deadline = time.time() + 300

    def reached() -> bool:
        if point == "fill":  # the fill has started writing its shard
            return any(p.is_file() for p in (killed / "cache_fill").rglob("*"))
        tmp = killed / "checkpoints" / ".tmp-step_00000008"
        return (tmp / "config.yaml").exists()  # the last state file before the manifest

    while not reached():
        assert victim.poll() is None and time.time() < deadline, f"the run ended before reaching {point}"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL
    assert not (killed / "final_model").exists()  # killed before the end
    if point == "checkpoint":
        assert not (killed / "checkpoints" / "step_00000008").exists()  # the half checkpoint is not one
    train(load_config(TINY, [*base, f"output_dir={killed}", "resume_from=latest"]))
    ref, got = _weights(reference / "final_model"), _weights(killed / "final_model")
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(ref[name], got[name]), name


def test_a_run_killed_before_its_first_checkpoint_starts_over_with_a_clean_log(tmp_path):
    """kill -9 after logged steps but before any checkpoint; resume_from=latest starts from step 0 and the log
    holds each step once, the same losses as an uninterrupted run (not the killed run's lines, then again)."""
    from helpers import read_log

    base = tiny_overrides(tmp_path, max_steps=6, dev_corpus_file=None)
    reference = tmp_path / "reference"
    train(load_config(TINY, [*base, f"output_dir={reference}"]))
    killed = tmp_path / "killed"
    victim = train_subprocess(tmp_path, True, [*base, f"output_dir={killed}"])
    deadline = time.time() + 300
    while last_logged_step(killed) < 2:
        assert victim.poll() is None and time.time() < deadline, "the run ended before logging 2 steps"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL
    assert not (killed / "checkpoints").exists() or not any((killed / "checkpoints").iterdir())
    assert not (killed / "final_model").exists()
    train(load_config(TINY, [*base, f"output_dir={killed}", "resume_from=latest"]))
    want, got = read_log(reference), read_log(killed)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 7))
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], abs=1e-6)


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    overrides = tiny_overrides(tmp_path, max_steps=2, dev_corpus_file=None)
    with pytest.raises(InputError, match="afile: is a file, not a directory"):
        train(load_config(TINY, [*overrides, f"output_dir={tmp_path / 'afile'}"]))
    assert (tmp_path / "afile").read_text() == "x"
