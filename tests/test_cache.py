"""EmbeddingTable (ALGORITHMS.md A1-A2; Part B 1.2 and §4 oracles 7, 8).

Oracles: the slot/age sequences of the Negative Cache reference's cache-manager tests (Part B 1.7), a
brute-force Python loop for locate(), ``q @ emb.T`` in float64 for scores(), and buffer equality for
checkpoints.
"""

from __future__ import annotations

import pytest
import torch

from dualenc.negcache.table import EmbeddingTable


def col(*values: float) -> torch.Tensor:
    """(n, 1) embeddings, one value per document (the reference tests' one-dimensional items)."""
    return torch.tensor(values, dtype=torch.float32)[:, None]


def docs(*rows: int) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


def step_insert(table: EmbeddingTable, rows: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """One stream step with only new items: insert, then tick."""
    slots = table.insert(rows, emb)
    table.tick()
    return slots


def preset(ages: list[int], values: list[float]) -> EmbeddingTable:
    """A full table (doc i in slot i) with given ages, as the reference tests construct a cache directly."""
    table = EmbeddingTable(len(ages), 1)
    table.fill_corpus(col(*values), torch.arange(len(ages)))
    table.age.copy_(torch.tensor(ages, dtype=torch.int32))
    return table


# ------------------------------------------------------------------------------------------- oracle 7
def test_fifo_size_4() -> None:
    table = EmbeddingTable(4, 1)
    assert table.filled.tolist() == [False] * 4 and table.age.tolist() == [0] * 4
    assert step_insert(table, docs(10, 11), col(1, 1)).tolist() == [0, 1]
    assert table.emb[:, 0].tolist() == [1, 1, 0, 0] and table.age.tolist() == [0, 0, 1, 1]
    assert step_insert(table, docs(12, 13), col(2, 2)).tolist() == [2, 3]
    assert table.emb[:, 0].tolist() == [1, 1, 2, 2] and table.age.tolist() == [1, 1, 0, 0]
    assert step_insert(table, docs(14, 15), col(3, 3)).tolist() == [0, 1]  # rows 0, 1 overwritten
    assert table.emb[:, 0].tolist() == [3, 3, 2, 2] and table.doc_idx.tolist() == [14, 15, 12, 13]


def test_fifo_size_3_evicts_oldest_then_lowest_index() -> None:
    table = EmbeddingTable(3, 1)
    step_insert(table, docs(10, 11), col(1, 1))
    assert table.emb[:, 0].tolist() == [1, 1, 0] and table.age.tolist() == [0, 0, 1]
    assert step_insert(table, docs(12, 13), col(2, 2)).tolist() == [
        2,
        0,
    ]  # age 1 first, then the tie at 0 -> 0
    assert table.emb[:, 0].tolist() == [2, 1, 2] and table.age.tolist() == [0, 1, 0]
    assert table.doc_idx.tolist() == [13, 11, 12]


def test_non_lru_refresh_keeps_ages() -> None:
    table = preset([1, 0, 1, 1], [5, 10, 15, 20])
    table.write(docs(1, 3), col(1, 2), reset_age=False)
    table.tick()
    assert table.emb[:, 0].tolist() == [5, 1, 15, 2] and table.age.tolist() == [2, 1, 2, 2]


def test_lru_refresh_resets_ages() -> None:
    table = EmbeddingTable(4, 1)  # reference: refresh slots 1, 3 of a fresh cache -> ages [1, 0, 1, 0]
    table.write(docs(1, 3), col(1, 1))
    table.tick()
    assert table.age.tolist() == [1, 0, 1, 0] and table.emb[:, 0].tolist() == [0, 1, 0, 1]


def test_refreshed_slots_are_not_evicted_in_the_same_step() -> None:
    table = preset([2, 1, 0], [0, 0, 3])  # reference: refresh slot 0 (the oldest), insert one new item
    table.write(docs(0), col(10))
    assert table.insert(docs(11), col(11)).tolist() == [1]
    table.tick()
    assert table.emb[:, 0].tolist() == [10, 11, 3] and table.age.tolist() == [0, 0, 1]


def test_empty_update_is_a_data_noop_that_still_ages() -> None:
    table = preset([2, 2, 2, 2], [5, 10, 15, 20])
    before = {k: v.clone() for k, v in table.state_dict().items()}
    assert table.insert(docs(), torch.zeros(0, 1)).tolist() == []
    table.write(docs(), torch.zeros(0, 1))
    table.tick()
    assert torch.equal(table.emb, before["emb"]) and torch.equal(table.doc_idx, before["doc_idx"])
    assert table.age.tolist() == [3, 3, 3, 3]


def test_oldest_order_ties_empty_and_exclude() -> None:
    table = preset([3, 5, 5, 0, 3], [0, 0, 0, 0, 0])
    assert table.oldest(5).tolist() == [1, 2, 0, 4, 3]
    table.doc_idx[3] = -1  # an empty slot counts as the oldest
    assert table.oldest(2).tolist() == [3, 1]
    exclude = torch.tensor([False, True, False, True, False])
    assert table.oldest(5, exclude=exclude).tolist() == [2, 0, 4]


def test_insert_more_documents_than_slots_keeps_the_newest() -> None:
    table = EmbeddingTable(2, 1)
    slots = table.insert(docs(1, 2, 3), col(1, 2, 3))
    assert slots.tolist() == [0, 1] and table.doc_idx.tolist() == [2, 3]


# ------------------------------------------------------------------------------------------- oracle 8
def test_insert_filter_skips_present_and_repeated_documents() -> None:
    table = EmbeddingTable(6, 1)
    step_insert(table, docs(7, 8), col(7, 8))
    slots = table.insert(docs(8, 9, 9, 7, 10), col(80, 90, 91, 70, 100))
    assert slots.tolist() == [2, 3]  # only 9 (first occurrence) and 10
    assert table.doc_idx.tolist() == [7, 8, 9, 10, -1, -1]
    assert table.emb[:, 0].tolist() == [7, 8, 90, 100, 0, 0]  # present documents keep their embedding
    table.tick()
    state = {k: v.clone() for k, v in table.state_dict().items()}
    assert table.insert(docs(8, 9, 9, 7, 10), col(80, 90, 91, 70, 100)).tolist() == []  # same batch again
    assert torch.equal(table.doc_idx, state["doc_idx"]) and torch.equal(table.emb, state["emb"])
    # without the filter the reference behaviour: every item takes a slot
    table.insert(docs(9, 9), col(1, 2), skip_present=False)
    assert int((table.doc_idx == 9).sum()) == 3


# ------------------------------------------------------------------------------------------- locate
def brute_locate(table: EmbeddingTable, rows: torch.Tensor) -> list[int]:
    held = table.doc_idx.tolist()
    return [held.index(r) if r >= 0 and r in held else -1 for r in rows.tolist()]


def test_locate_matches_brute_force_after_random_writes() -> None:
    g = torch.Generator().manual_seed(0)
    table = EmbeddingTable(50, 2, slot_offset=100)
    for step in range(30):
        rows = torch.randint(0, 120, (int(torch.randint(0, 15, (1,), generator=g)),), generator=g)
        table.insert(rows, torch.randn(rows.numel(), 2, generator=g))
        if step % 3 == 0:  # overwrite some slots' documents directly
            slots = torch.randperm(50, generator=g)[:5]
            table.write(
                slots, torch.randn(5, 2, generator=g), doc_idx=torch.randint(120, 140, (5,), generator=g)
            )
        table.tick()
        query = torch.cat([torch.randint(-2, 150, (40,), generator=g), table.doc_idx[:10]])
        assert table.locate(query).tolist() == brute_locate(table, query)


def test_locate_corpus_layout_fast_path_and_fallback() -> None:
    table = EmbeddingTable(5, 2, slot_offset=10)
    table.fill_corpus(torch.randn(5, 2), torch.arange(10, 15))
    query = docs(9, 10, 12, 14, 15, -1)
    assert table.locate(query).tolist() == [-1, 0, 2, 4, -1, -1]
    assert table._index.corpus_layout  # looked up by subtraction
    table.write(docs(2), torch.zeros(1, 2), doc_idx=docs(99))  # no longer the corpus layout
    assert table.locate(docs(12, 99, 13)).tolist() == [-1, 2, 3]
    assert not table._index.corpus_layout  # by binary search
    assert EmbeddingTable(0, 2).locate(docs(1, 2)).tolist() == [-1, -1]


# ------------------------------------------------------------------------------------------- scores
@pytest.mark.parametrize("block_size", [None, 1, 3, 7, 100])
def test_scores_match_dense_reference(block_size: int | None) -> None:
    g = torch.Generator().manual_seed(1)
    table = EmbeddingTable(7, 4)
    table.write(docs(0, 2, 3, 6), torch.randn(4, 4, generator=g), doc_idx=docs(5, 6, 7, 8))
    queries = torch.randn(3, 4, generator=g)
    expected = 2.5 * queries.double() @ table.emb.double().T  # (3, 7)
    expected[:, ~table.filled] = float("-inf")
    for scale in (2.5, torch.tensor(2.5)):
        got = table.scores(queries, scale=scale, block_size=block_size)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-6)
    with pytest.raises(ValueError, match=r"queries must be \(Q, 4\)"):
        table.scores(torch.zeros(3, 5))


