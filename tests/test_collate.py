"""Training batches: GroupDataset draws (determinism, epochs, rules, uniformity); TrainCollator tokenizing."""

from __future__ import annotations

import pickle
from dataclasses import replace

import datasets
import numpy as np
import pytest
import torch
from helpers import jsonl, write

from dualenc.errors import InputError
from dualenc.training.batches import GroupDataset, TrainCollator
from dualenc.training.data import TrainData, group_features, load_train_data

# --- GroupDataset -----------------------------------------------------------------------------------------


def make_data(groups: list[tuple[list[int], list[int]]], num_docs: int = 50) -> TrainData:
    corpus = datasets.Dataset.from_dict(
        {
            "id": [f"d{i}" for i in range(num_docs)],
            "title": [""] * num_docs,
            "text": [f"w{i}" for i in range(num_docs)],
        }
    )
    rows = {
        "query_id": [f"q{i}" for i in range(len(groups))],
        "query": [f"query w{i}" for i in range(len(groups))],
    }
    rows.update(positives=[p for p, _ in groups], negatives=[n for _, n in groups])
    return TrainData(corpus=corpus, groups=datasets.Dataset.from_dict(rows, features=group_features()))


def test_group_dataset_is_deterministic_and_ignores_global_rng():
    data = make_data([([1, 2], list(range(10, 30))), ([3], list(range(30, 40)))])
    first = GroupDataset(data, 4, seed=7)
    first.set_epoch(3)
    draws = [first[1], first[0]]
    torch.manual_seed(123)
    np.random.seed(123)
    np.random.random(5)
    second = GroupDataset(data, 4, seed=7)
    second.set_epoch(3)
    assert [second[1], second[0]] == draws
    # the documented recipe: default_rng([seed, epoch, idx]) draws the positive, then the negatives
    rng = np.random.default_rng([7, 3, 0])
    expected_pos = [1, 2][rng.integers(2)]
    expected_negs = [list(range(10, 30))[i] for i in rng.choice(20, size=3, replace=False)]
    assert draws[1]["doc_idx"] == [expected_pos, *expected_negs]
    assert draws[1]["query"] == "query w0" and draws[1]["positives"] == [1, 2]


def test_group_dataset_epochs_and_seeds_change_the_draws():
    data = make_data([([1], list(range(10, 30)))])
    ds = GroupDataset(data, 4, seed=0)
    per_epoch = []
    for epoch in range(5):
        ds.set_epoch(epoch)
        per_epoch.append(ds[0]["doc_idx"])
    assert len({tuple(d) for d in per_epoch}) == 5
    assert GroupDataset(data, 4, seed=1)[0] != GroupDataset(data, 4, seed=0)[0]


def test_group_dataset_draw_rules(caplog):
    data = make_data([([1, 2, 3], [10, 11, 12, 13, 14]), ([4], [20, 21])])
    ds = GroupDataset(data, 5, seed=0)
    assert "1 of 2 query groups have fewer than 4 negatives" in caplog.text
    for epoch in range(50):
        ds.set_epoch(epoch)
        item = ds[0]
        assert len(item["doc_idx"]) == 5 and item["doc_idx"][0] in (1, 2, 3)
        assert len(set(item["doc_idx"][1:])) == 4 and set(item["doc_idx"][1:]) <= {10, 11, 12, 13, 14}
        short = ds[1]["doc_idx"]
        assert short[0] == 4 and len(short) == 5 and set(short[1:]) <= {20, 21}  # with replacement
    assert GroupDataset(data, 1)[1]["doc_idx"] == [4]


def test_group_dataset_needs_negatives_for_groups_larger_than_one():
    data = make_data([([1], [5]), ([2], []), ([3], [])])
    with pytest.raises(
        InputError, match=r"query id 'q1' \(and 1 more queries\) has no negatives.*dualenc mine"
    ):
        GroupDataset(data, 2)
    assert len(GroupDataset(data, 1)) == 3
    with pytest.raises(InputError, match="train_group_size must be >= 1"):
        GroupDataset(data, 0)


