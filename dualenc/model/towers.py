"""One tower: the ``Encoder`` protocol (tokens -> one vector per input) and ``HFEncoder``, its HF version.

``HFEncoder`` wraps any ``transformers`` AutoModel with CLS or mask-weighted mean pooling (Tevatron's
``pooling``/``normalize`` flags). ``dualenc.model.encoder.DualEncoder`` holds one or two towers; any module
that maps tokenized features to (B, D) plugs in as a tower. No loss and no distributed code live here.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from os import PathLike
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dualenc.model.options import check_pooling, resolve_dtype

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
        The pooled vectors, in the dtype of ``last_hidden`` (a mean over half types is summed in float32).

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
    """``from_pretrained`` kwargs: ``dtype=`` since transformers 4.56, ``torch_dtype=`` before."""
    resolved = resolve_dtype(dtype)
    if resolved is None:
        return {}
    import transformers
    from packaging.version import Version

    new_name = Version(transformers.__version__) >= Version("4.56")
    return {"dtype" if new_name else "torch_dtype": resolved}


class HFEncoder(nn.Module):
    """An ``Encoder`` over any ``transformers`` AutoModel: last hidden state -> pooled, optionally normalized.

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
