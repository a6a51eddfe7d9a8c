"""The few collectives training needs. Rank and world size come from the Accelerator passed in."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every process along dim 0, keeping the autograd graph.

    Uses ``torch.distributed.nn.functional.all_gather``, whose backward sums the incoming gradients and returns
    each process its slice, so with DDP's gradient averaging the result equals one process holding the whole
    global batch. Every process must pass the same shape.

    Shapes:
        x (n, ...) -> (P·n, ...), process p's rows at [p·n, (p+1)·n).
    """
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)  # (P·n, ...)
