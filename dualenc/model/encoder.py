"""``DualEncoder``: query and document towers (one shared or two separate) with their tokenizer(s).

The towers are ``Encoder`` modules (``dualenc.model.towers``): ``HFEncoder`` or any custom module. Texts are
prefixed, truncated and padded here (``tokenize_queries`` / ``tokenize_docs``) and encoded by the matching
tower. ``save_pretrained`` / ``from_pretrained`` write and read the model directory of
``dualenc.model.model_dir`` (with ``HFEncoder`` towers, ``sentence_transformers.SentenceTransformer`` loads it
too). No loss and no distributed code live here.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Mapping
from os import PathLike
from typing import Any

import torch
from torch import Tensor, nn

from dualenc.errors import InputError
from dualenc.model.config import DualEncoderConfig, make_config
from dualenc.model.custom_tower import tower_spec
from dualenc.model.model_card import card_folder, model_card
from dualenc.model.model_dir import load_tower, read_model_dir, write_model_dir
from dualenc.model.towers import HFEncoder

logger = logging.getLogger(__name__)


class DualEncoder(nn.Module):
    """Query and document towers (shared or separate) with their tokenizer(s).

    Args:
        query_encoder: an ``Encoder`` module for queries (and documents when ``doc_encoder`` is None).
        doc_encoder: a separate document tower, or None for one shared tower (the same module object).
        tokenizer: a ``transformers`` tokenizer for queries (and documents unless ``doc_tokenizer`` is given).
        config: pooling/normalize/lengths/prefixes; ``config.shared`` is set from the towers given.
        doc_tokenizer: a separate document tokenizer, if any.
    """

    def __init__(
        self,
        query_encoder: nn.Module,
        doc_encoder: nn.Module | None,
        tokenizer: Any,
        config: DualEncoderConfig,
        doc_tokenizer: Any = None,
    ):
        super().__init__()
        shared = doc_encoder is None or doc_encoder is query_encoder
        self.config = dataclasses.replace(config, shared=shared)
        self.query_encoder = query_encoder
        if not shared:
            # registered only when separate, so parameters and state_dict hold a shared tower once; set in
            # _modules directly because the ``doc_encoder`` property below shadows the attribute
            self._modules["doc_encoder"] = doc_encoder
        for name, tower in (("query", query_encoder), ("doc", self.doc_encoder)):
            if not isinstance(tower, HFEncoder):
                continue
            if (tower.pooling, tower.normalize) != (config.pooling, config.normalize):
                raise InputError(
                    f"config says pooling={config.pooling!r}, normalize={config.normalize} but the {name} "
                    f"encoder has pooling={tower.pooling!r}, normalize={tower.normalize}"
                )
        self.tokenizer = tokenizer
        self.doc_tokenizer = tokenizer if doc_tokenizer is None else doc_tokenizer

    @property
    def doc_encoder(self) -> nn.Module:  # a property so the shared case returns the very same module object
        """The document tower (``query_encoder`` itself when shared)."""
        return self._modules.get("doc_encoder", self.query_encoder)

    @property
    def shared(self) -> bool:
        """True when queries and documents go through the same module."""
        return self.config.shared

    @property
    def dim(self) -> int:
        """Embedding dimension D (the towers' ``dim`` attribute)."""
        dim = getattr(self.query_encoder, "dim", None)
        if dim is None:
            raise TypeError(
                f"{type(self.query_encoder).__name__} has no `dim` attribute; add one to report D"
            )
        return int(dim)

    def encode_queries(self, features: Mapping[str, Tensor]) -> Tensor:
        """Shapes: features (B, Lq) -> (B, D)."""
        return self.query_encoder(features)

    def encode_docs(self, features: Mapping[str, Tensor]) -> Tensor:
        """Shapes: features (B, Ld) -> (B, D)."""
        return self.doc_encoder(features)

    def forward(
        self, query: Mapping[str, Tensor] | None = None, doc: Mapping[str, Tensor] | None = None
    ) -> tuple[Tensor | None, Tensor | None]:
        """Encode queries and/or documents in one call (so DDP wrappers see a forward); (q_emb, d_emb)."""
        q_emb = None if query is None else self.encode_queries(query)  # (B, D)
        d_emb = None if doc is None else self.encode_docs(doc)  # (B*G, D)
        return q_emb, d_emb

    def tokenize_queries(self, texts: list[str]):
        """Tokenize queries: prefix, truncate to ``query_max_len`` tokens, pad; ``BatchEncoding`` (B, Lq)."""
        return tokenize_texts(self.tokenizer, texts, self.config.query_prefix, self.config.query_max_len)

    def tokenize_docs(self, texts: list[str]):
        """Tokenize documents: prefix, truncate to ``passage_max_len`` tokens, pad; returns (B, Ld)."""
        return tokenize_texts(
            self.doc_tokenizer, texts, self.config.passage_prefix, self.config.passage_max_len
        )

    def gradient_checkpointing_enable(self) -> None:
        """Enable gradient checkpointing on every tower that supports it."""
        for tower in {id(t): t for t in (self.query_encoder, self.doc_encoder)}.values():
            if hasattr(tower, "gradient_checkpointing_enable"):
                tower.gradient_checkpointing_enable()

    def check_saveable(self) -> None:
        """Raise ``TypeError`` (naming the class and the fix) if a custom tower cannot be saved and reloaded.

        ``save_pretrained`` runs this first; call it before a long training run to fail early.
        """
        for tower in (self.query_encoder, self.doc_encoder):
            if not isinstance(tower, HFEncoder):
                tower_spec(tower)

    def save_pretrained(self, path: str | PathLike, *, training: Mapping[str, Any] | None = None) -> None:
        """Write the model directory atomically (layout in ``dualenc.model.model_dir``), with its model card.

        Each tower becomes a sentence-transformers folder (``HFEncoder``) or a custom tower folder
        (``dualenc.model.custom_tower``; its class needs ``get_config`` and an importable module). The card,
        ``README.md`` (``dualenc.model.model_card``), appears with the rest of the folder; ``training`` (from
        ``dualenc.model.model_card.training_facts``) adds how the model was trained.
        """
        self.check_saveable()
        towers, tokenizers = (self.query_encoder, self.doc_encoder), (self.tokenizer, self.doc_tokenizer)
        with card_folder(path, model_card(self, path, training)) as folder:
            write_model_dir(folder, self.config, towers, tokenizers)

    @classmethod
    def from_pretrained(
        cls, path: str | PathLike, *, dtype: str | torch.dtype | None = None, **config_overrides: Any
    ) -> DualEncoder:
        """Load a dualenc dir, a sentence-transformers dir, or a plain HF model dir (defaults + overrides).

        A tower folder with a ``tower.json`` is a custom tower (``dualenc.model.custom_tower``): its class is
        imported, so its module must be importable here (installed, or on ``PYTHONPATH``).

        Args:
            path: a local directory, or ``pkg:<package>/<sub dir>``
                (see ``dualenc.model.model_dir.resolve_model_path``).
            dtype: ``"float32" | "bfloat16" | "float16"`` or a ``torch.dtype``; None keeps the saved dtype.
            **config_overrides: ``DualEncoderConfig`` fields that replace the saved or detected values.
        """
        found = read_model_dir(path, config_overrides)
        model = cls._from_dirs(found.query_dir, found.doc_dir, found.config, dtype)
        logger.info("loaded %s from %s", found.config, found.root)
        return model

    @classmethod
    def from_hf(
        cls,
        model_name_or_path: str | PathLike,
        *,
        separate: bool = False,
        dtype: str | torch.dtype | None = None,
        **config: Any,
    ) -> DualEncoder:
        """Towers from any HF model (local dir or hub name); separate towers start as equal copies."""
        if "shared" in config:
            raise InputError("use separate=True/False instead of shared= in from_hf")
        return cls._from_dirs(
            model_name_or_path, None, make_config({**config, "shared": not separate}), dtype
        )

    @classmethod
    def _from_dirs(
        cls,
        query_dir: str | PathLike,
        doc_dir: str | PathLike | None,
        config: DualEncoderConfig,
        dtype: str | torch.dtype | None,
    ) -> DualEncoder:
        """Towers and tokenizers from one dir (shared, or copied when ``config.shared`` is False) or two."""
        from transformers import AutoTokenizer

        query_encoder = load_tower(query_dir, config, dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(query_dir))
        if doc_dir is not None:
            doc_encoder = load_tower(doc_dir, config, dtype)
            doc_tokenizer = AutoTokenizer.from_pretrained(str(doc_dir))
        else:
            doc_encoder = None if config.shared else copy.deepcopy(query_encoder)
            doc_tokenizer = None
        return cls(query_encoder, doc_encoder, tokenizer, config, doc_tokenizer=doc_tokenizer)


def tokenize_texts(tokenizer: Any, texts: list[str], prefix: str, max_len: int):
    """Prefix, truncate to ``max_len`` tokens and pad ``texts``; returns PyTorch tensors (B, L)."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of strings")
    return tokenizer(
        [prefix + t for t in texts], padding=True, truncation=True, max_length=max_len, return_tensors="pt"
    )
