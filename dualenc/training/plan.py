"""Where every optimizer step's micro-batches come from, for any process count, accumulation and epoch length.

One place derives everything the loop and a resumed run need from the optimizer step alone: the epoch, the
micro-batches of that epoch already consumed, how many micro-batches the step accumulates, the seeds.

* The data order of an epoch is a permutation of the query groups drawn from (seed, epoch) and cut to a
  multiple of the global batch (per-process batch x processes), so that every process gets the same number of
  full batches and P processes with batch b see exactly the batches one process with batch P·b sees
  (:class:`EpochSampler`).
* An optimizer step accumulates ``accumulation`` micro-batches; the last step of an epoch takes what is left
  (``ceil``), so no micro-batch is dropped and no step straddles two epochs (:class:`StepPlan`).
* The learning-rate schedule is sized in optimizer steps and stepped once per optimizer step by the loop (it
  is not wrapped by ``accelerator.prepare``, whose wrapper steps it once per process).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from dualenc.errors import InputError
from dualenc.negcache.gumbel import derived_seed


class EpochSampler(torch.utils.data.Sampler[int]):
    """A fresh permutation per epoch, from (seed, epoch) only, cut to a multiple of the global batch.

    Args:
        num_items: query groups in the training set.
        seed: run seed.
        multiple_of: the global batch (per-process batch x processes); the permutation's tail that would not
            fill one global batch is left out of the epoch (a different tail each epoch).
    """

    def __init__(self, num_items: int, *, seed: int, multiple_of: int = 1):
        if multiple_of < 1:
            raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
        self.num_items, self.seed, self.multiple_of, self.epoch = num_items, seed, multiple_of, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items - self.num_items % self.multiple_of

    def permutation(self) -> np.ndarray:
        """This epoch's order of all ``num_items`` items, from (seed, epoch) only."""
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items)  # (N,)

    def __iter__(self) -> Iterator[int]:
        return iter(self.permutation()[: len(self)].tolist())


@dataclass(frozen=True)
class StepPlan:
    """Optimizer-step arithmetic: epochs of ``batches_per_epoch`` micro-batches (per process), grouped by
    ``accumulation`` into steps, ``total_steps`` steps in all.

    Hand check: 5 micro-batches per epoch and accumulation 3 give steps of 3 and 2 micro-batches, 2 steps per
    epoch; step 3 is the second step of epoch 1 and starts after its first 3 micro-batches.
    """

    batches_per_epoch: int
    accumulation: int
    total_steps: int

    @classmethod
    def make(cls, batches_per_epoch: int, accumulation: int, max_steps: int, num_epochs: float) -> StepPlan:
        """``max_steps > 0`` wins; otherwise ``ceil(num_epochs x steps per epoch)``."""
        if batches_per_epoch < 1:
            raise InputError(
                "the training set does not fill one global batch (per_device_train_batch_size x processes): "
                "use a smaller batch or more data"
            )
        if accumulation < 1:
            raise InputError(f"gradient_accumulation_steps must be >= 1, got {accumulation}")
        per_epoch = math.ceil(batches_per_epoch / accumulation)
        total = max_steps if max_steps > 0 else math.ceil(num_epochs * per_epoch)
        return cls(batches_per_epoch, accumulation, total)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.batches_per_epoch / self.accumulation)

    def epoch(self, step: int) -> int:
        """The epoch that optimizer step ``step`` (0-based) belongs to."""
        return step // self.steps_per_epoch

    def batches_before(self, step: int) -> int:
        """Micro-batches of its epoch consumed before step ``step`` (what a resumed run skips)."""
        return (step % self.steps_per_epoch) * self.accumulation

    def batches_in(self, step: int) -> int:
        """Micro-batches step ``step`` accumulates: ``accumulation``, or what is left of the epoch."""
        return min(self.accumulation, self.batches_per_epoch - self.batches_before(step))

    def micro_id(self, step: int, micro: int) -> int:
        """A unique number for micro-batch ``micro`` of step ``step``; keys dropout seeds and cache draws."""
        return step * self.accumulation + micro

    def num_epochs(self) -> int:
        """Epochs touched by the run (the last one possibly in part)."""
        return self.epoch(self.total_steps - 1) + 1 if self.total_steps else 0


def micro_seed(seed: int, rank: int, micro_id: int) -> int:
    """Seed of the torch RNG (dropout) for one micro-batch on one process, from its place in training only."""
    return derived_seed(seed, rank, micro_id)
