"""SASRec recipe (dualenc/recsys, recipes/sasrec.py): readers, split, metrics, model, smoke runs, YAMLs."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import ir_measures
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import REPO
from torch import nn

from dualenc.errors import InputError
from dualenc.recsys.config import load_sasrec_config
from dualenc.recsys.data import (
    Interactions,
    filter_interactions,
    left_pad,
    read_interactions,
    recbole_example_path,
    temporal_split,
    training_batch,
)
from dualenc.recsys.evaluate import evaluate, exclude_seen, ranking_metrics
from dualenc.recsys.sasrec import SASRec

CONFIGS = sorted((REPO / "recipes" / "configs" / "sasrec").glob("*.yaml"))
HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def load_recipe(real_provenance: bool = False):
    """recipes/sasrec.py as a module; provenance lookup (git, package versions: ~3 s) stubbed unless asked."""
    spec = importlib.util.spec_from_file_location("sasrec_recipe", REPO / "recipes" / "sasrec.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not real_provenance:
        module.environment_info = lambda path: {"commit": "test", "machine": {}}
    return module


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- readers


def test_read_atomic_inter(tmp_path):
    path = write(tmp_path, "x.inter", HEADER + "u1\t007\t3\t10\n\nu2\ti9\t5\t9.5\n")
    inter = read_interactions(path)
    assert inter.users.tolist() == ["u1", "u2"] and inter.items.tolist() == ["007", "i9"]
    assert inter.timestamps.tolist() == [10.0, 9.5]


@pytest.mark.parametrize(
    "name, text",
    [
        ("a.csv", 'user,item,timestamp,rating\nu1,i1,5,1\nu2,"i,2",6,1\n'),
        ("a.tsv", "userid\titemid\ttimestamp\nu1\ti1\t5\nu2\ti,2\t6\n"),
        ("a.txt", "Timestamp;User_ID;Item_ID\n5;u1;i1\n6;u2;i,2\n"),
    ],
)
def test_read_csv_variants(tmp_path, name, text):
    inter = read_interactions(write(tmp_path, name, text))
    assert inter.users.tolist() == ["u1", "u2"] and inter.items.tolist() == ["i1", "i,2"]
    assert inter.timestamps.tolist() == [5.0, 6.0]


def test_read_csv_given_delimiter(tmp_path):
    inter = read_interactions(write(tmp_path, "a.csv", "user|item|timestamp\nu|i|1\n"), delimiter="|")
    assert inter.items.tolist() == ["i"]


@pytest.mark.parametrize(
    "name, text, where, problem",
    [
        ("e.inter", "", ":1:", "empty file"),
        ("e.inter", HEADER, ":1:", "no interactions"),
        ("e.inter", HEADER + "u1\ti1\t3\t10\nu2\ti2\t3\n", ":3:", "expected 4 columns, got 3"),
        ("e.inter", HEADER + "u1\ti1\t3\tyesterday\n", ":2:", "timestamp 'yesterday' is not a finite number"),
        ("e.inter", HEADER + "\nu1\ti1\t3\tnan\n", ":3:", "timestamp 'nan' is not a finite number"),
        (
            "e.inter",
            "user_id:token\titem_id:token\trating:float\n",
            ":1:",
            "missing required column 'timestamp'",
        ),
        ("e.inter", "user_id\titem_id\ttimestamp\n", ":1:", "header field 'user_id' has no ':type'"),
        ("e.csv", "user,item,time\nu,i,1\n", ":1:", "missing required column 'timestamp'"),
        ("e.csv", "user,item,timestamp\nu,,1\n", ":2:", "empty item id"),
        ("e.csv", "\n\nuser,item,timestamp\nu,i,1,2\n", ":4:", "expected 3 columns, got 4"),
    ],
)
def test_reader_errors(tmp_path, name, text, where, problem):
    path = write(tmp_path, name, text)
    with pytest.raises(InputError) as err:
        read_interactions(path)
    assert f"{path}{where} " in str(err.value) and problem in str(err.value)


def test_reader_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_interactions(tmp_path / "none.inter")


def test_movielens_100k_from_the_recbole_wheel():
    if importlib.util.find_spec("recbole") is None:
        pytest.skip("recbole wheel not installed")
    inter = read_interactions(recbole_example_path("ml-100k"))
    assert len(inter.users) == 100_000 and len(set(inter.users)) == 943 and len(set(inter.items)) == 1682


# ---------------------------------------------------------------- filtering, split, batches


def make(rows: list[tuple[str, str, float]]) -> Interactions:
    users, items, times = zip(*rows, strict=True)
    return Interactions(np.asarray(users), np.asarray(items), np.asarray(times, dtype=np.float64))


def test_filter_counts_distinct_users_then_distinct_items():
    # z has 1 user (dropped), x and y 2 (kept); then b (x twice) and c (y) have 1 distinct item: dropped.
    rows = [("a", "x", 1), ("a", "y", 2), ("b", "x", 3), ("b", "x", 4), ("c", "y", 5), ("c", "z", 6)]
    out = filter_interactions(make(rows), min_item_count=2, min_user_count=2)
    assert out.users.tolist() == ["a", "a"] and out.items.tolist() == ["x", "y"]


SPLIT_ROWS = [  # 20 distinct timestamps; quantile 0.7 (nearest) = sorted[round(0.7 * 19) = 13] = 14
    ("c", "i1", 3),
    ("c", "i2", 14),
    ("c", "i3", 16),
    ("c", "i4", 18),
    ("c", "i9", 20),  # i9: not in training
    ("d", "i1", 15),
    ("d", "i5", 17),  # test user with 2 late interactions: dropped
    ("e", "i2", 19),
    ("a", "i1", 1),
    ("a", "i2", 2),
    ("a", "i3", 4),
    ("a", "i1", 5),
    ("a", "i4", 6),
    ("a", "i5", 7),
    ("b", "i6", 9),
    ("b", "i5", 8),
    ("b", "i10", 10),
    ("b", "i4", 11),
    ("b", "i3", 12),
    ("b", "i1", 13),
]


def test_temporal_split_by_hand():
    inter = make(SPLIT_ROWS)
    split = temporal_split(inter, quantile=0.7)
    assert split.time_point == 14.0
    assert split.time_point == pd.Series(inter.timestamps).quantile(0.7, interpolation="nearest")  # official
    assert split.item_ids == ["i1", "i10", "i2", "i3", "i4", "i5", "i6"]  # training items only, sorted
    k = {item: n + 1 for n, item in enumerate(split.item_ids)}
    assert split.train_users == ["a", "b"]
    assert [s.tolist() for s in split.train] == [
        [k["i1"], k["i2"], k["i3"], k["i1"], k["i4"], k["i5"]],
        [k["i5"], k["i6"], k["i10"], k["i4"], k["i3"], k["i1"]],  # time order, not file order
    ]
    # c, d, e are test users; only c has >= 3 late interactions with known items (i9 is dropped, i1 is early)
    assert split.test_users == ["c"]
    assert [s.tolist() for s in split.valid_inputs] == [[k["i2"]]] and split.valid_targets.tolist() == [
        k["i3"]
    ]
    assert [s.tolist() for s in split.test_inputs] == [
        [k["i2"], k["i3"]]
    ] and split.test_targets.tolist() == [k["i4"]]


def test_split_ties_keep_file_order():
    rows = [("a", "x", 1), ("a", "z", 2), ("a", "y", 2), ("b", "x", 1), ("b", "y", 1)] + [("t", "x", 9)]
    split = temporal_split(make(rows), quantile=0.95)  # sorted[round(4.75)] = 9: only t is a test user
    k = {item: n + 1 for n, item in enumerate(split.item_ids)}
    assert split.train[0].tolist() == [k["x"], k["z"], k["y"]] and split.train[1].tolist() == [k["x"], k["y"]]


def test_training_batch_and_left_pad():
    inputs, targets, history = training_batch([np.array([1, 2, 3, 4]), np.array([5, 6])], maxlen=3)
    assert inputs.tolist() == [[1, 2, 3], [0, 0, 5]] and targets.tolist() == [[2, 3, 4], [0, 0, 6]]
    assert history.tolist() == [[1, 2, 3, 4], [5, 6, -1, -1]]
    inputs, targets, _ = training_batch([np.array([1, 2, 3, 4])], maxlen=2)  # the most recent items win
    assert inputs.tolist() == [[2, 3]] and targets.tolist() == [[3, 4]]
    assert left_pad([np.array([], dtype=np.int64)], 2).tolist() == [[0, 0]]


# ---------------------------------------------------------------- metrics


def test_ranking_metrics_by_hand_and_ir_measures():
    top = np.array([[1, 2], [3, 4], [2, 5]])
    targets = np.array([2, 9, 2])  # ranks 2, miss, 1
    got = ranking_metrics(top, targets, num_items=10, ks=(1, 2))
    assert got["NDCG@2"] == pytest.approx((1 / math.log2(3) + 1.0) / 3)
    assert got["HR@2"] == pytest.approx(2 / 3) and got["COV@2"] == pytest.approx(5 / 10)
    assert got["NDCG@1"] == pytest.approx(1 / 3) and got["HR@1"] == pytest.approx(1 / 3)
    assert got["COV@1"] == pytest.approx(3 / 10)
    qrels = [ir_measures.Qrel(str(u), str(t), 1) for u, t in enumerate(targets)]
    run = [
        ir_measures.ScoredDoc(str(u), str(item), 10.0 - r)
        for u, row in enumerate(top)
        for r, item in enumerate(row)
    ]
    ref = ir_measures.calc_aggregate([ir_measures.nDCG @ 2, ir_measures.R @ 2], qrels, run)
    assert got["NDCG@2"] == pytest.approx(ref[ir_measures.nDCG @ 2])
    assert got["HR@2"] == pytest.approx(ref[ir_measures.R @ 2])  # one relevant item: HR = recall


class FixedScores(nn.Module):
    """Stands in for SASRec: the same scores for every history."""

    def __init__(self, scores: list[float]):
        super().__init__()
        self.maxlen = 4
        self.item_table = nn.Parameter(torch.zeros(len(scores), 1))
        self.scores = torch.tensor(scores)

    def score_last(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.scores.expand(inputs.shape[0], -1).clone()


def test_seen_items_and_pad_are_never_recommended():
    scores = torch.tensor([[9.0, 1.0, 5.0, 4.0, 3.0], [9.0, 1.0, 5.0, 4.0, 3.0]])
    out = exclude_seen(scores, [np.array([2, 4]), np.array([], dtype=np.int64)])
    assert torch.topk(out, 2).indices.tolist() == [[3, 1], [2, 3]]
    model = FixedScores([9.0, 1.0, 5.0, 4.0, 3.0])  # pad (0) scores highest; then items 2, 3, 4, 1
    inputs = [np.array([2]), np.array([1, 3])]
    got = evaluate(model, inputs, np.array([2, 2]), num_items=4, ks=(1,))
    # user 0 has seen its target 2 (cannot be hit, top-1 is 3); user 1's top-1 is 2 = target
    assert got == {"NDCG@1": 0.5, "HR@1": 0.5, "COV@1": 0.5}


# ---------------------------------------------------------------- model


def tiny_model(seed: int = 0) -> SASRec:
    return SASRec(
        num_items=20,
        maxlen=8,
        hidden=16,
        num_blocks=2,
        num_heads=2,
        dropout=0.2,
        generator=torch.Generator().manual_seed(seed),
    )


def test_causality():
    model = tiny_model().eval()
    x = torch.tensor([[0, 0, 3, 5, 7, 2, 9, 4], [1, 2, 3, 4, 5, 6, 7, 8]])
    y = x.clone()
    y[:, 5:] = torch.tensor([11, 12, 13])
    hx, hy = model(x), model(y)  # (2, 8, 16)
    torch.testing.assert_close(hx[:, :5], hy[:, :5])
    assert (hx[:, 5:] - hy[:, 5:]).abs().amax() > 1e-3  # the later positions do see the change


def test_tied_weights_and_init():
    model = tiny_model()
    assert model.item_table is model.item_emb.weight and model.item_table.shape == (21, 16)
    assert torch.count_nonzero(model.item_table[0]) == 0  # pad row
    bound = math.sqrt(6 / (21 + 16))  # xavier_uniform on the (21, 16) table
    assert model.item_table.abs().max() <= bound
    x = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 2]])
    model.eval()
    torch.testing.assert_close(model.score_last(x), model(x)[:, -1] @ model.item_emb.weight.T)
    model.score_last(x)[0, 17].backward()  # item 17 is not in the input: its row gets gradient only as output
    assert model.item_emb.weight.grad[17].abs().sum() > 0
    torch.testing.assert_close(tiny_model(0).item_table, model.item_table.detach())  # seeded init
    assert not torch.equal(tiny_model(1).item_table, model.item_table)


# ---------------------------------------------------------------- config and recipe


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_recipe_yaml_loads_and_states_its_command(path):
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(
        f"recipes/configs/sasrec/{path.name}" in line and "recipes/sasrec.py" in line for line in header
    )
    assert any("(not recipes/train.py: this recipe has its own script)" in line for line in header)
    assert any("expected" in line.lower() for line in header)
    cfg = load_sasrec_config(path)
    assert path.stem == f"sasrec_{cfg.loss}"


def test_there_is_a_yaml_per_loss():
    assert {p.stem for p in CONFIGS} == {
        f"sasrec_{loss}" for loss in ("ce", "sce", "bce", "gbce", "ce_minus")
    }


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["lerning_rate=1e-3"],
            "unknown config key 'lerning_rate' (did you mean 'learning_rate'?); valid keys: ",
        ),
        (["loss=softmax"], "loss='softmax' is not one of ce, sce, bce, gbce, ce_minus"),
        (["maxlen=ten"], "'maxlen' expects int, got 'ten'"),
        (["mix=perhaps"], "'mix' expects bool"),
        (["batch_size=0"], "batch_size=0 must be >= 1"),
        (["hidden=64", "num_heads=3"], "divisible"),
        (["maxlen"], "is not key=value"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(InputError) as err:
        load_sasrec_config(None, overrides)
    assert message in str(err.value)


def test_config_overrides_typed():
    cfg = load_sasrec_config(None, ["n_buckets=null", "bucket_size_x=12", "learning_rate=1e-2", "mix=true"])
    assert cfg.n_buckets is None and cfg.bucket_size_x == 12 and cfg.learning_rate == 0.01 and cfg.mix is True


def synthetic_inter(tmp_path: Path) -> Path:
    """24 users walking a cycle of 20 items (next item = item + 1), 12 steps each; users 18-23 take their last
    4 steps late, so with quantile 0.92 (sorted[round(0.92 * 287)] = the first late stamp) they are the test
    users."""
    lines, stamp = [HEADER], 0
    for user in range(24):
        start = user % 20
        late = user >= 18
        for step in range(12):
            stamp += 1
            when = 10_000 + stamp if late and step >= 8 else stamp
            lines.append(f"u{user}\tm{(start + step) % 20}\t1\t{when}\n")
    return write(tmp_path, "cycle.inter", "".join(lines))


@pytest.mark.parametrize("loss", ["ce", "sce", "bce", "gbce", "ce_minus"])
def test_smoke_run_every_loss(tmp_path, loss):
    out = tmp_path / f"{loss}.json"
    result = load_recipe().main(
        [
            "--config",
            str(REPO / "recipes" / "configs" / "sasrec" / f"sasrec_{loss}.yaml"),
            "--seeds",
            "3",
            "4",
            f"data_path={synthetic_inter(tmp_path)}",
            "min_item_count=0",
            "min_user_count=0",
            "test_quantile=0.92",
            "maxlen=8",
            "hidden=16",
            "batch_size=6",
            "max_epochs=2",
            "num_negatives=4",
            "bucket_size_y=4",
            "learning_rate=1e-2",
            "num_threads=null",
            f"output_json={out}",
        ]
    )
    saved = json.loads(out.read_text())
    assert saved["name"] == loss and saved["seeds"] == [3, 4] and saved["dataset"]["test_users"] == 6
    assert {"config", "commit", "machine", "memory_method", "mean", "std", "per_seed"} <= saved.keys()
    assert set(saved["mean"]) == {
        "test_NDCG@10",
        "test_HR@10",
        "test_COV@10",
        "train_s",
        "epochs",
        "peak_rss_mib",
    }
    for run in saved["per_seed"]:
        assert {
            "seed",
            "epochs",
            "best_epoch",
            "valid",
            "test",
            "peak_rss_mib",
            "train_s",
            "history",
        } <= run.keys()
        assert set(run["test"]) == {"NDCG@10", "HR@10", "COV@10"} and 0 <= run["test"]["HR@10"] <= 1
        assert run["epochs"] == 2 and run["history"][-1]["train_loss"] < run["history"][0]["train_loss"]
        assert run["peak_rss_mib"] > 0
    if loss == "sce":
        assert 0 < saved["per_seed"][0]["history"][0]["sce_coverage"] <= 1
    assert result["per_seed"][0]["test"] == saved["per_seed"][0]["test"]
    merged = load_recipe().main(["--combine", str(tmp_path / "all.json"), str(out)])
    assert list(merged["runs"]) == [loss]


def test_smoke_run_is_deterministic(tmp_path):
    args = [
        f"data_path={synthetic_inter(tmp_path)}",
        "min_item_count=0",
        "min_user_count=0",
        "test_quantile=0.92",
        "maxlen=8",
        "hidden=16",
        "batch_size=6",
        "max_epochs=1",
        "loss=bce",
        "num_negatives=4",
        "num_threads=null",
    ]
    a = load_recipe(real_provenance=True).main(args + [f"output_json={tmp_path / 'a.json'}"])
    b = load_recipe().main(args + [f"output_json={tmp_path / 'b.json'}"])
    assert a["per_seed"][0]["history"] == b["per_seed"][0]["history"]
    assert len(a["commit"]) >= 7 and a["machine"]["cpu_count"] >= 1
