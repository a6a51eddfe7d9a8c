"""One process's shard of the table of cached document embeddings (ALGORITHMS.md A1-A2).

A slot holds a (possibly stale) embedding, the corpus row of its document (``doc_idx``, -1 = empty) and an age
(steps since it was written). Two ways to use it:

* corpus mode: :meth:`EmbeddingTable.fill_corpus` loads the whole shard once (slot i holds corpus row
  ``slot_offset + i``); after each optimizer step the oldest slots (:meth:`~EmbeddingTable.oldest`) are
  re-encoded and written.
* stream mode: a FIFO of recent documents. Per step (Lindgren et al.'s ``update_cache``, Part B 1.2): refresh
  written-back slots with :meth:`~EmbeddingTable.write` (LRU resets their age to -1), then
  :meth:`~EmbeddingTable.insert` new documents into the oldest slots, then :meth:`~EmbeddingTable.tick`.
  Slots written in a step have age -1 until the tick, so an insert never evicts them in the same step (unless
  there are not enough other slots).

No distributed code: the cross-process exchange calls these methods on each process's shard.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dualenc.negcache.slot_index import SlotIndex

_BUFFERS = ("emb", "doc_idx", "age")
DEFAULT_BLOCK = 65536  # slots per matmul in scores(): bounds the float32 copy of a bf16/fp16 block


class EmbeddingTable(nn.Module):
    """Per-process shard of the table of cached document embeddings. Buffers only (never parameters).

    Args:
        num_slots: M, slots of this shard.
        dim: D, embedding dimension.
        dtype: storage dtype of the embeddings (float32, bfloat16 or float16).
        device: device of the buffers.
        slot_offset: global index of local slot 0 (process p owns ``[offset_p, offset_p + M_p)``).

    Buffers (in ``state_dict``, hence checkpointed): ``emb`` (M, D) ``dtype``; ``doc_idx`` (M,) int64 corpus
    row, -1 = empty; ``age`` (M,) int32 steps since written.
    """

    emb: Tensor
    doc_idx: Tensor
    age: Tensor

    def __init__(
        self,
        num_slots: int,
        dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        slot_offset: int = 0,
    ) -> None:
        super().__init__()
        if num_slots < 0 or dim < 1 or slot_offset < 0:
            raise ValueError(
                f"need num_slots >= 0, dim >= 1, slot_offset >= 0; got {num_slots}, {dim}, {slot_offset}"
            )
        if not dtype.is_floating_point:
            raise ValueError(f"embedding dtype must be floating point, got {dtype}")
        self.slot_offset = slot_offset
        self.register_buffer("emb", torch.zeros(num_slots, dim, dtype=dtype, device=device))  # (M, D)
        self.register_buffer("doc_idx", torch.full((num_slots,), -1, dtype=torch.long, device=device))  # (M,)
        self.register_buffer("age", torch.zeros(num_slots, dtype=torch.int32, device=device))  # (M,)
        # the lookup locate() searches, built lazily; None = stale (doc_idx changed since)
        self._index: SlotIndex | None = None

    # ------------------------------------------------------------------------------------------- properties
    @property
    def num_slots(self) -> int:
        """M, slots of this shard."""
        return self.emb.shape[0]

    @property
    def dim(self) -> int:
        """D, embedding dimension."""
        return self.emb.shape[1]

    @property
    def filled(self) -> Tensor:
        """(M,) bool: the slot holds a document."""
        return self.doc_idx >= 0

    def extra_repr(self) -> str:
        sizes = f"num_slots={self.num_slots}, dim={self.dim}"
        return f"{sizes}, dtype={self.emb.dtype}, slot_offset={self.slot_offset}"

    # ------------------------------------------------------------------------------------------- writes
    def _slots(self, slots: Tensor) -> Tensor:
        """Validated local slots as int64 on the table's device; IndexError names an out-of-range slot."""
        slots = torch.as_tensor(slots, device=self.emb.device).long().reshape(-1)  # (n,)
        bad = (slots < 0) | (slots >= self.num_slots)  # (n,)
        if bool(bad.any()):
            raise IndexError(f"slot {int(slots[bad][0])} out of range for a table of {self.num_slots} slots")
        return slots

    @torch.no_grad()
    def write(
        self, slots: Tensor, emb: Tensor, *, doc_idx: Tensor | None = None, reset_age: bool = True
    ) -> None:
        """Write (refresh) rows ``slots``.

        If a slot occurs several times in one call, the last occurrence wins (deterministically, on any
        device).

        Args:
            slots: (n,) local slot indices in ``[0, M)``; out of range -> IndexError naming the slot.
            emb: (n, D) embeddings, cast to the table's dtype.
            doc_idx: optional (n,) corpus rows now held by the slots.
            reset_age: set ``age[slots] = -1`` so that they read 0 after the end-of-step :meth:`tick` (the
                reference's LRU refresh). ``False`` leaves ages untouched (pure FIFO).
        """
        slots = self._slots(slots)  # (n,)
        if emb.shape != (slots.numel(), self.dim):
            raise ValueError(f"emb must be ({slots.numel()}, {self.dim}), got {tuple(emb.shape)}")
        if doc_idx is not None and doc_idx.numel() != slots.numel():
            raise ValueError(f"doc_idx must have {slots.numel()} entries, got {doc_idx.numel()}")
        keep = _last_occurrence(slots)  # (u,) positions of the last write of each distinct slot
        slots = slots[keep]  # (u,)
        self.emb[slots] = emb.detach()[keep.to(emb.device)].to(device=self.emb.device, dtype=self.emb.dtype)
        if doc_idx is not None:
            rows = doc_idx.reshape(-1).to(device=self.emb.device, dtype=torch.long)[keep]  # (u,)
            self.doc_idx[slots] = rows
            self._index = None
        if reset_age:
            self.age[slots] = -1

    @torch.no_grad()
    def fill_corpus(self, emb: Tensor, doc_idx: Tensor) -> None:
        """Corpus mode: load the whole shard at once; every age becomes 0.

        Args:
            emb: (M, D) embeddings of the shard's documents.
            doc_idx: (M,) their corpus rows (normally ``slot_offset + arange(M)``).
        """
        if emb.shape != self.emb.shape or doc_idx.shape != self.doc_idx.shape:
            raise ValueError(
                f"fill_corpus needs emb {tuple(self.emb.shape)} and doc_idx {tuple(self.doc_idx.shape)}, "
                f"got {tuple(emb.shape)} and {tuple(doc_idx.shape)}"
            )
        self.emb.copy_(emb)
        self.doc_idx.copy_(doc_idx)
        self.age.zero_()
        self._index = None

    def oldest(self, n: int, *, exclude: Tensor | None = None) -> Tensor:
        """The ``n`` local slots with the largest age, oldest first.

        Empty slots count as older than any filled slot; ties go to the lowest index first (the reference's
        ``top_k`` on age). Slots written this step have age -1 and so come last.

        Args:
            n: number of slots wanted.
            exclude: optional (M,) bool, slots never returned.

        Returns:
            (min(n, #not excluded),) int64 local slots.
        """
        num = self.num_slots
        index = torch.arange(num, device=self.age.device)  # (M,)
        age = torch.where(self.filled, self.age.long(), 2**32)  # (M,) empty = older than any age
        key = age * num + (num - 1 - index)  # (M,) distinct; larger = older, then lower index
        available = num
        if exclude is not None:
            if exclude.shape != (num,):
                raise ValueError(f"exclude must be ({num},) bool, got {tuple(exclude.shape)}")
            exclude = exclude.to(device=key.device, dtype=torch.bool)
            key = key.masked_fill(exclude, torch.iinfo(torch.long).min)  # (M,)
            available = num - int(exclude.sum())
        return key.topk(max(0, min(n, available))).indices  # (n,)

    @torch.no_grad()
    def insert(self, doc_idx: Tensor, emb: Tensor, *, skip_present: bool = True) -> Tensor:
        """Stream (FIFO) mode: put new documents into the oldest slots and set their age to -1.

        Call after this step's refreshes (:meth:`write`): those slots have age -1, so they are evicted only
        if there are fewer other slots than new documents. If more documents than slots remain, only the
        last M are written (the earlier ones would be evicted first anyway).

        Args:
            doc_idx: (n,) corpus rows (>= 0).
            emb: (n, D) their fresh embeddings.
            skip_present: do not insert documents already held by the table, nor a document twice within
                ``doc_idx`` (the first occurrence is kept): the reference's ``IsInCacheFilterFn``.

        Returns:
            (k,) int64 local slots written, one per inserted document, in the order of ``doc_idx``.
        """
        doc_idx = doc_idx.reshape(-1).to(device=self.emb.device, dtype=torch.long)  # (n,)
        if emb.shape != (doc_idx.numel(), self.dim):
            raise ValueError(f"emb must be ({doc_idx.numel()}, {self.dim}), got {tuple(emb.shape)}")
        if bool((doc_idx < 0).any()):
            raise ValueError(f"doc_idx must be >= 0, got {int(doc_idx.min())}")
        keep = torch.arange(doc_idx.numel(), device=doc_idx.device)  # (n,) positions to insert
        if skip_present:
            first = _first_occurrence(doc_idx)  # (u,) ascending positions
            keep = first[self.locate(doc_idx[first]) < 0]  # (k,)
        keep = keep[max(0, keep.numel() - self.num_slots) :]  # (k,) at most M
        slots = self.oldest(keep.numel())  # (k,)
        self.write(slots, emb[keep.to(emb.device)], doc_idx=doc_idx[keep], reset_age=True)
        return slots

    @torch.no_grad()
    def tick(self) -> None:
        """End of step: every slot ages by one (also when nothing was written)."""
        self.age.add_(1)

    # ------------------------------------------------------------------------------------------- reads
    def locate(self, doc_idx: Tensor) -> Tensor:
        """Local slots holding the given corpus rows.

        Args:
            doc_idx: (n,) corpus rows (negative values are never found).

        Returns:
            (n,) int64 local slots on the table's device, -1 where absent. If a document is held by several
            slots (only possible through :meth:`write` with ``doc_idx``), the lowest slot.

        Searches a :class:`~dualenc.negcache.slot_index.SlotIndex` of ``doc_idx``, built on the first call
        after ``doc_idx`` changed.
        """
        query = doc_idx.reshape(-1).to(device=self.doc_idx.device, dtype=torch.long)  # (n,)
        if self.num_slots == 0:
            return torch.full_like(query, -1)
        if self._index is None or self._index.device != self.doc_idx.device:
            self._index = SlotIndex(self.doc_idx, self.slot_offset)
        return self._index.locate(query)  # (n,)

    @torch.no_grad()
    def scores(
        self, queries: Tensor, *, scale: float | Tensor = 1.0, block_size: int | None = None
    ) -> Tensor:
        """Stale scores of queries against every slot: ``scale * <q, emb>``, empty slots ``-inf``.

        Computed without gradient (cached embeddings are constants), in float32, ``block_size`` slots at a
        time (default 65536) so that a bf16/fp16 table is never copied whole to float32.

        Args:
            queries: (Q, D) query embeddings (any float dtype; cast to float32).
            scale: score multiplier (1/temperature), a number or a 0-d tensor.
            block_size: slots per matmul; the result does not depend on it.

        Returns:
            (Q, M) float32.
        """
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (Q, {self.dim}), got {tuple(queries.shape)}")
        block = block_size or DEFAULT_BLOCK
        if block < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        q = queries.detach().to(device=self.emb.device, dtype=torch.float32)  # (Q, D)
        out = torch.empty(q.shape[0], self.num_slots, dtype=torch.float32, device=q.device)  # (Q, M)
        for start in range(0, self.num_slots, block):
            part = self.emb[start : start + block].float()  # (b, D)
            out[:, start : start + block] = q @ part.T  # (Q, b)
        if isinstance(scale, Tensor):
            scale = scale.detach().to(device=out.device, dtype=torch.float32)
        out.mul_(scale)
        return out.masked_fill_(~self.filled[None, :], float("-inf"))  # (Q, M)

    # ------------------------------------------------------------------------------------------- checkpoints
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        """nn.Module hook: a clear error on shape mismatch, and the lookup index is rebuilt after loading."""
        for name in _BUFFERS:
            key = prefix + name
            mine = getattr(self, name)
            if key in state_dict and tuple(state_dict[key].shape) != tuple(mine.shape):
                raise ValueError(
                    f"EmbeddingTable: checkpoint {key!r} has shape {tuple(state_dict[key].shape)} but "
                    f"this table's is {tuple(mine.shape)} (num_slots={self.num_slots}, dim={self.dim}); was "
                    "it saved with another cache size, embedding dimension or number of processes?"
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._index = None


def _last_occurrence(values: Tensor) -> Tensor:
    """(n,) -> (u,) positions of the last occurrence of each distinct value (in order of value)."""
    ordered, perm = torch.sort(values, stable=True)  # (n,), (n,)
    last = torch.ones_like(ordered, dtype=torch.bool)  # (n,)
    last[:-1] = ordered[1:] != ordered[:-1]
    return perm[last]  # (u,)


def _first_occurrence(values: Tensor) -> Tensor:
    """(n,) -> (u,) positions of the first occurrence of each distinct value, ascending."""
    ordered, perm = torch.sort(values, stable=True)  # (n,), (n,)
    first = torch.ones_like(ordered, dtype=torch.bool)  # (n,)
    first[1:] = ordered[1:] != ordered[:-1]
    return perm[first].sort().values  # (u,)
