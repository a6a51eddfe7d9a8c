"""Custom towers for the tests: importable by their dotted path (``custom_towers.X``) from the tests
folder."""

from __future__ import annotations

import torch
from torch import nn


class BagOfWords(nn.Module):
    """Mean of learned token embeddings, then a linear map. Shapes: (B, L) -> (B, dim)."""

    def __init__(self, vocab_size: int, dim: int = 8):
        super().__init__()
        self.vocab_size, self.dim = vocab_size, dim
        self.embed = nn.Embedding(vocab_size, dim)
        self.proj = nn.Linear(dim, dim)

    def get_config(self) -> dict:
        return {"vocab_size": self.vocab_size, "dim": self.dim}

    def forward(self, features) -> torch.Tensor:
        ids, mask = features["input_ids"], features["attention_mask"].float()  # (B, L), (B, L)
        tokens = self.embed(ids) * mask[..., None]  # (B, L, dim)
        return self.proj(tokens.sum(1) / mask.sum(1, keepdim=True))  # (B, dim)


class TiedBagOfWords(BagOfWords):
    """``BagOfWords`` with an output layer tied to the embedding (shared storage) and a non-float buffer."""

    def __init__(self, vocab_size: int, dim: int = 8):
        super().__init__(vocab_size, dim)
        self.out = nn.Linear(dim, vocab_size, bias=False)
        self.out.weight = self.embed.weight  # tied: one Parameter under two names
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, features) -> torch.Tensor:
        return super().forward(features) + self.out.weight[:1]  # (B, dim)


class NoConfig(nn.Module):
    """A tower without ``get_config``: cannot be saved."""

    dim = 4

    def __init__(self, vocab_size: int = 10):
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab_size, 4)

    def forward(self, features) -> torch.Tensor:
        return self.embed(features["input_ids"])  # (B, 4)


class Outer:
    class Nested(BagOfWords):
        """A nested (but importable) class: ``custom_towers.Outer.Nested``."""
