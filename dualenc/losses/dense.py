"""Dense operations over a large table: the shared input checks, full softmax CE and exact blockwise top-k.

The setting is a classifier over a large table: rows ``x`` (N, D) (query vectors or SASRec hidden states)
score every row of ``w`` (C, D) (documents or catalog items) by inner product, and row ``i`` has the target
``targets[i]``. :func:`full_ce` is the dense reference that :class:`~dualenc.losses.sce.ScalableCE` and the
sampled losses (:mod:`dualenc.losses.sampled`) approximate; :func:`blockwise_topk` is the exact maximum inner
product search that picks SCE's bucket items, in the loss and in the negative cache's SCE candidates
(ALGORITHMS.md A5, Part B 2.2-2.3).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from dualenc.errors import InputError


def check_inputs(x: Tensor, w: Tensor, targets: Tensor, mask: Tensor | None) -> Tensor:
    """Validate the shared (x, w, targets, mask) arguments and return the mask (all rows real when None).

    Raises:
        InputError: wrong ranks, dimension mismatch, non-integer targets, non-bool mask, or a real row whose
            target is outside ``[0, C)``. Targets of pad rows are not checked (any value, e.g. -100, is fine).
    """
    if x.dim() != 2 or w.dim() != 2:
        raise InputError(f"x and w must be 2-D (N, D), (C, D); got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise InputError(f"dimension mismatch: x has D={x.shape[1]} but w has D={w.shape[1]}")
    if targets.shape != (x.shape[0],) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise InputError(
            f"targets must be an integer tensor of shape ({x.shape[0]},), got {targets.dtype} "
            f"{tuple(targets.shape)}"
        )
    if mask is None:
        mask = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)  # (N,)
    elif mask.dtype != torch.bool or mask.shape != (x.shape[0],):
        raise InputError(
            f"mask must be a bool tensor of shape ({x.shape[0]},) (True = real row), got "
            f"{mask.dtype} {tuple(mask.shape)}"
        )
    real_targets = targets[mask]  # (N_real,)
    bad = (real_targets < 0) | (real_targets >= w.shape[0])  # (N_real,)
    if bool(bad.any()):
        raise InputError(f"target {int(real_targets[bad][0])} is outside [0, C) with C={w.shape[0]}")
    return mask


def _ce_rows_sum(x: Tensor, w: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Sum over the real rows of ``logsumexp_c <x_i, w_c> - <x_i, w_{y_i}>``; (n, D), (C, D), (n,), (n,)."""
    logits = x @ w.T  # (n, C)
    safe = targets.clamp(0, w.shape[0] - 1)  # (n,) pad rows may hold any target
    row_loss = torch.nn.functional.cross_entropy(logits, safe, reduction="none")  # (n,)
    return row_loss.masked_fill(~mask, 0.0).sum()  # ()


def full_ce(
    x: Tensor, w: Tensor, targets: Tensor, *, mask: Tensor | None = None, block_size: int | None = None
) -> Tensor:
    """Full softmax cross-entropy over the whole table: the dense reference SCE approximates.

    Args:
        x: query rows.
        w: table rows (items, documents); every row is a class.
        targets: class of each row of ``x``.
        mask: True = real row; pad rows (False) are left out of the mean. None = all rows real.
        block_size: None computes all (N, C) logits at once. An integer processes ``block_size`` rows of ``x``
            at a time under activation checkpointing, so only (block_size, C) logits live at once, in the
            forward and the backward pass; value and gradient are the same up to float rounding.

    Returns:
        0-d mean over real rows of ``logsumexp_c <x_i, w_c> - <x_i, w_{y_i}>``; 0 (still attached to the
        graph, zero gradients) when there is no real row, so a fully padded batch does not poison training.

    Shapes:
        x (N, D), w (C, D), targets (N,), mask (N,) -> ().
    """
    mask = check_inputs(x, w, targets, mask)  # (N,)
    if block_size is not None and block_size < 1:
        raise InputError(f"block_size must be >= 1, got {block_size}")
    num_real = int(mask.sum())
    if block_size is None or block_size >= x.shape[0]:
        total = _ce_rows_sum(x, w, targets, mask)  # ()
    else:
        total = x.new_zeros(())  # ()
        for start in range(0, x.shape[0], block_size):
            part = slice(start, start + block_size)
            args = (x[part], w, targets[part], mask[part])
            total = total + checkpoint(_ce_rows_sum, *args, use_reentrant=False)  # ()
    return total / max(num_real, 1)  # ()


@torch.no_grad()
def blockwise_topk(
    queries: Tensor, table: Tensor, k: int, *, block_size: int = 65_536, exclude: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Exact top-k of ``queries @ table.T`` per query, scoring ``block_size`` table rows at a time.

    Only a (n, block_size) score block and a running (n, k) top-k exist at any time, never the (n, C) product.
    Runs under ``no_grad``: it selects, it does not train.

    Args:
        queries: query vectors.
        table: rows to rank.
        k: how many rows to return per query; at most the number of rows not excluded.
        block_size: table rows scored per block (any value >= 1; need not divide C, may be < k).
        exclude: True = this table row is never returned (e.g. the pad item).

    Returns:
        (values, indices), each (n, k), sorted by descending score, as ``torch.topk`` of the dense product.

    Shapes:
        queries (n, D), table (C, D), exclude (C,) -> values (n, k), indices (n, k) int64.
    """
    num_rows = table.shape[0]
    selectable = num_rows - (int(exclude.sum()) if exclude is not None else 0)
    if not 1 <= k <= selectable:
        raise InputError(f"k={k} must be in [1, {selectable}] (table rows that are not excluded)")
    if block_size < 1:
        raise InputError(f"block_size must be >= 1, got {block_size}")
    best_val = queries.new_empty((queries.shape[0], 0))  # (n, 0)
    best_idx = torch.empty((queries.shape[0], 0), dtype=torch.long, device=queries.device)  # (n, 0)
    for start in range(0, num_rows, block_size):
        scores = queries @ table[start : start + block_size].T  # (n, b)
        if exclude is not None:
            scores.masked_fill_(exclude[start : start + block_size], float("-inf"))  # (n, b)
        val, idx = torch.topk(scores, min(k, scores.shape[1]), dim=1)  # (n, k_b)
        best_val = torch.cat([best_val, val], dim=1)  # (n, k' + k_b)
        best_idx = torch.cat([best_idx, idx + start], dim=1)  # (n, k' + k_b)
        if best_val.shape[1] > k:
            best_val, pos = torch.topk(best_val, k, dim=1)  # (n, k)
            best_idx = best_idx.gather(1, pos)  # (n, k)
    best_val, pos = torch.sort(best_val, dim=1, descending=True)  # (n, k)
    return best_val, best_idx.gather(1, pos)
