"""GradCache: a large batch's contrastive loss in the memory of a small one (Gao et al., 2021, "Scaling Deep
Contrastive Learning Batch Size under Memory Limited Setup", Algorithm 1).

One micro-batch in four stages:

1. *Representations without graphs*: every query and document chunk is encoded under ``no_grad``; the RNG
   state before each chunk is kept.
2. *Loss and representation gradients*: the step's own loss (:meth:`TrainingModule.loss_from_embeddings`:
   cross-device gathering, false-negative masks, the negative cache's draws) runs on the detached embeddings
   as leaves, and ``autograd.grad`` gives dL/d(embedding) for every row, and dL/dθ for the loss's own
   parameters (a learned temperature). Negatives drawn from the cache are encoded here, in chunks, like the
   batch's documents.
3. *Chunk-wise re-forward and backward*: each chunk is encoded again with its RNG state restored (same
   dropout masks, so the same embeddings) and back-propagated with its cached gradient through the surrogate
   ``Σ <emb, dL/d emb>``, whose parameter gradient is the chunk's share of dL/dθ.
4. The re-forwards run through the Accelerate-prepared (DDP) module, one chunk each, all but the last under
   ``no_sync``; the last also carries the loss parameters' term (and, with separate towers, the final query
   chunk beside the final document chunk), so every parameter that takes a gradient is used in the forward
   DDP synchronises on.

Peak activation memory is one chunk's graph plus the (B, D) embeddings and the loss over them, instead of the
whole batch's graph. Without dropout the loss and every gradient equal the plain step's; with dropout the
masks of a chunk differ from the masks of the same rows in one whole-batch forward (tests/test_grad_cache.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from accelerate import Accelerator

    from dualenc.negcache.negative_cache import NegativeCache

Features = Mapping[str, Tensor]


@dataclass
class RngState:
    """The CPU generator's state and, on a GPU, the device generator's: what dropout draws from."""

    cpu: Tensor
    device: torch.device
    accelerator_state: Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> RngState:
        gpu = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), device, gpu)

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        """Run the body from this state, then put the generators back where they were."""
        before = RngState.capture(self.device)
        self._set()
        try:
            yield
        finally:
            before._set()

    def _set(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.accelerator_state is not None:
            torch.cuda.set_rng_state(self.accelerator_state, self.device)


@dataclass
class Chunk:
    """Rows of one side, encoded once without a graph; ``grad`` is filled in stage 2."""

    features: dict[str, Tensor]  # (c, L) each, trimmed to the chunk's longest row
    rng: RngState
    grad: Tensor | None = None  # (c, D) dL/d(embedding)


@dataclass
class Replay:
    """What one re-forward (stage 3) encodes, and the loss parameters' gradient term (last replay only)."""

    query: Chunk | None = None
    doc: Chunk | None = None
    params: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (parameter, dL/dθ)


