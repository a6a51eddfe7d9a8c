"""Config loading: YAML + key=value overrides, validation, every recipe YAML."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dualenc.errors import InputError
from dualenc.io.config_file import build, help_field, positive
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


# ---------------------------------------------------------------- the one loader behind both trainers


@dataclasses.dataclass
class _Flat:
    flag: bool = help_field(False, "a switch")
    count: int = help_field(3, "how many")
    rate: float = help_field(0.5, "a fraction")
    name: str = help_field("x", "a name")
    limit: int | None = help_field(None, "null = no limit")

    def __post_init__(self) -> None:
        positive("count", self.count)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("flag", "true", True),
        ("flag", "No", False),
        ("flag", True, True),
        ("count", "7", 7),
        ("count", 7, 7),
        ("rate", "1e-3", 1e-3),
        ("rate", 2, 2.0),
        ("name", 17, "17"),
        ("limit", "null", None),
        ("limit", "~", None),
        ("limit", None, None),
        ("limit", "12", 12),
    ],
)
def test_values_take_the_field_type(key, value, expected):
    built = build(_Flat, {key: value})
    assert getattr(built, key) == expected and type(getattr(built, key)) is type(expected)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"flag": "maybe"}, "config key 'flag' expects bool, got 'maybe'"),
        ({"count": True}, "config key 'count' expects int, got True"),
        ({"count": "1.5"}, "config key 'count' expects int, got '1.5'"),
        ({"name": False}, "config key 'name' expects str, got False"),
        ({"count": 0}, "count=0 must be > 0"),
        ({"cuont": 1}, "unknown config key 'cuont' (did you mean 'count'?)"),
    ],
)
def test_bad_values_are_one_clear_error(values, message):
    with pytest.raises(InputError) as err:
        build(_Flat, values)
    assert message in str(err.value)


def test_both_trainers_read_values_the_same_way():
    """The training config and the SASRec config coerce the same strings to the same values."""
    from dualenc.recsys.config import load_sasrec_config

    dense = load_config(overrides=["random_init=true", "learn_temperature=yes", "temperature=5e-2"])
    sasrec = load_sasrec_config(overrides=["mix=yes", "learning_rate=5e-2", "n_buckets=null"])
    assert dense.loss.learn_temperature is True and sasrec.mix is True
    assert dense.loss.temperature == sasrec.learning_rate == 0.05
    assert sasrec.n_buckets is None
    for load in (lambda o: load_config(overrides=o), lambda o: load_sasrec_config(overrides=o)):
        with pytest.raises(InputError, match="is not key=value"):
            load(["no_equals_sign"])


@pytest.mark.parametrize(
    "tracker", ["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive"]
)
def test_every_accelerate_tracker_is_a_choice_and_a_missing_package_is_one_clear_error(tracker, monkeypatch):
    import importlib.util

    from dualenc.training import build

    cfg = load_config(overrides=["random_init=true", f"report_to={tracker}"])  # a valid choice
    module, package = build.TRACKER_PACKAGES[tracker]
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == module else real_find_spec(name, *a)
    )
    with pytest.raises(InputError, match=rf"report_to={tracker} needs the {package} package: pip install"):
        build.make_accelerator(cfg)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # installed
    build.check_tracker(cfg.train.report_to)


def test_an_unknown_tracker_lists_the_choices():
    with pytest.raises(InputError, match="report_to='neptune' is not one of none, tensorboard, wandb"):
        load_config(overrides=["random_init=true", "report_to=neptune"])


def test_a_learned_temperature_below_the_scale_cap_is_refused_before_training():
    """learn_temperature with τ < 1/MAX_SCALE would start at the clamp, where the scale gets no gradient."""
    with pytest.raises(InputError, match="learn_temperature=true needs temperature >= 0.01, got 0.005"):
        load_config(None, ["random_init=true", "learn_temperature=true", "temperature=0.005"])
    assert load_config(None, ["random_init=true", "temperature=0.005"]).loss.temperature == 0.005