def test_group_dataset_draws_are_uniform():
    positives, negatives = [1, 2, 3], [10, 11, 12, 13, 14]
    ds = GroupDataset(make_data([(positives, negatives)]), 3, seed=11)
    num_epochs = 3000
    pos_counts, neg_counts = np.zeros(3), np.zeros(5)
    for epoch in range(num_epochs):
        ds.set_epoch(epoch)
        doc_idx = ds[0]["doc_idx"]
        pos_counts[positives.index(doc_idx[0])] += 1
        for row in doc_idx[1:]:
            neg_counts[negatives.index(row)] += 1
    # chi-square goodness of fit against uniform; 0.999 quantiles: df=2 -> 13.82, df=4 -> 18.47
    expected_pos, expected_neg = num_epochs / 3, num_epochs * 2 / 5
    assert ((pos_counts - expected_pos) ** 2 / expected_pos).sum() < 13.82
    assert ((neg_counts - expected_neg) ** 2 / expected_neg).sum() < 18.47
    assert neg_counts.min() > 0


# --- TrainCollator ----------------------------------------------------------------------------------------


def test_train_collator(tiny_model_dir):
    from dualenc.model.encoder import DualEncoder

    model = DualEncoder.from_pretrained(tiny_model_dir)
    corpus = datasets.Dataset.from_dict(
        {
            "id": ["a", "b", "c", "d"],
            "title": ["the index", "", "index", ""],
            "text": ["query passage", "dense vector search", "", "w1 w2 w3 w4 w5 w6"],
        }
    )
    items = [
        {"query": "dense retrieval", "doc_idx": [0, 1, 3], "positives": [0]},
        {"query": "the model is a bert encoder", "doc_idx": [2, 3, 3], "positives": [2, 1, 0]},
    ]
    batch = TrainCollator(model, corpus)(items)
    w = "w1 w2 w3 w4 w5 w6"
    texts = ["the index query passage", "dense vector search", w, "index", w, w]  # doc_text(title, text)
    expected_doc = model.tokenize_docs(texts)
    expected_query = model.tokenize_queries(["dense retrieval", "the model is a bert encoder"])
    assert batch["doc"]["input_ids"].shape[0] == 6 and batch["query"]["input_ids"].shape[0] == 2
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(batch["doc"][key], expected_doc[key])
        assert torch.equal(batch["query"][key], expected_query[key])
    assert model.tokenizer.decode(batch["doc"]["input_ids"][0], skip_special_tokens=True) == texts[0]
    assert batch["doc_idx"].dtype == torch.long and batch["doc_idx"].tolist() == [0, 1, 3, 2, 3, 3]
    assert batch["positives"].dtype == torch.long and batch["positives"].tolist() == [[0, -1, -1], [2, 1, 0]]


def test_group_dataset_and_collator_in_a_data_loader(tmp_path, hf, files, tiny_model_dir):
    from dualenc.model.encoder import DualEncoder

    content = jsonl(
        {"query_id": "q1", "positive_ids": ["d1"], "negative_ids": ["d2", "d3"]},
        {"query_id": "q2", "positive_ids": ["d4", "d5"], "negative_ids": ["d1"]},
    )
    data = load_train_data(write(tmp_path / "g.jsonl", content), **files, cache_dir=hf)
    model = DualEncoder.from_pretrained(tiny_model_dir)
    collate = TrainCollator(model, data.corpus)
    loader = torch.utils.data.DataLoader(
        GroupDataset(data, 2), batch_size=2, collate_fn=collate, num_workers=1
    )
    batch = next(iter(loader))
    assert batch["doc"]["input_ids"].shape[0] == 4 and batch["doc_idx"][2].item() in (3, 4)
    assert batch["doc_idx"][3].item() == 0 and batch["positives"].tolist() == [[0, -1], [3, 4]]


def test_train_collator_keeps_no_weights_and_survives_pickling(tiny_model_dir):
    """``spawn`` workers get the collator pickled: it holds no model, yet tokenizes as the model does."""
    from dualenc.model.encoder import DualEncoder

    model = DualEncoder.from_pretrained(tiny_model_dir)
    model.config = replace(model.config, query_prefix="query: ", passage_prefix="passage: ", query_max_len=4)
    corpus = datasets.Dataset.from_dict(
        {"id": ["a", "b"], "title": ["", "index"], "text": ["w1 w2 w3", "w4"]}
    )
    items = [{"query": "dense vector search w1 w2", "doc_idx": [1, 0], "positives": [1]}]
    collate = pickle.loads(pickle.dumps(TrainCollator(model, corpus)))
    assert not any(isinstance(value, torch.nn.Module) for value in vars(collate).values())
    batch = collate(items)
    expected_query = model.tokenize_queries(["dense vector search w1 w2"])
    expected_doc = model.tokenize_docs(["index w4", "w1 w2 w3"])
    assert batch["query"]["input_ids"].shape == (1, 4)  # truncated to the new query_max_len
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(batch["query"][key], expected_query[key])
        assert torch.equal(batch["doc"][key], expected_doc[key])
