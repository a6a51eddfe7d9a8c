"""Which local slot of a table shard holds a corpus row: the lookup behind ``EmbeddingTable.locate``.

A shard in corpus layout (slot i holds row ``slot_offset + i``) is looked up by subtraction; any other by a
binary search (``searchsorted``) in a sorted copy of its ``doc_idx``, O(n log M) for n rows.
"""

from __future__ import annotations

import torch
from torch import Tensor


class SlotIndex:
    """A snapshot of a shard's ``doc_idx`` (M,) prepared for lookups; rebuild it when ``doc_idx`` changes.

    Args:
        doc_idx: (M,) int64 corpus row of every slot, -1 = empty (M >= 1).
        slot_offset: global index of local slot 0.
    """

    def __init__(self, doc_idx: Tensor, slot_offset: int):
        self.device, self.num_slots, self.slot_offset = doc_idx.device, doc_idx.shape[0], slot_offset
        corpus_rows = torch.arange(self.num_slots, device=self.device) + slot_offset  # (M,)
        self.corpus_layout = torch.equal(doc_idx, corpus_rows)
        if not self.corpus_layout:
            order = torch.sort(doc_idx, stable=True)
            self.sorted_doc, self.perm = order.values, order.indices  # (M,), (M,)

    def locate(self, query: Tensor) -> Tensor:
        """Local slots holding corpus rows ``query`` (n,) int64 on :attr:`device`; -1 where absent.

        A row held by several slots gives the lowest of them (the sort is stable). Shapes: (n,) -> (n,).
        """
        if self.corpus_layout:
            local = query - self.slot_offset  # (n,)
            return torch.where((local >= 0) & (local < self.num_slots), local, -1)  # (n,)
        pos = torch.searchsorted(self.sorted_doc, query).clamp(max=self.num_slots - 1)  # (n,)
        found = (self.sorted_doc[pos] == query) & (query >= 0)  # (n,)
        return torch.where(found, self.perm[pos], -1)  # (n,)
