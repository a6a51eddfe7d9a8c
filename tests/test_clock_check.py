"""eval/clock_check.py: each clock's pooled dev-evaluation rate, the factor it implies beside the one given,
the methods run on several clocks, and bad input refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import load_script

from dualenc.training.cost_meter import PHASES


@pytest.fixture(scope="module")
def clock_check():
    return load_script("eval/clock_check.py")


def _run(root: Path, name: str, cpu_s: float, dev_cpu_s: float | None, dev_tokens: int = 1_000_000) -> Path:
    """A finished run of ``cpu_s`` CPU seconds whose dev evaluation took ``dev_cpu_s`` for ``dev_tokens``
    (None: no cost_by_phase, as another trainer's run)."""
    run = root / name
    run.mkdir(parents=True)
    summary: dict = {"steps": 10, "cpu_s": cpu_s}
    if dev_cpu_s is not None:
        zero = {"cpu_s": 0.0, "wall_s": 0.0, "grad_sequences": 0, "grad_tokens": 0}
        phases = {phase: zero | {"nograd_sequences": 0, "nograd_tokens": 0} for phase in PHASES}
        phases["dev_eval"] = zero | {"cpu_s": dev_cpu_s, "nograd_sequences": 10, "nograd_tokens": dev_tokens}
        phases["training"] = zero | {"cpu_s": cpu_s - dev_cpu_s, "nograd_sequences": 0, "nograd_tokens": 0}
        summary["cost_by_phase"] = phases
    (run / "train_summary.json").write_text(json.dumps(summary))
    return run


@pytest.fixture
def two_machines(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Machine A (factor 2 given): two runs whose dev evaluation costs 100 and 110 CPU-s per million tokens,
    each run's CPU time in step with it. Machine B, 1.5x slower than A's first run (factor 1 given, which is
    wrong), runs the same work, and a run without cost_by_phase."""
    a, a_calib, b = tmp_path / "a", tmp_path / "a_calib", tmp_path / "b"
    _run(a, "cache_s1", 1000.0, 100.0)
    _run(a_calib, "cache_s2", 1100.0, 110.0)
    _run(b, "cache_s1", 1500.0, 150.0)
    _run(b, "peer_s1", 700.0, None)
    return a, a_calib, b


def test_a_clock_pools_its_roots_and_implies_a_factor_from_the_anchor(
    clock_check, two_machines, tmp_path, capsys
):
    a, a_calib, b = two_machines
    out = tmp_path / "clock.json"
    result = clock_check.main(["--out", str(out), f"{a}=2", f"{a_calib}=2", f"{b}=1"])
    assert f"{b / 'peer_s1'}: no cost_by_phase" in capsys.readouterr().err
    first, second = result["clocks"]
    assert first["roots"] == [str(a), str(a_calib)] and len(first["runs"]) == 2
    assert first["pooled_rate"] == pytest.approx(105.0)  # (100 + 110) CPU-s over 2 M tokens
    assert result["reference_rate"] == pytest.approx(210.0)  # anchor: the first clock, 2 x 105
    assert first["implied_factor"] == pytest.approx(2.0) and first["difference"] == pytest.approx(0.0)
    assert first["rate_rel_std"] == pytest.approx((10 / 2**0.5) / 105)  # sample std of 100, 110 over the mean
    assert second["pooled_rate"] == pytest.approx(150.0) and second["rate_rel_std"] is None
    assert second["implied_factor"] == pytest.approx(1.4) and second["difference"] == pytest.approx(0.4)
    assert [run["implied_factor"] for run in first["runs"]] == pytest.approx([2.1, 210 / 110])
    (repeat,) = result["repeats"]  # the peer ran on one clock only
    assert repeat["name"] == "cache" and repeat["seeds"] == [1, 2, 1] and repeat["factors"] == [2.0, 2.0, 1.0]
    assert repeat["cpu_h_given"] == pytest.approx([2000 / 3600, 2200 / 3600, 1500 / 3600])
    assert repeat["cpu_h_implied"] == pytest.approx([2000 / 3600, 2200 / 3600, 2100 / 3600])
    assert repeat["cpu_h_own_probe"] == pytest.approx([2100 / 3600] * 3)  # work in step with the probe
    assert repeat["spread_own_probe"] == pytest.approx(0.0, abs=1e-12)
    assert repeat["spread_given"] == pytest.approx((2200 - 1500) / ((2000 + 2200 + 1500) / 3))
    saved = json.loads(out.read_text())
    assert saved["clocks"] == result["clocks"] and "factor implied" in saved["table"]
    assert "commit" in saved  # provenance


def test_every_method_is_told_on_both_clocks(clock_check, two_machines, tmp_path, capsys):
    """By hand: reference rate 210 (2 x 105). Clock A's runs, factor 2: 2000 and 2200 CPU-s given, own probes
    2.1 and 210/110 -> 2100 and 2100. Clock B's run, factor 1 (wrong): 1500 given, own probe 1.4 -> 2100."""
    a, a_calib, b = two_machines
    result = clock_check.main(["--out", str(tmp_path / "c.json"), f"{a}=2", f"{a_calib}=2", f"{b}=1"])
    (cache,) = result["methods"]  # the peer recorded no probe
    assert cache["name"] == "cache" and cache["runs"] == 3 and cache["seeds"] == [1, 2, 1]
    assert cache["cpu_h_given"] == pytest.approx((2000 + 2200 + 1500) / 3 / 3600)
    assert cache["cpu_h_own_probe"] == pytest.approx(2100 / 3600)
    assert cache["difference"] == pytest.approx(2100 / ((2000 + 2200 + 1500) / 3) - 1)  # +10.5%
    out = capsys.readouterr().out
    assert "CPU h by own probes" in out and "+10.5" in out


def test_the_anchor_picks_the_clock_that_sets_the_reference(clock_check, two_machines, tmp_path):
    a, a_calib, b = two_machines
    result = clock_check.main(
        ["--out", str(tmp_path / "c.json"), "--anchor", "1", f"{a}=2", f"{a_calib}=2", f"{b}=1"]
    )
    assert result["reference_rate"] == pytest.approx(150.0)
    assert result["clocks"][0]["implied_factor"] == pytest.approx(150 / 105)


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (["{a}=0"], "expected ROOT=FACTOR with a positive FACTOR, or a JSON of eval/clock_check.py, got"),
        (["{a}=fast"], "expected ROOT=FACTOR with a positive FACTOR"),
        (["{a}"], "expected ROOT=FACTOR"),
        (["{tmp}/missing.json"], "or a JSON of eval/clock_check.py, got"),
        (["{a}=2", "{a}/../a=3"], "a/cache_s1: this run is given twice"),
        (["{a}=2", "{a}=3"], "is given twice"),
        (["{tmp}/missing=2"], "missing: not a directory of <name>_s<seed> runs"),
        (["{a}=2", "--anchor", "3"], "--anchor 3 is not one of the FACTORs given [2.0]"),
        (["{empty}=2"], "empty: no finished <name>_s<seed> training run here"),
        (["{peer}=2"], "peer_only: no finished run recorded cost_by_phase"),
        (["{zero}=2"], "x_s1: cost_by_phase records no dev_eval tokens"),
    ],
)
def test_bad_input_is_one_clear_error_and_writes_nothing(
    clock_check, two_machines, tmp_path, capsys, specs, message
):
    a = two_machines[0]
    (tmp_path / "empty").mkdir()
    _run(tmp_path / "peer_only", "peer_s1", 10.0, None)
    _run(tmp_path / "zero", "x_s1", 10.0, 1.0, dev_tokens=0)
    where = {"a": a, "tmp": tmp_path, "empty": tmp_path / "empty", "peer": tmp_path / "peer_only"}
    args = [s.format(**where, zero=tmp_path / "zero") for s in specs]
    out = tmp_path / "clock.json"
    with pytest.raises(SystemExit) as exit_info:
        clock_check.main(["--out", str(out), *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def _report(result: dict) -> dict:
    """What a clock check found, without its provenance (commit, machine, versions)."""
    return {key: result[key] for key in ("anchor", "reference_rate", "clocks", "repeats", "methods", "table")}


def test_its_own_json_rebuilds_it_and_new_roots_join_it(clock_check, two_machines, tmp_path):
    """A clock check outlives its run folders: its JSON alone gives the same report, and the JSON of machine A
    plus machine B's root gives the report of all three roots."""
    a, a_calib, b = two_machines
    every = clock_check.main(["--out", str(tmp_path / "every.json"), f"{a}=2", f"{a_calib}=2", f"{b}=1"])
    rebuilt = clock_check.main(["--out", str(tmp_path / "rebuilt.json"), str(tmp_path / "every.json")])
    assert _report(rebuilt) == _report(every)
    clock_check.main(["--out", str(tmp_path / "a.json"), f"{a}=2", f"{a_calib}=2"])
    joined = clock_check.main(["--out", str(tmp_path / "joined.json"), str(tmp_path / "a.json"), f"{b}=1"])
    assert _report(joined) == _report(every)
    assert joined["clocks"][1]["implied_factor"] == pytest.approx(1.4)  # 210 / 150, as by hand above


def test_a_json_keeps_its_anchor_and_shares_a_clock_with_a_root_of_the_same_factor(
    clock_check, two_machines, tmp_path
):
    a, a_calib, b = two_machines
    clock_check.main(["--out", str(tmp_path / "b.json"), "--anchor", "1", f"{b}=1", f"{a}=2"])
    result = clock_check.main(["--out", str(tmp_path / "c.json"), str(tmp_path / "b.json"), f"{a_calib}=2"])
    assert result["anchor"] == 1 and result["reference_rate"] == pytest.approx(150.0)  # B's rate x 1
    clock_a = result["clocks"][1]
    assert clock_a["roots"] == [str(a), str(a_calib)] and clock_a["pooled_rate"] == pytest.approx(105.0)
    assert clock_a["implied_factor"] == pytest.approx(150 / 105)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "not a JSON of eval/clock_check.py"),
        ('{"runs": []}', "not a JSON of eval/clock_check.py"),  # a frontier JSON, say
        ('{"anchor": 2, "clocks": []}', "a JSON of eval/clock_check.py with no clock"),
        ("ZERO_TOKENS", "not a JSON of eval/clock_check.py"),
        ("AGAIN", "is given twice (measured in"),
    ],
)
def test_a_bad_json_is_one_clear_error_and_writes_nothing(
    clock_check, two_machines, tmp_path, capsys, content, message
):
    a, a_calib, _ = two_machines
    clock_check.main(["--out", str(tmp_path / "a.json"), f"{a}=2"])
    report = json.loads((tmp_path / "a.json").read_text())
    args = [str(tmp_path / "bad.json")]
    if content == "ZERO_TOKENS":
        report["clocks"][0]["runs"][0]["probe_tokens"] = 0
        content = json.dumps(report)
    elif content == "AGAIN":
        content, args = json.dumps(report), [f"{a}=2", str(tmp_path / "bad.json")]
    (tmp_path / "bad.json").write_text(content)
    capsys.readouterr()
    out = tmp_path / "clock.json"
    with pytest.raises(SystemExit) as exit_info:
        clock_check.main(["--out", str(out), *args, f"{a_calib}=2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err, err
    assert not out.exists()
