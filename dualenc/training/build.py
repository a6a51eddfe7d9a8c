"""The parts of a training run, built from its config: the Accelerator, the dual encoder, the loss, the
optimizer's parameter groups."""

from __future__ import annotations

import copy
import importlib.util
import itertools
import logging
import os
from pathlib import Path

from accelerate import Accelerator
from torch import nn

from dualenc.errors import InputError
from dualenc.losses.cached import CachedCE
from dualenc.losses.inbatch import InBatchCE
from dualenc.losses.table_sce import TableSCE
from dualenc.model import DualEncoder, DualEncoderConfig, HFEncoder
from dualenc.training.config import RunConfig
from dualenc.training.config_sections import TRACKER_PACKAGES, ModelConfig
from dualenc.training.process_exit import launched_processes

logger = logging.getLogger(__name__)


def check_tracker(report_to: str) -> None:
    """Refuse a tracker whose package is not installed (Accelerate would only warn and log nowhere)."""
    if report_to == "none":
        return
    module, package = TRACKER_PACKAGES[report_to]
    if importlib.util.find_spec(module) is None:
        raise InputError(f"report_to={report_to} needs the {package} package: pip install {package}")


def make_accelerator(cfg: RunConfig) -> Accelerator:
    """An Accelerator for ``cfg.train``; refuses a launcher/Accelerate mismatch that would train P copies.

    Gradient accumulation is done by the loop (``StepPlan``), not by Accelerate's step counter.
    """
    check_tracker(cfg.train.report_to)
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        cpu=cfg.train.cpu,
        log_with=None if cfg.train.report_to == "none" else cfg.train.report_to,
        project_dir=cfg.train.output_dir,
    )
    world = launched_processes()
    if world > 1 and accelerator.num_processes == 1:
        raise InputError(
            f"launched with WORLD_SIZE={world} but Accelerate set up a single process (on CPU add cpu=true; "
            "with GPUs use `accelerate launch --multi_gpu`)"
        )
    if accelerator.num_processes == 1 and "MASTER_PORT" in os.environ and "WORLD_SIZE" not in os.environ:
        # accelerate launch --num_processes N with --cpu (or without --multi_gpu) starts ONE process
        logger.warning(
            "a launcher asked for several processes but this run has ONE; `accelerate launch --cpu "
            "--num_processes N` starts a single process: use `torchrun --nproc_per_node N "
            "recipes/train.py ... cpu=true` on CPU, `accelerate launch --multi_gpu --num_processes N` on GPUs"
        )
    return accelerator


def check_processes(cfg: RunConfig, num_processes: int) -> None:
    """Refuse, before any data is read or encoded, what cannot run on ``num_processes`` processes."""
    if cfg.loss.loss == "sce" and num_processes > 1:
        raise InputError(
            f"loss=sce runs on one process (SCE over a table sharded over {num_processes} processes is not "
            "implemented); use loss=cache_ce (the exact softmax over the sharded table) or loss=cache"
        )


def build_loss(cfg: RunConfig) -> nn.Module:
    """The loss module of ``cfg.loss.loss`` (it owns the temperature)."""
    t, learn = cfg.loss.temperature, cfg.loss.learn_temperature
    if cfg.loss.loss == "sce":
        s = cfg.sce
        return TableSCE(
            t,
            learn,
            n_buckets=s.sce_n_buckets or None,
            bucket_size_x=s.sce_bucket_size_x or None,
            bucket_size_y=s.sce_bucket_size_y,
            mix=s.sce_mix,
            block_size=s.sce_block_size,
        )
    if cfg.loss.loss in ("cache", "cache_ce"):
        return CachedCE(t, learn, inbatch=cfg.cache.cache_inbatch, sampled=cfg.loss.loss == "cache")
    return InBatchCE(t, learn)


VOCAB_TEXTS = 200_000  # texts used to train a random model's WordPiece vocabulary


def build_model(cfg: ModelConfig, data, *, seed: int, init_dir: Path, accelerator) -> DualEncoder:
    """The dual encoder to train: loaded from ``model_name_or_path``, or a random BERT (``random_init``).

    A random model (and its WordPiece vocabulary, whose trainer breaks frequency ties arbitrarily) is built
    once by the main process and saved to ``init_dir``; every process, and every resumed run, loads that copy.
    """
    overrides = {
        name: getattr(cfg, name)
        for name in (
            "pooling",
            "normalize",
            "query_max_len",
            "passage_max_len",
            "query_prefix",
            "passage_prefix",
        )
        if getattr(cfg, name) is not None
    }
    if cfg.random_init:
        if accelerator.is_main_process and not (init_dir / "dualenc_config.json").exists():
            _random_model(cfg, data, overrides, seed).save_pretrained(init_dir)
        accelerator.wait_for_everyone()
        model = DualEncoder.from_pretrained(init_dir)
    else:
        model = DualEncoder.from_pretrained(
            cfg.model_name_or_path, dtype=cfg.dtype, shared=not cfg.untie_encoder, **overrides
        )
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    logger.info("model: %s, %d parameters", model.config, sum(p.numel() for p in model.parameters()))
    return model


def _random_model(cfg: ModelConfig, data, overrides: dict, seed: int) -> DualEncoder:
    from dualenc.model.random_bert import random_bert

    texts = itertools.chain(data.groups["query"], data.corpus["text"])
    bert, tokenizer = random_bert(
        itertools.islice(texts, VOCAB_TEXTS),
        vocab_size=cfg.random_vocab_size,
        hidden_size=cfg.random_hidden_size,
        num_layers=cfg.random_num_layers,
        num_heads=cfg.random_num_heads,
        intermediate_size=cfg.random_intermediate_size,
        dropout=cfg.random_dropout,
        seed=seed,
    )
    config = DualEncoderConfig(**{**overrides, "shared": not cfg.untie_encoder})
    tower = HFEncoder(bert, pooling=config.pooling, normalize=config.normalize)
    return DualEncoder(tower, copy.deepcopy(tower) if cfg.untie_encoder else None, tokenizer, config)


def optimizer_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices; not biases, LayerNorm weights or the temperature."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.dim() < 2 or "LayerNorm" in name or "norm" in name.lower() else decay).append(
            param
        )
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
