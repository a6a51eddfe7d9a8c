"""Config loading: YAML + key=value overrides, validation, every recipe YAML."""

from __future__ import annotations

from pathlib import Path

import pytest

from dualenc.errors import InputError
from dualenc.training.config import SECTIONS, load_config, save_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "recipes" / "configs").glob("*.yaml"))


def test_overrides_bare_and_dotted(tmp_path):
    cfg = load_config(
        None,
        [
            "random_init=true",
            "output_dir=runs/x",
            "train.learning_rate=3e-4",
            "normalize=false",
            "query_max_len=null",
            "temperature=0.02",
        ],
    )
    assert cfg.train.output_dir == "runs/x" and cfg.train.learning_rate == 3e-4
    assert cfg.model.normalize is False and cfg.model.query_max_len is None and cfg.loss.temperature == 0.02


def test_round_trip(tmp_path):
    cfg = load_config(None, ["random_init=true", "seed=7", "train_group_size=4"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["random_init=true", "lerning_rate=1e-4"],
            "unknown config key 'lerning_rate' (did you mean 'learning_rate'?)",
        ),
        (["random_init=true", "train.pooling=cls"], "unknown config key 'train.pooling'"),
        (["random_init=true", "nosection.x=1"], "unknown config section 'nosection'"),
        (["random_init=true", "learning_rate=fast"], "'train.learning_rate' expects float, got 'fast'"),
        (["random_init=true", "normalize=maybe"], "expects bool"),
        (["random_init=true", "pooling=max"], "pooling='max' is not one of cls, mean"),
        (["random_init=true", "train_group_size=0"], "train_group_size=0 must be > 0"),
        (["random_init=true", "loss=nope"], "loss='nope'"),
        ([], "set model_name_or_path (or random_init=true)"),
        (["random_init=true", "output_dir"], "is not key=value"),
    ],
)
def test_bad_overrides(overrides, message):
    with pytest.raises(InputError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(InputError) as err:
        load_config(None, ["random_init=true", "batch_size=8"])
    assert "per_device_train_batch_size" in str(err.value) and "valid keys" in str(err.value)


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  random_init: true\n  pooling: [cls\n")
    with pytest.raises(InputError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(bad)
    bad.write_text("model:\n  random_init: true\n  poolling: cls\n")
    with pytest.raises(InputError, match="unknown config key 'model.poolling'"):
        load_config(bad)
    bad.write_text("modle:\n  random_init: true\n")
    with pytest.raises(InputError, match="unknown config section 'modle'"):
        load_config(bad)
    with pytest.raises(InputError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_keys_are_unique_across_sections():
    import dataclasses

    names = [f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names))


def test_every_field_has_help():
    import dataclasses

    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_recipe_yaml_loads_and_states_its_command(path):
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(f"recipes/configs/{path.name}" in line and "recipes/train.py" in line for line in header), (
        f"{path.name} must open with its launch command"
    )
    assert any("Expected" in line or "expected" in line for line in header), (
        f"{path.name}: state expected time/metric"
    )
    load_config(path)


def test_there_are_recipes():
    assert {"tiny.yaml"} <= {p.name for p in CONFIGS}
