"""Uniform negative samplers for the sampled losses of :mod:`dualenc.losses.sampled` (BCE, gBCE, CE⁻).

:func:`sample_unseen` draws without replacement from the items outside a row's history (BCE, CE⁻);
:func:`sample_uniform` draws with replacement from the whole catalog (gBCE), as the official SCE code does
(AIRI-Institute/Scalable-SASRec; ALGORITHMS.md Part B 2.4). Randomness comes only from the
``torch.Generator`` argument.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dualenc.errors import InputError


def _uniform_below(limits: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """Uniform integers in ``[0, limits[r])`` per row, with replacement; limits (R,) -> (R, n)."""
    device = generator.device if generator is not None else limits.device
    u = torch.rand(limits.shape[0], n, generator=generator, device=device, dtype=torch.float64)  # (R, n)
    return (u.to(limits.device) * limits[:, None]).long().minimum(limits[:, None] - 1)  # (R, n)


def _distinct_below(limits: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """Uniform n-subsets of ``[0, limits[r])`` per row (without replacement); limits (R,) -> (R, n).

    When n is large relative to the range, every value gets a random key and the n smallest keys win (R x M
    work). Otherwise 2n values are drawn with replacement and a uniformly random n of the distinct ones are
    kept, redrawing the rare rows with fewer than n distinct values; the distinct set is exchangeable over the
    range, so the n kept form a uniform n-subset. Cost O(R n log n) whatever the catalog size.
    """
    out = torch.empty(limits.shape[0], n, dtype=torch.long, device=limits.device)  # (R, n)
    if limits.numel() == 0:
        return out
    device = generator.device if generator is not None else limits.device
    if 4 * n >= int(limits.min()):
        width = int(limits.max())
        keys = torch.rand(limits.shape[0], width, generator=generator, device=device)  # (R, M)
        keys = keys.to(limits.device)  # (R, M)
        keys.masked_fill_(torch.arange(width, device=limits.device) >= limits[:, None], 2.0)  # (R, M)
        return torch.topk(keys, n, dim=1, largest=False).indices  # (R, n)
    todo = torch.arange(limits.shape[0], device=limits.device)  # (r,)
    while todo.numel() > 0:
        cand, _ = _uniform_below(limits[todo], 2 * n, generator).sort(dim=1)  # (r, 2n)
        first = torch.ones_like(cand, dtype=torch.bool)  # (r, 2n)
        first[:, 1:] = cand[:, 1:] != cand[:, :-1]  # (r, 2n) first copy of each value
        keys = torch.rand(cand.shape, generator=generator, device=device).to(cand.device)  # (r, 2n)
        keys.masked_fill_(~first, 2.0)  # (r, 2n) duplicates are never kept
        picked = cand.gather(1, torch.topk(keys, n, dim=1, largest=False).indices)  # (r, n)
        ok = first.sum(dim=1) >= n  # (r,)
        out[todo[ok]] = picked[ok]
        todo = todo[~ok]
    return out


def sample_unseen(
    history: Tensor,
    num_items: int,
    num_negatives: int,
    generator: torch.Generator | None = None,
    *,
    pad_item: int | None = None,
) -> Tensor:
    """Uniform negatives without replacement from the items not in each row's history (BCE, CE⁻).

    Pass one history row per position for BCE (fresh negatives per position) or one per sequence for CE⁻ (one
    shared set per sequence), as in the SCE code's data loader.

    Args:
        history: items each row must not get; entries < 0 or >= ``num_items`` are padding. Duplicates are
            fine.
        num_items: C, the catalog size (rows of ``w``).
        num_negatives: n, negatives per row; at most the number of allowed items of every row.
        generator: the only source of randomness.
        pad_item: an item never returned (the SASRec pad item).

    Returns:
        (R, n) int64 item indices, distinct within a row, none in the row's history, never ``pad_item``.

    Shapes:
        history (R, H) -> (R, n).
    """
    if history.dim() != 2 or history.dtype.is_floating_point or history.dtype == torch.bool:
        raise InputError(f"history must be a 2-D integer tensor, got {history.dtype} {tuple(history.shape)}")
    if num_negatives < 1 or num_items < 1:
        raise InputError(f"num_negatives and num_items must be >= 1, got {num_negatives} and {num_items}")
    forbidden = history.long()  # (R, H)
    if pad_item is not None:
        pad_col = torch.full((history.shape[0], 1), pad_item, dtype=torch.long, device=history.device)
        forbidden = torch.cat([forbidden, pad_col], dim=1)  # (R, H + 1)
    outside = (forbidden < 0) | (forbidden >= num_items)  # (R, H') padding
    forbidden = forbidden.masked_fill(outside, num_items)  # (R, H') C = none
    forbidden, _ = forbidden.sort(dim=1)  # (R, H')
    forbidden[:, 1:].masked_fill_(forbidden[:, 1:] == forbidden[:, :-1], num_items)  # (R, H') drop duplicates
    forbidden, _ = forbidden.sort(dim=1)  # (R, H') distinct forbidden items first, ascending
    num_allowed = num_items - (forbidden < num_items).sum(dim=1)  # (R,)
    if history.shape[0] > 0 and int(num_allowed.min()) < num_negatives:
        raise InputError(
            f"num_negatives={num_negatives} exceeds the {int(num_allowed.min())} items a row may get"
        )
    rank = _distinct_below(num_allowed, num_negatives, generator)  # (R, n) rank among allowed items
    # The t-th allowed item is t + #{j : f_j - j <= t} for the sorted forbidden items f_0 < f_1 < ...
    offset = torch.arange(forbidden.shape[1], device=forbidden.device)  # (H',)
    shifted = torch.where(forbidden < num_items, forbidden - offset, num_items).contiguous()  # (R, H')
    return rank + torch.searchsorted(shifted, rank.contiguous(), right=True)  # (R, n)


def sample_uniform(
    num_rows: int,
    num_items: int,
    num_negatives: int,
    generator: torch.Generator | None = None,
    *,
    pad_item: int | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Uniform negatives with replacement from the whole catalog except ``pad_item`` (gBCE).

    They may hit the row's positive or history, as in the SCE code. Returns (num_rows, n) int64.
    """
    allowed = num_items - (pad_item is not None)
    if num_negatives < 1 or allowed < 1 or num_rows < 0:
        raise InputError(f"need num_negatives >= 1 and an allowed item, got {num_negatives}, C={num_items}")
    limits = torch.full((num_rows,), allowed, dtype=torch.long, device=device)  # (R,)
    items = _uniform_below(limits, num_negatives, generator)  # (R, n)
    return items if pad_item is None else items + (items >= pad_item).long()  # (R, n)