def split_features(features: Features, chunk_size: int) -> list[dict[str, Tensor]]:
    """Row chunks of tokenized features, each trimmed to its longest row (less padding to encode).

    Shapes: features (n, L) each -> chunks (c, L') each, c <= chunk_size, L' <= L.
    """
    mask = features["attention_mask"]  # (n, L)
    chunks = []
    for start in range(0, mask.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        length = max(int(mask[rows].sum(1).max()), 1)
        chunks.append({k: v[rows, :length] for k, v in features.items()})
    return chunks


def encode_without_graph(
    encode: Callable[[Features], Tensor], chunks: list[dict[str, Tensor]], device: torch.device
) -> tuple[Tensor, list[Chunk]]:
    """Stage 1: embeddings of every chunk under ``no_grad``, keeping each chunk's RNG state.

    Shapes: chunks (c_i, L_i) -> (Σ c_i, D).
    """
    recorded, parts = [], []
    with torch.no_grad():
        for features in chunks:
            recorded.append(Chunk(features, RngState.capture(device)))
            parts.append(encode(features))  # (c_i, D)
    return torch.cat(parts), recorded  # (Σ c_i, D)


class NegativeRecorder:
    """Stage 1 for the negatives the cache draws during stage 2: encodes them without a graph, in chunks,
    and hands the loss a leaf tensor whose gradient stage 3 back-propagates."""

    def __init__(self, encode: Callable[[Features], Tensor], chunk_size: int, device: torch.device):
        self.encode, self.chunk_size, self.device = encode, chunk_size, device
        self.chunks: list[Chunk] = []
        self.leaves: list[Tensor] = []

    def __call__(self, features: Features) -> Tensor:
        emb, chunks = encode_without_graph(
            self.encode, split_features(features, self.chunk_size), self.device
        )
        leaf = emb.detach().requires_grad_()  # (n, D)
        self.chunks += chunks
        self.leaves.append(leaf)
        return leaf


def _assign_grads(chunks: list[Chunk], grad: Tensor) -> None:
    """Split a side's dL/d(embedding) (n, D) over its chunks, in row order."""
    start = 0
    for chunk in chunks:
        rows = chunk.features["attention_mask"].shape[0]
        chunk.grad = grad[start : start + rows]  # (c, D)
        start += rows


def _replays(
    queries: list[Chunk], docs: list[Chunk], params: list[tuple[Tensor, Tensor]], shared: bool
) -> list[Replay]:
    """One chunk per re-forward, so a backward holds one chunk's graph. The last replay (the one DDP
    synchronises on) must use every parameter that takes a gradient: the loss's θ, and with separate towers
    both towers, so it holds the last query chunk too."""
    if shared:
        replays = [Replay(query=q) for q in queries] + [Replay(doc=d) for d in docs]
    else:
        replays = [Replay(query=q) for q in queries[:-1]] + [Replay(doc=d) for d in docs[:-1]]
        replays.append(Replay(queries[-1], docs[-1]))
    replays[-1].params = params
    return replays


def grad_cache_step(
    accelerator: Accelerator,
    module: torch.nn.Module,
    batch: dict,
    cache: NegativeCache | None,
    draw_id: int,
    *,
    query_chunk: int,
    doc_chunk: int,
    loss_scale: float,
    sync: bool,
) -> Any:
    """One micro-batch with GradCache: accumulates ``loss_scale`` x d(loss)/dθ into every ``.grad``.

    Args:
        accelerator: the run's Accelerator (autocast, ``no_sync``, ``backward``).
        module: the prepared :class:`TrainingModule` (DDP-wrapped with several processes).
        batch, cache, draw_id: as for ``TrainingModule.forward``.
        query_chunk, doc_chunk: rows per re-forward of queries and of documents.
        loss_scale: the micro-batch's weight in the step (1 / micro-batches).
        sync: whether DDP reduces the gradients at this micro-batch's last re-forward (the step's last one).
    Returns the micro-batch's StepOutput, its loss detached (the gradients are already accumulated).
    """
    core = accelerator.unwrap_model(module)  # the TrainingModule
    encoder, device = core.encoder, batch["doc_idx"].device
    with accelerator.autocast():
        q_emb, q_chunks = encode_without_graph(
            encoder.encode_queries, split_features(batch["query"], query_chunk), device
        )  # (B, D)
        d_emb, d_chunks = encode_without_graph(
            encoder.encode_docs, split_features(batch["doc"], doc_chunk), device
        )  # (B·G, D)
        q_leaf, d_leaf = q_emb.detach().requires_grad_(), d_emb.detach().requires_grad_()
        negatives = NegativeRecorder(encoder.encode_docs, doc_chunk, device)
        output = core.loss_from_embeddings(q_leaf, d_leaf, batch, cache, draw_id, negatives)
    theta = [p for p in core.loss.parameters() if p.requires_grad]
    leaves = [q_leaf, d_leaf, *negatives.leaves]
    grads = torch.autograd.grad(output.loss * loss_scale, leaves + theta, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves + theta, grads, strict=True)]
    _assign_grads(q_chunks, grads[0])
    _assign_grads(d_chunks, grads[1])
    neg_chunks = negatives.chunks
    if negatives.leaves:
        _assign_grads(neg_chunks, torch.cat(grads[2 : len(leaves)]))  # (n, D)
    params = list(zip(theta, grads[len(leaves) :], strict=True))
    replays = _replays(q_chunks, d_chunks + neg_chunks, params, encoder.shared)
    for k, replay in enumerate(replays):
        synced = sync and k == len(replays) - 1
        with contextlib.nullcontext() if synced else accelerator.no_sync(module):
            accelerator.backward(module(batch=None, replay=replay))
    return dataclasses.replace(output, loss=output.loss.detach())  # a StepOutput
