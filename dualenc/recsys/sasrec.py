"""SASRec: a causal self-attention encoder of item sequences with a tied item table for input and output.

The layer layout follows the SCE paper's code (AIRI-Institute/Scalable-SASRec ``model.py::SASRecBackBone``, a
port of Kang & McAuley's SASRec): item embedding times sqrt(d) plus a learned position embedding, dropout, pad
positions zeroed; then per block: ``Q = LN(h)``, ``h = Q + Attention(Q, h, h)`` with a causal mask,
``h = LN(h)``, ``h = h + FFN(h)`` (two position-wise linear maps with ReLU and dropout), pad positions zeroed;
a final LN. The scores of the next item are ``h_t @ E.T`` with the input embedding table ``E`` (tied weights).
Every parameter with two or more dimensions gets Xavier-uniform init, as the official ``initialize``; the pad
row is zero.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dualenc.recsys.data import PAD

SASREC_CITATION = """@inproceedings{kang2018sasrec,
  title = {Self-Attentive Sequential Recommendation}, author = {Kang, Wang-Cheng and McAuley, Julian},
  booktitle = {IEEE International Conference on Data Mining (ICDM)}, pages = {197--206}, year = {2018}}"""


class PointWiseFeedForward(nn.Module):
    """``x + Dropout(W2 ReLU(Dropout(W1 x)))`` per position (the official kernel-1 Conv1d is a Linear)."""

    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(hidden, hidden)
        self.linear2 = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.dropout(self.linear2(self.dropout(torch.relu(self.linear1(x)))))  # (B, L, D)


class SASRec(nn.Module):
    """Causal transformer over left-padded item sequences; item 0 is padding.

    Args:
        num_items: C, catalog size; the item table has C + 1 rows (row 0 = padding).
        maxlen: L, sequence length (learned positions 0..L-1; sequences are right-aligned).
        hidden: D, embedding size (paper: 64).
        num_blocks: transformer blocks (paper: 2).
        num_heads: attention heads (paper: 1).
        dropout: dropout on embeddings, attention weights and the feed-forward maps (paper: 0.3).
        generator: source of the initial weights (Xavier-uniform; biases of linear maps uniform in
            +-1/sqrt(fan_in) as torch's default); None = the global RNG.

    Shapes:
        forward: inputs (B, L) int64 -> hidden states (B, L, D).
        score_last: inputs (B, L) -> (B, C + 1) scores of every item for the next position.

    References:
        Kang & McAuley, ICDM 2018 (``SASREC_CITATION``); Mezentsev et al., RecSys 2024, code ``model.py``.
    """

    def __init__(
        self,
        num_items: int,
        maxlen: int,
        hidden: int = 64,
        num_blocks: int = 2,
        num_heads: int = 1,
        dropout: float = 0.3,
        *,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.maxlen = maxlen
        self.item_emb = nn.Embedding(num_items + 1, hidden, padding_idx=PAD)
        self.pos_emb = nn.Embedding(maxlen, hidden)
        self.emb_dropout = nn.Dropout(dropout)
        self.attention_norms = nn.ModuleList(nn.LayerNorm(hidden, eps=1e-8) for _ in range(num_blocks))
        self.attentions = nn.ModuleList(
            nn.MultiheadAttention(hidden, num_heads, dropout=dropout, batch_first=True)
            for _ in range(num_blocks)
        )
        self.forward_norms = nn.ModuleList(nn.LayerNorm(hidden, eps=1e-8) for _ in range(num_blocks))
        self.forward_layers = nn.ModuleList(PointWiseFeedForward(hidden, dropout) for _ in range(num_blocks))
        self.last_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Xavier-uniform for weights with >= 2 dims, torch-default uniform for linear biases, zero pad row.

        Attention biases stay 0 and layer norms stay (1, 0), as after torch's own init.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                bound = 1.0 / math.sqrt(module.in_features)
                module.bias.uniform_(-bound, bound, generator=generator)
        for param in self.parameters():
            if param.dim() >= 2:
                nn.init.xavier_uniform_(param, generator=generator)
        self.item_emb.weight[PAD].zero_()

    @property
    def item_table(self) -> Tensor:
        """The (C + 1, D) item table: input embeddings and output classifier at once (tied)."""
        return self.item_emb.weight

    def forward(self, inputs: Tensor) -> Tensor:
        """Hidden state of every position; position t sees only items at positions <= t."""
        length = inputs.shape[1]
        if length > self.maxlen:
            raise ValueError(f"sequence length {length} exceeds maxlen={self.maxlen}")
        keep = (inputs != PAD).unsqueeze(-1)  # (B, L, 1)
        positions = torch.arange(
            self.maxlen - length, self.maxlen, device=inputs.device
        )  # (L,) right-aligned
        h = self.item_emb(inputs) * self.item_emb.embedding_dim**0.5 + self.pos_emb(positions)  # (B, L, D)
        h = self.emb_dropout(h) * keep  # (B, L, D)
        causal = torch.ones(length, length, dtype=torch.bool, device=inputs.device).triu(
            1
        )  # (L, L) True = hidden
        for attn_norm, attention, ff_norm, feed_forward in zip(
            self.attention_norms, self.attentions, self.forward_norms, self.forward_layers, strict=True
        ):
            query = attn_norm(h)  # (B, L, D)
            attended, _ = attention(query, h, h, attn_mask=causal, need_weights=False)  # (B, L, D)
            h = feed_forward(ff_norm(query + attended)) * keep  # (B, L, D)
        return self.last_norm(h)  # (B, L, D)

    def score_last(self, inputs: Tensor) -> Tensor:
        """Scores of every item (pad included, column 0) as the item after the last position."""
        return self(inputs)[:, -1] @ self.item_table.T  # (B, C + 1)