def test_bfloat16_table() -> None:
    g = torch.Generator().manual_seed(2)
    table = EmbeddingTable(6, 8, dtype=torch.bfloat16)
    emb = torch.randn(6, 8, generator=g)
    table.fill_corpus(emb, torch.arange(6))
    assert table.emb.dtype == torch.bfloat16
    queries = torch.randn(2, 8, generator=g)
    got = table.scores(queries, block_size=4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, queries @ emb.bfloat16().float().T, atol=1e-5, rtol=1e-5)
    table.write(docs(1), torch.ones(1, 8, dtype=torch.float64))  # cast to the table dtype
    assert table.emb.dtype == torch.bfloat16 and table.emb[1].tolist() == [1.0] * 8


# ------------------------------------------------------------------------------------ writes, checkpoints
def test_write_duplicate_slots_last_wins_and_out_of_range() -> None:
    table = EmbeddingTable(4, 1)
    table.write(docs(2, 1, 2), col(1, 2, 3), doc_idx=docs(7, 8, 9))
    assert table.emb[:, 0].tolist() == [0, 2, 3, 0] and table.doc_idx.tolist() == [-1, 8, 9, -1]
    assert table.age.tolist() == [0, -1, -1, 0]
    with pytest.raises(IndexError, match="slot 4 out of range"):
        table.write(docs(0, 4), col(1, 1))
    with pytest.raises(IndexError, match="slot -1 out of range"):
        table.write(docs(-1), col(1))
    with pytest.raises(ValueError, match=r"emb must be \(2, 1\)"):
        table.write(docs(0, 1), col(1))
    with pytest.raises(ValueError, match="doc_idx must be >= 0, got -1"):
        table.insert(docs(3, -1), col(1, 1))
    with pytest.raises(ValueError, match="fill_corpus needs emb"):
        table.fill_corpus(torch.zeros(3, 1), torch.arange(3))


