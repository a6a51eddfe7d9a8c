"""Training runs that cannot resume as asked are refused with one clear line before anything is loaded or
written: other settings, another process count, a damaged checkpoint, a second run in the same output_dir."""

from __future__ import annotations

import json
import signal
import time

import pytest
from helpers import REPO, last_logged_step, tiny_overrides, train_subprocess

from dualenc.errors import InputError
from dualenc.training import load_config, train
from dualenc.training.resume_check import MAY_CHANGE, check_same_processes, write_manifest

TINY = REPO / "recipes" / "configs" / "tiny.yaml"


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState, PartialState

    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()
    yield
    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()


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
