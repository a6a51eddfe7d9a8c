"""No-duplicates batches (batch_sampling=no_duplicates): hand cases, a brute-force oracle of the greedy fill,
the keys of real groups, and the global batches through Accelerate's own sharding on 2 and 3 processes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from dualenc.training.data import group_features
from dualenc.training.no_duplicates import (
    NoDuplicatesEpochSampler,
    epoch_sampler,
    group_keys,
    no_duplicates_order,
)
from dualenc.training.plan import EpochSampler


def _oracle(order: list[int], keys: list[tuple[int, ...]], size: int, length: int) -> tuple[list[int], int]:
    """The greedy fill written from its definition: batch by batch, scan the unplaced items in order."""
    unplaced, out, forced = list(order), [], 0
    for _ in range(length // size):
        batch = []
        for item in unplaced:
            clash = any(set(keys[item]) & set(keys[other]) for other in batch)
            if not clash and len(batch) < size:
                batch.append(item)
        rest = [item for item in unplaced if item not in batch]
        forced += size - len(batch)
        batch += rest[: size - len(batch)]
        unplaced = [item for item in unplaced if item not in batch]
        out += batch
    return out, forced


def _batches_share_a_key(items: list[int], keys, size: int) -> int:
    """Batches of ``items`` in which two items share a key."""
    chunks = [items[i : i + size] for i in range(0, len(items), size)]
    return sum(
        any(set(keys[a]) & set(keys[b]) for a, b in itertools.combinations(chunk, 2)) for chunk in chunks
    )


def test_a_hand_case():
    # items 0 and 1 share positive 10; 2 and 3 are free
    keys = [(-1, 10), (-2, 10), (-3, 11), (-4, 12)]
    assert no_duplicates_order([0, 1, 2, 3], keys, 2, 4) == ([0, 2, 1, 3], 0)
    assert no_duplicates_order([1, 0, 3, 2], keys, 2, 4) == ([1, 3, 0, 2], 0)
    # the same query text (-1) is a duplicate as well
    assert no_duplicates_order([0, 1, 2], [(-1, 5), (-1, 6), (-2, 7)], 2, 2) == ([0, 2], 0)


def test_a_batch_that_cannot_be_filled_is_completed_and_counted():
    keys = [(-1 - i, 5) for i in range(9)]  # every item cites row 5
    placed, forced = no_duplicates_order(list(range(9)), keys, 4, 8)
    assert placed == list(range(8)) and forced == 6  # each batch: 1 free item, 3 forced
    with pytest.raises(ValueError, match="not a multiple"):
        no_duplicates_order(list(range(9)), keys, 4, 6)


@pytest.mark.parametrize("seed", range(6))
def test_the_greedy_fill_equals_a_brute_force_oracle(seed):
    rng = np.random.default_rng(seed)
    num, rows, size = 61, int(rng.integers(12, 40)), int(rng.integers(2, 9))
    texts = rng.integers(0, 55, size=num)  # a few repeated query texts
    keys = [(-1 - int(t), *map(int, rng.choice(rows, size=rng.integers(1, 4), replace=False))) for t in texts]
    order = rng.permutation(num).tolist()
    length = num - num % size
    placed, forced = no_duplicates_order(order, keys, size, length)
    assert (placed, forced) == _oracle(order, keys, size, length)
    assert len(placed) == len(set(placed)) == length and set(placed) <= set(order)
    assert _batches_share_a_key(placed, keys, size) <= forced  # every shared key comes from a forced item


def _groups(queries: list[str], positives: list[list[int]]):
    import datasets

    return datasets.Dataset.from_dict(
        {
            "query_id": [str(i) for i in range(len(queries))],
            "query": queries,
            "positives": positives,
            "negatives": [[] for _ in queries],
        },
        features=group_features(),
    )


def test_group_keys_are_the_query_text_and_every_positive():
    groups = _groups(["a", "b", "a"], [[3, 4], [4], [9]])
    assert group_keys(groups) == [(-1, 3, 4), (-2, 4), (-1, 9)]


def _shared_positive_groups(num: int = 47, pool: int = 30):
    """``num`` queries whose positives come from ``pool`` documents: some documents cited by two queries."""
    rng = np.random.default_rng(1)
    positives = [[int(rng.integers(pool))] for _ in range(num)]
    return _groups([f"query {i}" for i in range(num)], positives)


@pytest.mark.parametrize("processes", [2, 3])
def test_p_processes_see_the_no_duplicates_batches_of_one_process(processes):
    """Through Accelerate's own sharding: P processes with batch b get the global batches of one process with
    batch P·b, each without a shared positive, where the random order of the same seed has some."""
    from accelerate.data_loader import prepare_data_loader

    groups, batch = _shared_positive_groups(), 4
    keys = group_keys(groups)

    def batches(kind: str, num_processes: int, index: int, size: int, epoch: int) -> list[list[int]]:
        sampler = epoch_sampler(kind, groups, seed=3, multiple_of=batch * processes)
        loader = torch.utils.data.DataLoader(
            range(len(groups)), batch_size=size, sampler=sampler, drop_last=True
        )
        loader = prepare_data_loader(
            loader, num_processes=num_processes, process_index=index, put_on_device=False
        )
        loader.set_epoch(epoch)
        return [b.tolist() for b in loader]

    global_batch = batch * processes
    for epoch in (0, 1):
        one = batches("no_duplicates", 1, 0, global_batch, epoch)
        shards = [batches("no_duplicates", processes, rank, batch, epoch) for rank in range(processes)]
        assert all(len(s) == len(one) == len(groups) // global_batch for s in shards)
        assert [list(itertools.chain(*parts)) for parts in zip(*shards, strict=True)] == one
        assert _batches_share_a_key(list(itertools.chain(*one)), keys, global_batch) == 0
        plain = list(itertools.chain(*batches("random", 1, 0, global_batch, epoch)))
        assert _batches_share_a_key(plain, keys, global_batch) > 0  # the data has duplicates to avoid
    assert isinstance(epoch_sampler("no_duplicates", groups, seed=3, multiple_of=4), NoDuplicatesEpochSampler)
    assert type(epoch_sampler("random", groups, seed=3, multiple_of=4)) is EpochSampler
    with pytest.raises(ValueError, match="batch_sampling"):
        epoch_sampler("other", groups, seed=3, multiple_of=4)


def test_the_order_is_that_of_the_seed_and_epoch_alone():
    groups = _shared_positive_groups()
    sampler = NoDuplicatesEpochSampler(group_keys(groups), seed=5, multiple_of=8)
    first = list(sampler)
    assert list(sampler) == first  # a resumed run re-draws the same epoch
    sampler.set_epoch(1)
    assert list(sampler) != first and len(list(sampler)) == len(first) == 40
