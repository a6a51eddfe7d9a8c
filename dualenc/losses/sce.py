"""Scalable Cross-Entropy (SCE, Mezentsev et al., RecSys 2024) and its dense reference, full softmax CE.

The setting is a classifier over a large table: rows ``x`` (N, D) (query vectors or SASRec hidden states) score
every row of ``w`` (C, D) (documents or catalog items) by inner product, and row ``i`` has the target
``targets[i]``. Full CE needs the (N, C) logits; SCE keeps only the hardest ones, found by random bucket centres
and exact maximum inner product search, so peak memory no longer grows with ``N * C`` (ALGORITHMS.md A5, Part B
2.2-2.3).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dualenc.errors import InputError
from dualenc.losses.base import LossOutput

logger = logging.getLogger(__name__)

SCE_CITATION = """@inproceedings{mezentsev2024scalable,
  title = {Scalable Cross-Entropy Loss for Sequential Recommendations with Large Item Catalogs},
  author = {Mezentsev, Gleb and Gusak, Danil and Oseledets, Ivan and Frolov, Evgeny},
  booktitle = {Proceedings of the 18th ACM Conference on Recommender Systems (RecSys '24)},
  pages = {475--485}, year = {2024}, doi = {10.1145/3640457.3688140}, note = {arXiv:2409.18721}}"""
LOG_KEYS = ("coverage", "n_buckets", "bucket_size_x", "bucket_size_y", "ce_rows")


@dataclass
class Buckets:
    """One draw of SCE buckets: centres and, per bucket, the selected rows of ``x`` and rows of ``w``."""

    centres: Tensor  # (n_b, D)
    rows: Tensor  # (n_b, b_x) int64 indices into x
    items: Tensor  # (n_b, b_y) int64 indices into w


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


def bucketed_ce(
    x: Tensor, w: Tensor, targets: Tensor, rows: Tensor, items: Tensor, pos_logit: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per-row SCE loss for given buckets: CE of each (bucket, row) pair, then the max over the row's buckets.

    Bucket k scores its rows ``rows[k]`` against its items ``items[k]``; an item equal to the row's own target
    is masked so the positive is counted once, as the appended last logit (ALGORITHMS.md Part B 2.2).

    Args:
        x: query rows (gradient flows to the selected rows).
        w: table rows (gradient flows to the selected items and to the covered rows' targets).
        targets: target of each row, all in ``[0, C)`` (replace pad rows' targets by any valid index).
        rows: indices into ``x`` per bucket.
        items: indices into ``w`` per bucket.
        pos_logit: (N,) the positive logit of each row, when it does not come from ``w`` (a live document
            embedding against a table of stale ones); ``targets`` then only marks the item masked in each row.

    Returns:
        row_loss (N,): max over the buckets containing row i of its bucket CE, 0 for rows in no bucket;
        covered (N,) bool: row i is in at least one bucket.

    Shapes:
        x (N, D), w (C, D), targets (N,), rows (n_b, b_x), items (n_b, b_y) -> (N,), (N,).
    """
    n_b, b_x = rows.shape
    flat_rows = rows.reshape(-1)  # (n_b * b_x,)
    # One gather for targets and bucket items: each gather's backward allocates a dense (C, D) gradient.
    w_sel = w.index_select(0, torch.cat([targets, items.reshape(-1)]))  # (N + n_b * b_y, D)
    if pos_logit is None:
        pos_logit = (x * w_sel[: x.shape[0]]).sum(-1)  # (N,)
    xk = x.index_select(0, flat_rows).view(n_b, b_x, -1)  # (n_b, b_x, D)
    wk = w_sel[x.shape[0] :].view(n_b, items.shape[1], -1)  # (n_b, b_y, D)
    logits = xk @ wk.transpose(1, 2)  # (n_b, b_x, b_y)
    own = targets.index_select(0, flat_rows).view(n_b, b_x, 1) == items[:, None, :]  # (n_b, b_x, b_y)
    logits = logits.masked_fill(own, float("-inf"))  # (n_b, b_x, b_y)
    pos = pos_logit.index_select(0, flat_rows).view(n_b, b_x, 1)  # (n_b, b_x, 1)
    pair_loss = torch.logsumexp(torch.cat([logits, pos], dim=2), dim=2) - pos[..., 0]  # (n_b, b_x)
    # amax over buckets; torch splits the gradient evenly between exactly tied maxima.
    row_loss = pair_loss.new_zeros(x.shape[0]).scatter_reduce(
        0, flat_rows, pair_loss.reshape(-1), reduce="amax", include_self=False
    )  # (N,)
    # Coverage is tracked by a boolean scatter, not inferred from "row_loss != 0" as the reference code does: a
    # covered row's loss is exactly 0.0 in float whenever its positive logit beats every bucket logit by more
    # than ~17 (fp32) / ~37 (fp64) nats, or when its only bucket item is its own (masked) target. Dropping such
    # rows would shrink the denominator and drop the easiest rows, biasing the mean upwards.
    covered = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)  # (N,)
    covered.index_fill_(0, flat_rows, True)  # (N,)
    return row_loss, covered


class ScalableCE(nn.Module):
    """Scalable Cross-Entropy: CE over the hardest logits found by random buckets and exact MIPS.

    Each call draws ``n_b`` fresh random bucket centres. Bucket k takes the ``b_x`` rows of ``x`` and the
    ``b_y`` rows of ``w`` with the largest inner product with its centre (exact top-k; the (n_b, C) scores are
    computed under ``no_grad`` in blocks of ``block_size`` rows of ``w`` and never materialised whole), scores
    them against each other (a (b_x, b_y) rectangle with gradient), masks each row's own target, appends the
    row's positive logit and takes the CE. A row's loss is the max over the buckets that contain it; the loss is
    the mean over covered real rows. With ``n_b = 1, b_x = N, b_y = C`` it equals full CE (value and gradient).

    Args:
        n_buckets: n_b, number of bucket centres (code ``n_buckets``). None = the official
            default ``int(2 * sqrt(N_real))`` with N_real the number of real rows in the call.
        bucket_size_x: b_x, rows of ``x`` per bucket (code ``bucket_size_x``). None = ``int(2 * sqrt(N_real))``
            clamped to N_real, so pad rows are never selected. An explicit value may exceed N_real (pad rows
            then fill the bucket and are ignored, as in the reference) but not N.
        bucket_size_y: b_y, table rows per bucket (code ``bucket_size_y``; official grid 64-4096, default 256).
            Must not exceed the number of selectable rows of ``w`` (C, or C - 1 with ``pad_item``).
        mix: the paper's Mix operation (code ``mix_x``): centres ``Omega^T X`` with Omega Gaussian (N_real, n_b),
            i.e. random combinations of the real rows, against bucket collapse. False = i.i.d. Gaussian centres.
            Both are scaled by ``D ** -0.25`` as in the code (the scale does not change the top-k).
        block_size: rows of ``w`` scored per block when choosing bucket items (memory vs speed only).
        pad_item: index of a row of ``w`` that is never selected (the SASRec pad item). When given and
            ``mask`` is None, rows whose target is ``pad_item`` are treated as padding.

    Shapes:
        x (N, D), w (C, D), targets (N,) int, mask (N,) bool -> LossOutput(loss (), logs).

    Logs:
        ``coverage`` (covered real rows / real rows), ``n_buckets``, ``bucket_size_x``, ``bucket_size_y``,
        ``ce_rows`` (covered real rows).

    References:
        Mezentsev, Gusak, Oseledets, Frolov. Scalable Cross-Entropy Loss for Sequential Recommendations with
        Large Item Catalogs. RecSys 2024 (arXiv 2409.18721); official code AIRI-Institute/Scalable-SASRec,
        ``model.py::SASRec.sce_forward``. See ALGORITHMS.md A5 and Part B 2.2.
    """

    citation = SCE_CITATION

    def __init__(
        self,
        n_buckets: int | None = None,
        bucket_size_x: int | None = None,
        bucket_size_y: int = 256,
        *,
        mix: bool = False,
        block_size: int = 65_536,
        pad_item: int | None = None,
    ):
        super().__init__()
        for name, value in [
            ("n_buckets", n_buckets),
            ("bucket_size_x", bucket_size_x),
            ("bucket_size_y", bucket_size_y),
            ("block_size", block_size),
        ]:
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise InputError(f"{name} must be a positive integer or None, got {value!r}")
        if pad_item is not None and (not isinstance(pad_item, int) or pad_item < 0):
            raise InputError(f"pad_item must be a non-negative integer or None, got {pad_item!r}")
        self.n_buckets = n_buckets
        self.bucket_size_x = bucket_size_x
        self.bucket_size_y = bucket_size_y
        self.mix = mix
        self.block_size = block_size
        self.pad_item = pad_item

    def sizes(self, num_rows: int, num_real: int, num_items: int) -> tuple[int, int, int]:
        """Resolve (n_b, b_x, b_y) for a call with ``num_rows`` rows, ``num_real`` of them real, C items."""
        default = max(1, int(2 * math.sqrt(num_real)))
        n_b = self.n_buckets if self.n_buckets is not None else default
        b_x = self.bucket_size_x if self.bucket_size_x is not None else min(default, num_real)
        if b_x > num_rows:
            raise InputError(f"bucket_size_x={b_x} exceeds the number of rows N={num_rows}")
        if b_x > num_real:
            logger.debug("bucket_size_x=%d > %d real rows: pad rows fill the buckets", b_x, num_real)
        selectable = num_items - (self.pad_item is not None)
        if self.bucket_size_y > selectable:
            raise InputError(
                f"bucket_size_y={self.bucket_size_y} exceeds the {selectable} selectable rows of w "
                f"(C={num_items}{', minus the pad item' if self.pad_item is not None else ''})"
            )
        return n_b, b_x, self.bucket_size_y

    @torch.no_grad()
    def assign(
        self, x: Tensor, w: Tensor, mask: Tensor, n_b: int, b_x: int, generator: torch.Generator | None = None
    ) -> Buckets:
        """Draw centres from ``generator`` and pick each bucket's rows and items by exact top-k (no grad)."""
        dim = x.shape[1]
        device = generator.device if generator is not None else x.device
        if self.mix:
            omega = torch.randn(x.shape[0], n_b, generator=generator, device=device, dtype=x.dtype)
            omega = omega.to(x.device).masked_fill_(~mask[:, None], 0.0) * dim**-0.25  # (N, n_b) pads: 0
            centres = omega.T @ x  # (n_b, D), in the span of the real rows
        else:
            centres = torch.randn(n_b, dim, generator=generator, device=device, dtype=x.dtype)  # (n_b, D)
            centres = centres.to(x.device) * dim**-0.25  # (n_b, D)
        row_scores = (centres @ x.T).masked_fill_(~mask, float("-inf"))  # (n_b, N)
        rows = torch.topk(row_scores, b_x, dim=1).indices  # (n_b, b_x)
        del row_scores
        exclude = None
        if self.pad_item is not None:
            exclude = torch.zeros(w.shape[0], dtype=torch.bool, device=w.device)  # (C,)
            exclude[self.pad_item] = True
        _, items = blockwise_topk(
            centres.to(w.dtype), w, self.bucket_size_y, block_size=self.block_size, exclude=exclude
        )  # (n_b, b_y)
        return Buckets(centres=centres, rows=rows, items=items)

    def forward(
        self,
        x: Tensor,
        w: Tensor,
        targets: Tensor,
        *,
        mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        pos_logit: Tensor | None = None,
    ) -> LossOutput:
        """SCE loss of one batch; centres come from ``generator`` (the global RNG when None).

        ``pos_logit`` (N,) replaces ``<x_i, w_{y_i}>`` as the appended positive logit (see :func:`bucketed_ce`).
        """
        if mask is None and self.pad_item is not None:
            mask = targets != self.pad_item  # (N,)
        mask = check_inputs(x, w, targets, mask)  # (N,)
        if self.pad_item is not None and self.pad_item >= w.shape[0]:
            raise InputError(f"pad_item={self.pad_item} is outside [0, C) with C={w.shape[0]}")
        if self.pad_item is not None and bool((targets[mask] == self.pad_item).any()):
            raise InputError(f"a real row (mask True) has the pad item {self.pad_item} as its target")
        num_real = int(mask.sum())
        if num_real == 0:  # nothing to learn from: a zero that keeps the graph, not the NaN of an empty mean
            zero = (x.sum() + w.sum()) * 0.0  # ()
            return LossOutput(zero, self._logs(x.device, 0.0, 0, 0, 0, 0))
        n_b, b_x, b_y = self.sizes(x.shape[0], num_real, w.shape[0])
        buckets = self.assign(x, w, mask, n_b, b_x, generator)
        safe_targets = targets.masked_fill(~mask, 0)  # (N,) pad rows may hold any target
        row_loss, covered = bucketed_ce(
            x, w, safe_targets, buckets.rows, buckets.items, pos_logit
        )  # (N,), (N,)
        covered &= mask  # (N,) pad rows picked by an oversized b_x never count
        num_covered = int(covered.sum())
        loss = row_loss[covered].mean()  # ()
        return LossOutput(loss, self._logs(x.device, num_covered / num_real, n_b, b_x, b_y, num_covered))

    @staticmethod
    def _logs(device: torch.device, *values: float) -> dict[str, Tensor]:
        return {key: torch.tensor(v, device=device) for key, v in zip(LOG_KEYS, values, strict=True)}
