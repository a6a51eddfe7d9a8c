"""Scalable Cross-Entropy (SCE; Mezentsev et al., RecSys 2024; ALGORITHMS.md A5, Part B 2.2-2.3).

Rows ``x`` (N, D) score the rows of a large table ``w`` (C, D). Full CE (:func:`dualenc.losses.dense.full_ce`)
needs the (N, C) logits; SCE keeps only the hardest ones, found by random bucket centres and exact maximum
inner product search, so peak memory no longer grows with ``N * C``. :func:`default_bucket_count` is the one
place the paper's default n_b = b_x = int(2 sqrt(N)) is derived.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dualenc.errors import InputError
from dualenc.losses.base import LossOutput
from dualenc.losses.dense import blockwise_topk, check_inputs

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


def default_bucket_count(num_rows: int) -> int:
    """The official code's default n_b and b_x for ``num_rows`` rows: ``int(2 * sqrt(N))``, at least 1.

    ``model.py::SASRec.sce_forward`` of AIRI-Institute/Scalable-SASRec; used by :class:`ScalableCE` (N = real
    rows of the call) and by the negative cache's SCE candidates (N = the step's gathered queries).
    """
    return max(1, int(2 * math.sqrt(num_rows)))


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
    # Coverage is tracked by a boolean scatter, not inferred from "row_loss != 0" as the reference code does:
    # a covered row's loss is exactly 0.0 in float whenever its positive logit beats every bucket logit by
    # more than ~17 (fp32) / ~37 (fp64) nats, or when its only bucket item is its own (masked) target.
    # Dropping such rows would shrink the denominator and drop the easiest rows, biasing the mean upwards.
    covered = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)  # (N,)
    covered.index_fill_(0, flat_rows, True)  # (N,)
    return row_loss, covered


class ScalableCE(nn.Module):
    """Scalable Cross-Entropy: CE over the hardest logits found by random buckets and exact MIPS.

    Each call draws ``n_b`` fresh random bucket centres. Bucket k takes the ``b_x`` rows of ``x`` and the
    ``b_y`` rows of ``w`` with the largest inner product with its centre (exact top-k; the (n_b, C) scores are
    computed under ``no_grad`` in blocks of ``block_size`` rows of ``w`` and never materialised whole),
    scores them against each other (a (b_x, b_y) rectangle with gradient), masks each row's own target,
    appends the row's positive logit and takes the CE. A row's loss is the max over the buckets that contain
    it; the loss is the mean over covered real rows. With ``n_b = 1, b_x = N, b_y = C`` it equals full CE
    (value and gradient).

    Args:
        n_buckets: n_b, number of bucket centres (code ``n_buckets``). None = the official default
            :func:`default_bucket_count` of N_real, the number of real rows in the call.
        bucket_size_x: b_x, rows of ``x`` per bucket (code ``bucket_size_x``). None =
            :func:`default_bucket_count` of N_real, clamped to N_real, so pad rows are never selected. An
            explicit value may exceed N_real (pad rows then fill the bucket and are ignored, as in the
            reference) but not N.
        bucket_size_y: b_y, table rows per bucket (code ``bucket_size_y``; official grid 64-4096, default
            256). Must not exceed the number of selectable rows of ``w`` (C, or C - 1 with ``pad_item``).
        mix: the paper's Mix operation (code ``mix_x``): centres ``Omega^T X`` with Omega Gaussian
            (N_real, n_b), i.e. random combinations of the real rows, against bucket collapse. False = i.i.d.
            Gaussian centres. Both are scaled by ``D ** -0.25`` as in the code (the scale does not change the
            top-k).
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
        default = default_bucket_count(num_real)
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

        ``pos_logit`` (N,) replaces ``<x_i, w_{y_i}>`` as the appended positive logit (see
        :func:`bucketed_ce`).
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
        # row_loss (N,), covered (N,)
        row_loss, covered = bucketed_ce(x, w, safe_targets, buckets.rows, buckets.items, pos_logit)
        covered &= mask  # (N,) pad rows picked by an oversized b_x never count
        num_covered = int(covered.sum())
        loss = row_loss[covered].mean()  # ()
        return LossOutput(loss, self._logs(x.device, num_covered / num_real, n_b, b_x, b_y, num_covered))

    @staticmethod
    def _logs(device: torch.device, *values: float) -> dict[str, Tensor]:
        return {key: torch.tensor(v, device=device) for key, v in zip(LOG_KEYS, values, strict=True)}
