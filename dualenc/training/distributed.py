"""The training step's own collectives: gathering the batch's documents across processes, with and without
gradient, over the process group Accelerate set up (none with one process). The negative cache's collectives
are in :mod:`dualenc.negcache.draw`."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if _active() else (0, 1)


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every process along dim 0, keeping the autograd graph.

    Uses ``torch.distributed.nn.functional.all_gather``, whose backward sums the incoming gradients and
    returns each process its slice, so with DDP's gradient averaging the result equals one process holding the
    whole global batch. Every process must pass the same shape.

    Shapes:
        x (n, ...) -> (P·n, ...), process p's rows at [p·n, (p+1)·n).
    """
    if not _active():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)  # (P·n, ...)


def all_gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` (no gradient) from every process along dim 0. Shapes: (n, ...) -> (P·n, ...)."""
    if not _active():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)  # (P·n, ...)