def test_buffers_only_and_state_dict_round_trip() -> None:
    g = torch.Generator().manual_seed(3)
    table = EmbeddingTable(5, 3, slot_offset=5)
    assert list(table.parameters()) == []
    step_insert(table, docs(4, 9, 1), torch.randn(3, 3, generator=g))
    table.write(docs(0), torch.randn(1, 3, generator=g))
    state = table.state_dict()
    assert sorted(state) == ["age", "doc_idx", "emb"]
    other = EmbeddingTable(5, 3, slot_offset=5)
    other.load_state_dict(state)
    for name in ("emb", "doc_idx", "age"):
        assert torch.equal(getattr(other, name), getattr(table, name))
        assert getattr(other, name).dtype == getattr(table, name).dtype
    assert other.locate(docs(9, 1, 3)).tolist() == [1, 2, -1]  # lookup index rebuilt after loading


def test_load_state_dict_shape_mismatch_names_both_shapes() -> None:
    state = EmbeddingTable(5, 3).state_dict()
    with pytest.raises(ValueError, match=r"'emb' has shape \(5, 3\) but this table's is \(4, 3\)"):
        EmbeddingTable(4, 3).load_state_dict(state)
    with pytest.raises(ValueError, match=r"\(5, 3\).*\(5, 2\)"):
        EmbeddingTable(5, 2).load_state_dict(state)
