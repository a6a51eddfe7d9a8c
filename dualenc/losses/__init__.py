"""Losses over embeddings (in-batch, negative-cache and scalable cross-entropy, sampled baselines), each an
``nn.Module`` or function of vectors only. The same layer as dualenc.model: it imports only dualenc.io and
dualenc.errors."""

from __future__ import annotations

from dualenc.losses.base import CacheTerms, LossInputs, LossOutput, Temperature, false_negative_mask
from dualenc.losses.cached import CachedCE, reference_surrogate
from dualenc.losses.dense import blockwise_topk, check_inputs, full_ce
from dualenc.losses.inbatch import InBatchCE
from dualenc.losses.sampled import bce_loss, ce_minus_loss, gbce_beta, gbce_loss, gbce_positive_logit
from dualenc.losses.sce import Buckets, ScalableCE, bucketed_ce, default_bucket_count
from dualenc.losses.sce_config import SCEConfig
from dualenc.losses.table_sce import TableSCE
from dualenc.losses.uniform_negatives import sample_uniform, sample_unseen

__all__ = [
    "Buckets",
    "CacheTerms",
    "CachedCE",
    "InBatchCE",
    "LossInputs",
    "LossOutput",
    "SCEConfig",
    "ScalableCE",
    "TableSCE",
    "Temperature",
    "bce_loss",
    "blockwise_topk",
    "bucketed_ce",
    "ce_minus_loss",
    "check_inputs",
    "default_bucket_count",
    "false_negative_mask",
    "full_ce",
    "gbce_beta",
    "gbce_loss",
    "gbce_positive_logit",
    "reference_surrogate",
    "sample_uniform",
    "sample_unseen",
]
