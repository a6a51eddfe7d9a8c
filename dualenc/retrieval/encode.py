"""Texts -> vectors with a ``DualEncoder``'s query or document tower, in memory.

Texts are sorted by length (longest first) so each batch pads to similar lengths; the output keeps the input
order. Encoding a whole collection into an embeddings directory (sharded, resumable) is
``dualenc.retrieval.encode_to_disk``; :func:`encoder_identity` is what such a directory records of the model
that made it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dualenc.errors import InputError


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or device.type == "cpu":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def encode_texts(
    model,
    texts: Sequence[str],
    *,
    kind: str = "doc",
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    on_batch: Callable[[int], object] | None = None,
) -> np.ndarray:
    """Encode ``texts`` with the query (``kind='query'``) or document tower, length-sorted, in input order.

    Args:
        model: a :class:`dualenc.model.encoder.DualEncoder` (or anything with its ``tokenize_*`` and
            ``encode_*`` methods).
        texts: the strings to encode.
        kind: ``"query"`` or ``"doc"``.
        batch_size: texts per forward pass.
        device: where the model runs (the model must already be there).
        autocast_dtype: e.g. ``torch.bfloat16`` for mixed precision on GPU; ignored on CPU.
        progress: show a tqdm bar.
        on_batch: called with the number of texts after each batch (e.g. an outer progress bar's ``update``).

    Returns:
        float32 array (len(texts), D).
    """
    if kind not in ("query", "doc"):
        raise ValueError(f"kind must be 'query' or 'doc', got {kind!r}")
    tokenize = model.tokenize_queries if kind == "query" else model.tokenize_docs
    encode = model.encode_queries if kind == "query" else model.encode_docs
    device = torch.device(device)
    order = np.argsort([-len(t) for t in texts], kind="stable")  # longest first: similar lengths per batch
    out: np.ndarray | None = None
    for start in tqdm(
        range(0, len(texts), batch_size),
        disable=not progress,
        desc="encode queries" if kind == "query" else "encode docs",
        leave=False,
    ):
        rows = order[start : start + batch_size]
        features = tokenize([texts[i] for i in rows]).to(device)
        with _autocast(device, autocast_dtype):
            vectors = encode(features)  # (b, D)
        vectors = vectors.float().cpu().numpy()
        if not np.isfinite(vectors).all():
            raise FloatingPointError(f"non-finite embedding for text {texts[rows[0]]!r}…")
        if out is None:
            out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
        out[rows] = vectors
        if on_batch is not None:
            on_batch(len(rows))
    if out is None:
        raise InputError("nothing to encode (no texts)")
    return out


def model_fingerprint(model: torch.nn.Module) -> str:
    """A cheap identity of a model's current weights: a hash of every parameter's sum and sum of squares,
    computed on the CPU in float64 so that the same weights give the same fingerprint on any device."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            values = param.detach().to(device="cpu", dtype=torch.float64)
            total, squares = float(values.sum()), float((values * values).sum())
            digest.update(f"{name}:{tuple(param.shape)}:{total:.12e}:{squares:.12e}".encode())
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """``<class>:<hash of the vocabulary>``: the same for a tokenizer wherever its files are loaded from."""
    if tokenizer is None:
        return "none"
    try:
        vocab = sorted(tokenizer.get_vocab().items())
    except (AttributeError, NotImplementedError):
        vocab = [("len", len(tokenizer))] if hasattr(tokenizer, "__len__") else []
    digest = hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:12]
    return f"{type(tokenizer).__name__}:{digest}"


def encoder_identity(model, kind: str, model_id: str | None = None) -> dict:
    """What turns a text into this model's ``kind`` vector: weights, tokenizer, length, prefix, pooling.

    Two encodes with equal identities give the same vectors for the same texts (up to batch-size noise), so
    an embeddings directory records it and refuses to resume or reuse rows made with another (see
    ``dualenc.retrieval.encode_to_disk``). ``model_id`` replaces :func:`model_fingerprint` when given.
    """
    config = getattr(model, "config", None)
    side = "query" if kind == "query" else "passage"
    tokenizer = getattr(model, "tokenizer" if kind == "query" else "doc_tokenizer", None)
    return {
        "model_fingerprint": model_id or model_fingerprint(model),
        "tokenizer": tokenizer_fingerprint(tokenizer or getattr(model, "tokenizer", None)),
        f"{side}_max_len": getattr(config, f"{side}_max_len", None),
        f"{side}_prefix": getattr(config, f"{side}_prefix", None),
        "pooling": getattr(config, "pooling", None),
        "normalize": getattr(config, "normalize", None),
    }
