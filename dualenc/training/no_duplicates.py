"""No-duplicates batches: each epoch's random order, rearranged so that no global batch holds two queries with
the same text or a shared known positive.

sentence-transformers' ``NoDuplicatesBatchSampler`` keeps repeated texts out of one batch; here the keys of a
query group are its query text and every one of its positive rows, so that at ``train_group_size`` 1 no
in-batch document is a known positive of another query of the batch: the false negatives that
``mask_false_negatives`` masks are avoided instead (each query keeps all B - 1 in-batch negatives). Hard
negatives (``train_group_size`` > 1) are not keys: one that is another query's positive is still masked.

The greedy fill is sentence-transformers' (walk the remaining groups in order, take each whose keys are free,
until the batch is full), applied to whole global batches (per-process batch x processes): P processes with
batch b see exactly the batches of one process with batch P·b, as with :class:`EpochSampler`. Where
sentence-transformers drops a batch it cannot fill without a repeat, here the epoch keeps its length (the step
plan depends on it): the batch is completed with the first groups left (their positives are masked as usual)
and the epoch's count of them is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from dualenc.training.plan import EpochSampler

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)


def group_keys(groups: datasets.Dataset) -> list[tuple[int, ...]]:
    """Per query group: its positive rows (>= 0) and its query text as one negative number (-1 - text id)."""
    table = groups.with_format("arrow")[:]
    text_ids: dict[str, int] = {}
    queries = table.column("query").to_pylist()
    positives = table.column("positives").to_pylist()
    return [
        (-1 - text_ids.setdefault(query, len(text_ids)), *rows)
        for query, rows in zip(queries, positives, strict=True)
    ]


def no_duplicates_order(
    order: Sequence[int], keys: Sequence[Sequence[int]], batch_size: int, length: int
) -> tuple[list[int], int]:
    """The first ``length`` items of ``order`` rearranged into batches of ``batch_size`` without a shared key.

    Each batch takes, walking the items not yet placed in ``order``'s order, every item none of whose keys the
    batch holds, until it is full; a batch that cannot be filled so is completed with the first items left.

    Returns:
        (the items, ``length`` of them; how many were placed despite a shared key).
    """
    if length % batch_size:
        raise ValueError(f"length {length} is not a multiple of the batch size {batch_size}")
    remaining = dict.fromkeys(int(i) for i in order)  # insertion-ordered set
    placed: list[int] = []
    forced = 0
    while len(placed) < length:
        batch: list[int] = []
        used: set[int] = set()
        for item in remaining:
            if used.isdisjoint(keys[item]):
                batch.append(item)
                used.update(keys[item])
                if len(batch) == batch_size:
                    break
        if len(batch) < batch_size:  # every item left shares a key with the batch
            taken = set(batch)
            extra = [item for item in remaining if item not in taken][: batch_size - len(batch)]
            batch += extra
            forced += len(extra)
        for item in batch:
            del remaining[item]
        placed += batch
    return placed, forced


class NoDuplicatesEpochSampler(EpochSampler):
    """:class:`EpochSampler`'s order of (seed, epoch), rearranged by :func:`no_duplicates_order` into global
    batches of ``multiple_of`` groups without a shared query text or positive.

    Args:
        keys: per group, what two groups of one batch must not share (:func:`group_keys`).
        seed: run seed.
        multiple_of: the global batch (per-process batch x processes).
    """

    def __init__(self, keys: list[tuple[int, ...]], *, seed: int, multiple_of: int = 1):
        super().__init__(len(keys), seed=seed, multiple_of=multiple_of)
        self.keys = keys

    def __iter__(self) -> Iterator[int]:
        placed, forced = no_duplicates_order(
            self.permutation().tolist(), self.keys, self.multiple_of, len(self)
        )
        if forced:
            logger.info(
                "epoch %d: %d of %d query groups share a query text or positive with another of their batch "
                "(no order left without); their positives are masked",
                self.epoch,
                forced,
                len(placed),
            )
        return iter(placed)


def epoch_sampler(
    batch_sampling: str, groups: datasets.Dataset, *, seed: int, multiple_of: int
) -> EpochSampler:
    """The sampler of ``batch_sampling`` (``random | no_duplicates``) over ``groups``."""
    if batch_sampling == "no_duplicates":
        return NoDuplicatesEpochSampler(group_keys(groups), seed=seed, multiple_of=multiple_of)
    if batch_sampling != "random":
        raise ValueError(f"batch_sampling must be random or no_duplicates, got {batch_sampling!r}")
    return EpochSampler(len(groups), seed=seed, multiple_of=multiple_of)
