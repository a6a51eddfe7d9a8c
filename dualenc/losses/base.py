"""The contract every dualenc loss keeps: ``loss(LossInputs) -> LossOutput``, and the pieces all losses share.

A loss is an ``nn.Module`` that sees vectors, targets and masks, never the encoder or the batch; gathering
across processes is the training step's job (dualenc/training/distributed.py). The temperature belongs to the
loss (:class:`Temperature`). The losses themselves live in :mod:`dualenc.losses.inbatch`,
:mod:`dualenc.losses.cached` and :mod:`dualenc.losses.table_sce`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

# a learned 1/temperature is clamped here, as CLIP does, to keep logits bounded
MAX_SCALE = 100.0


def at_least_float32(x: Tensor) -> Tensor:
    """Logits in float32 (or float64 when the inputs are): bf16/fp16 scores lose too much in a softmax."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@dataclass
class CacheTerms:
    """What the negative cache contributes to a loss for the B local queries (A3-A5 of ALGORITHMS.md).

    Which fields are set depends on the loss's ``cache_terms``: ``"samples"`` (``rest_lse``, ``neg_emb``,
    ``neg_weight``), ``"mean"`` (``rest_lse``, ``mean``), ``"table"`` (``table``, ``target_slots``,
    ``generator``).
    """

    rest_lse: Tensor | None = None  # (B,) log-sum-exp of the stale scaled scores of the rest R of the cache
    neg_emb: Tensor | None = None  # (B, m, D) live embeddings of negatives drawn from the cache (with grad)
    neg_weight: Tensor | None = None  # (B, m) w_k of each draw, 0 for a missing draw
    mean: Tensor | None = None  # (B, D) softmax-weighted mean of R's stale embeddings
    table: Tensor | None = None  # (M, D) the stale table (constants)
    target_slots: Tensor | None = None  # (B,) the table slot of each query's positive
    generator: torch.Generator | None = None  # draws random bucket centres (SCE)


@dataclass
class LossInputs:
    """What every dualenc loss takes: live vectors, each query's positive column, masks, the cache's terms."""

    q_emb: Tensor  # (B, D) live query vectors
    d_emb: Tensor  # (N, D) live documents the queries are scored against (N = B·G, or P·B·G gathered)
    targets: Tensor  # (B,) column of each query's positive in d_emb
    mask: Tensor | None = None  # (B, N) True = known false negative, excluded (never at a target)
    cache: CacheTerms | None = None  # the negative cache's contribution (losses with cache_terms only)


@dataclass
class LossOutput:
    """What every dualenc loss returns: the scalar to backpropagate and detached values worth logging."""

    loss: Tensor  # ()
    logs: dict[str, Tensor] = field(default_factory=dict)


class Temperature(nn.Module):
    """Score scale 1/τ, fixed or learned (parameterised as log(1/τ) so it stays positive)."""

    def __init__(self, temperature: float = 1.0, learn: bool = False):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if learn and temperature < 1.0 / MAX_SCALE:  # it would start clamped, with no gradient to learn from
            raise ValueError(f"a learned temperature must start at >= {1.0 / MAX_SCALE}, got {temperature}")
        self.learn = learn
        # float64, so that float64 tests are exact too
        log_scale = torch.tensor(math.log(1.0 / temperature), dtype=torch.float64)  # ()
        if learn:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    def forward(self) -> Tensor:
        """The current scale 1/τ, a 0-d tensor: clamped to ``MAX_SCALE`` if learned, a fixed one as given."""
        scale = self.log_scale.exp()  # ()
        return scale.clamp(max=MAX_SCALE) if self.learn else scale


def false_negative_mask(doc_idx: Tensor, positives: Tensor, targets: Tensor) -> Tensor:
    """Documents that are a known positive of the query but not its target (duplicates, shared positives).

    Args:
        doc_idx: (N,) corpus row of every document column.
        positives: (B, P) corpus rows of each query's positives, padded with -1.
        targets: (B,) the column of each query's own positive.

    Returns:
        (B, N) bool, True = mask out (:attr:`LossInputs.mask`).
    """
    hit = (doc_idx[None, :, None] == positives[:, None, :]) & (positives[:, None, :] >= 0)  # (B, N, P)
    mask = hit.any(dim=2)  # (B, N)
    mask[torch.arange(targets.shape[0], device=targets.device), targets] = False
    return mask
