"""Keeping the cached table fresh: which slots the end-of-step refresh re-encodes, and how stale the table is.

:func:`global_oldest` picks the globally oldest slots of the sharded table, the same selection on every
process and for any number of processes (ALGORITHMS.md A2). :func:`staleness` is the reference code's
staleness summary, and :class:`StalenessStats` accumulates it between refreshes and turns it, with the ages,
into the cache's logs (Part B 1.3).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dualenc.negcache.table import EmbeddingTable

Gather = Callable[[Tensor], Tensor]  # (n, ...) on every process -> (P, n, ...) stacked by process


def staleness(cached: Tensor, fresh: Tensor) -> Tensor:
    """Relative squared error of cached embeddings against freshly computed ones (logging only).

    Args:
        cached: (n, D) embeddings read from the table.
        fresh: (n, D) the same documents re-encoded with the current document tower.

    Returns:
        (n,) ``||cached - fresh||² / ||fresh||²`` (``inf``/``nan`` where ``fresh`` is the zero vector).

    References:
        Lindgren et al. 2021, the reference code's staleness summary (ALGORITHMS.md Part B 1.3).
    """
    if cached.shape != fresh.shape or cached.dim() != 2:
        raise ValueError(
            f"cached and fresh must both be (n, D), got {tuple(cached.shape)} and {tuple(fresh.shape)}"
        )
    return (cached - fresh).pow(2).sum(dim=1) / fresh.pow(2).sum(dim=1)  # (n,)


def global_oldest(table: EmbeddingTable, count: int, gather: Gather) -> Tensor:
    """Local slots of this shard among the ``count`` oldest slots of the whole table. Shapes: -> (k_local,).

    Order: age descending (empty slots first, as :meth:`EmbeddingTable.oldest`), then global slot ascending.
    Each shard offers its own ``count`` oldest (one all-gather); the global selection is computed identically
    on every process.
    """
    local = table.oldest(min(count, table.num_slots))  # (c,) oldest first
    age = torch.where(table.filled, table.age.long(), 2**32)[local]  # (c,) empty = older than any age
    pad = count - local.numel()
    age = torch.cat([age, age.new_full((pad,), -(2**62))])  # (count,) padding sorts last
    slot = torch.cat([local + table.slot_offset, local.new_full((pad,), -1)])  # (count,) global slots
    ages, slots = gather(age).flatten(), gather(slot).flatten()  # (P*count,)
    order = torch.argsort(slots, stable=True)  # global slot ascending ...
    order = order[torch.argsort(ages[order], descending=True, stable=True)]  # ... within age descending
    chosen = slots[order[:count]]  # (count,)
    mine = (chosen >= table.slot_offset) & (chosen < table.slot_offset + table.num_slots)  # (count,)
    return chosen[mine] - table.slot_offset  # (k_local,)


class StalenessStats:
    """Per-process running (sum, count) of the staleness of refreshed and of written-back slots.

    ``add`` never synchronises the device; :meth:`logs` (a collective: every process calls it) reduces the
    sums and the table's ages over the processes and starts a new period.
    """

    def __init__(self, device: torch.device | str | None = None):
        self.device = device
        self._sums = self._empty()

    def _empty(self) -> dict[str, Tensor]:
        return {
            name: torch.zeros(2, dtype=torch.float64, device=self.device) for name in ("refresh", "written")
        }

    def add(self, name: str, gap: Tensor) -> None:
        """Add per-slot staleness values (n,) to the running (sum, count) ``name``: refresh or written."""
        total = torch.stack([gap.sum(), gap.new_tensor(float(gap.numel()))])  # (2,)
        self._sums[name] += total.to(self._sums[name])

    def logs(self, table: EmbeddingTable, refreshed: int, gather: Gather) -> dict[str, float]:
        """The period's logs, summed (age: maxed) over processes; resets the staleness sums.

        Keys: ``cache/age_mean``, ``cache/age_max``, ``cache/filled`` (fraction of slots holding a document);
        with ``refreshed`` slots re-encoded, ``cache/staleness_refresh`` (their mean staleness) and
        ``cache/refreshed`` (their fraction of the table); after any write-back, ``cache/staleness_written``.
        """
        age = table.age.double()  # (M,)
        top = age.max() if table.num_slots else age.new_tensor(float("-inf"))  # ()
        counts = torch.stack([age.sum(), table.filled.sum().double(), age.new_tensor(table.num_slots), top])
        local = torch.cat([self._sums["refresh"], self._sums["written"], counts])  # (8,)
        stats = gather(local.to(self.device)).cpu()  # (P, 8)
        ref_sum, ref_n, wr_sum, wr_n, age_sum, filled, slots = stats[:, :7].sum(0).tolist()
        self._sums = self._empty()
        logs = {
            "cache/age_mean": age_sum / max(slots, 1),
            "cache/age_max": float(stats[:, 7].max()),
            "cache/filled": filled / max(slots, 1),
        }
        if refreshed:
            logs["cache/staleness_refresh"] = ref_sum / max(ref_n, 1)
            logs["cache/refreshed"] = refreshed / slots
        if wr_n:
            logs["cache/staleness_written"] = wr_sum / wr_n
        return logs
