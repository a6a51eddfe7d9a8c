"""The names a model is configured with, checked in one place: poolings and weight/storage dtypes."""

from __future__ import annotations

import torch

from dualenc.errors import InputError

POOLINGS = ("cls", "mean")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_pooling(pooling: str) -> str:
    """``pooling`` itself if it is one of :data:`POOLINGS`; otherwise one clear :class:`InputError`."""
    if pooling not in POOLINGS:
        raise InputError(f"unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")
    return pooling


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Map ``"float32" | "bfloat16" | "float16"`` (or a ``torch.dtype``, or None) to a ``torch.dtype``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in TORCH_DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; expected one of {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[dtype]
