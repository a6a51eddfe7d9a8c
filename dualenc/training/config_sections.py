"""The sections of a training config. Every field: type, default, unit and help text, nothing else.

Loaded and validated by :mod:`dualenc.training.config`; names follow Tevatron / Hugging Face where the meaning is the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dualenc.model.options import POOLINGS, TORCH_DTYPES

DTYPES = tuple(TORCH_DTYPES)
TRAIN_FORMATS = ("auto", "tevatron", "groups", "triples", "qrels")
LOSSES = ("inbatch", "cache", "cache_ce", "sce")
CACHE_MODES = ("corpus", "stream")
MIXED_PRECISION = ("no", "bf16", "fp16")
TRACKERS = ("none", "tensorboard")


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(str, choices))}")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


@dataclass
class ModelConfig:
    """The two towers."""

    model_name_or_path: str = field(
        default="",
        metadata={"help": "dualenc / sentence-transformers / Hugging Face model dir to start from"},
    )
    pooling: str | None = field(
        default=None,
        metadata={"help": "cls | mean; null = what the model dir says (cls for a plain HF model)"},
    )
    normalize: bool | None = field(
        default=None,
        metadata={"help": "L2-normalise embeddings; null = what the model dir says (false for HF)"},
    )
    untie_encoder: bool = field(
        default=False, metadata={"help": "separate query and passage towers (Tevatron)"}
    )
    query_max_len: int | None = field(
        default=None, metadata={"help": "query truncation, tokens; null = model's"}
    )
    passage_max_len: int | None = field(
        default=None, metadata={"help": "passage truncation, tokens; null = model's"}
    )
    query_prefix: str | None = field(
        default=None, metadata={"help": 'text prepended to queries, e.g. "query: "'}
    )
    passage_prefix: str | None = field(default=None, metadata={"help": "text prepended to passages"})
    dtype: str = field(default="float32", metadata={"help": "weight dtype: float32 | bfloat16 | float16"})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute activations in backward"}
    )
    random_init: bool = field(
        default=False,
        metadata={
            "help": "ignore model_name_or_path: a randomly initialised BERT (sizes below) with a WordPiece "
            "vocabulary trained on the training texts (tests, smoke runs)"
        },
    )
    random_hidden_size: int = field(default=32, metadata={"help": "random BERT: hidden size"})
    random_num_layers: int = field(default=2, metadata={"help": "random BERT: transformer layers"})
    random_num_heads: int = field(default=2, metadata={"help": "random BERT: attention heads"})
    random_intermediate_size: int = field(default=64, metadata={"help": "random BERT: feed-forward size"})
    random_vocab_size: int = field(default=2000, metadata={"help": "random BERT: WordPiece vocabulary size"})
    random_dropout: float = field(default=0.1, metadata={"help": "random BERT: hidden and attention dropout"})

    def __post_init__(self) -> None:
        if self.pooling is not None:
            _choice("pooling", self.pooling, POOLINGS)
        _choice("dtype", self.dtype, DTYPES)
        if not self.random_init and not self.model_name_or_path:
            raise ValueError("set model_name_or_path (or random_init=true)")
        for name in ("query_max_len", "passage_max_len"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))


@dataclass
class DataConfig:
    """Training and dev data (see dualenc/training/formats.py for the formats)."""

    train_file: str | None = field(
        default=None,
        metadata={"help": "Tevatron JSONL groups, id groups JSONL (dualenc mine) or triples TSV"},
    )
    train_format: str = field(default="auto", metadata={"help": "auto | tevatron | groups | triples | qrels"})
    corpus_file: str | None = field(
        default=None, metadata={"help": "collection (.tsv / BEIR .jsonl) for id data"}
    )
    queries_file: str | None = field(default=None, metadata={"help": "training queries (.tsv / .jsonl)"})
    qrels_file: str | None = field(
        default=None, metadata={"help": "training qrels (format qrels: positives)"}
    )
    min_relevance: int = field(default=1, metadata={"help": "qrels grade that counts as a positive"})
    train_group_size: int = field(
        default=1,
        metadata={"help": "documents per query: 1 positive + (train_group_size - 1) hard negatives"},
    )
    dev_corpus_file: str | None = field(
        default=None, metadata={"help": "dev collection for evaluation in training"}
    )
    dev_topics_file: str | None = field(default=None, metadata={"help": "dev queries"})
    dev_qrels_file: str | None = field(default=None, metadata={"help": "dev qrels"})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})
    datasets_cache_dir: str | None = field(
        default=None, metadata={"help": "Arrow cache dir (null = datasets')"}
    )

    def __post_init__(self) -> None:
        _choice("train_format", self.train_format, TRAIN_FORMATS)
        _positive("train_group_size", self.train_group_size)
        dev = [self.dev_corpus_file, self.dev_topics_file, self.dev_qrels_file]
        if any(dev) and not all(dev):
            raise ValueError(
                "dev evaluation needs dev_corpus_file, dev_topics_file and dev_qrels_file together"
            )


@dataclass
class TrainConfig:
    """Optimisation, schedule, precision, checkpoints, logging."""

    output_dir: str = field(
        default="outputs/run", metadata={"help": "run directory: checkpoints, logs, models"}
    )
    seed: int = field(default=42, metadata={"help": "seed of model init, data order, sampling"})
    per_device_train_batch_size: int = field(
        default=32, metadata={"help": "queries per process per micro-batch"}
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "micro-batches per optimizer step (negatives stay per micro-batch)"}
    )
    learning_rate: float = field(default=2e-5, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(
        default=0.01, metadata={"help": "AdamW weight decay (not on biases/LayerNorm)"}
    )
    num_train_epochs: float = field(default=1.0, metadata={"help": "epochs over the query groups"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; > 0 overrides num_train_epochs"})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "transformers.get_scheduler name"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of steps for linear warmup"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm; 0 = off"})
    mixed_precision: str = field(default="no", metadata={"help": "no | bf16 | fp16 (Accelerate autocast)"})
    logging_steps: int = field(default=10, metadata={"help": "log every N optimizer steps"})
    save_steps: int = field(default=0, metadata={"help": "checkpoint every N steps; 0 = only at the end"})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints kept (oldest deleted); 0 = all"})
    eval_steps: int = field(
        default=0, metadata={"help": "evaluate on the dev set every N steps; 0 = at the end"}
    )
    eval_measure: str = field(
        default="nDCG@10", metadata={"help": "ir-measures string used to pick the best model"}
    )
    eval_batch_size: int = field(default=128, metadata={"help": "texts per forward pass in evaluation"})
    resume_from: str | None = field(default=None, metadata={"help": '"latest" or a checkpoint dir'})
    report_to: str = field(default="none", metadata={"help": "none | tensorboard (Accelerate trackers)"})
    cpu: bool = field(default=False, metadata={"help": "force CPU even when a GPU is present"})

    def __post_init__(self) -> None:
        _choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _choice("report_to", self.report_to, TRACKERS)
        for name in (
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "learning_rate",
            "logging_steps",
        ):
            _positive(name, getattr(self, name))
        for name in (
            "save_steps",
            "eval_steps",
            "save_total_limit",
            "warmup_ratio",
            "max_grad_norm",
            "weight_decay",
        ):
            _positive(name, getattr(self, name), allow_zero=True)
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("set max_steps > 0 or num_train_epochs > 0")


@dataclass
class LossConfig:
    """Which loss, and its temperature."""

    loss: str = field(
        default="inbatch",
        metadata={
            "help": "inbatch: softmax CE over in-batch + hard negatives; cache: + negatives sampled from the "
            "negative cache (section cache); cache_ce: exact softmax over the whole cached table as constants; "
            "sce: Scalable CE over the cached table (section sce), the memory-light cache_ce"
        },
    )
    temperature: float = field(default=1.0, metadata={"help": "scores are q.d / temperature (Tevatron)"})
    learn_temperature: bool = field(
        default=False, metadata={"help": "learn log(1/temperature), start at the above"}
    )
    negatives_x_device: bool = field(
        default=True,
        metadata={"help": "use every process's documents as negatives (all-gather with gradients)"},
    )
    mask_false_negatives: bool = field(
        default=True, metadata={"help": "mask in-batch documents that are known positives of the query"}
    )

    def __post_init__(self) -> None:
        _choice("loss", self.loss, LOSSES)
        _positive("temperature", self.temperature)

    def validate(self, cfg: Any) -> None:
        """Checks that need other sections."""
        if self.loss != "inbatch" and cfg.cache.cache_mode == "stream" and cfg.cache.cache_size < 1:
            raise ValueError("cache_mode=stream needs cache_size >= 1")
        if self.loss == "cache_ce" and cfg.cache.cache_candidates != "dense":
            raise ValueError("loss=cache_ce is the exact softmax over every slot: use cache_candidates=dense")
        if self.loss == "sce" and (cfg.cache.cache_mode != "corpus" or cfg.cache.cache_dtype != "float32"):
            raise ValueError(
                "loss=sce needs cache_mode=corpus (each positive must have a slot in the table) and "
                "cache_dtype=float32"
            )


@dataclass
class CacheConfig:
    """The negative cache (Lindgren et al., NeurIPS 2021; ALGORITHMS.md A1-A4). Used by the losses cache, cache_ce, sce."""

    cache_mode: str = field(
        default="corpus",
        metadata={
            "help": "corpus: one slot per training-corpus document, filled by an encode pass before training; "
            "stream: a FIFO of the most recent batch documents (cache_size slots)"
        },
    )
    cache_size: int = field(default=65_536, metadata={"help": "stream mode: slots over all processes"})
    cache_dtype: str = field(
        default="float32", metadata={"help": "float32 | bfloat16 | float16 table storage"}
    )
    refresh_fraction: float = field(
        default=0.01,
        metadata={
            "help": "corpus mode: fraction of the table re-encoded (globally oldest first) per optimizer step"
        },
    )
    num_cache_negatives: int = field(
        default=1, metadata={"help": "negatives sampled from the cache per query"}
    )
    cache_sample_with_replacement: bool = field(
        default=True, metadata={"help": "independent Gumbel-max draws (true) or Gumbel-top-m distinct draws"}
    )
    cache_inbatch: bool = field(
        default=True,
        metadata={"help": "keep the batch's documents as exact negatives (false = the reference loss)"},
    )
    cache_lru: bool = field(
        default=True, metadata={"help": "stream mode: a sampled negative's write-back renews it"}
    )
    cache_fill_batch_size: int = field(default=128, metadata={"help": "texts per forward pass when filling"})
    cache_candidates: str = field(
        default="dense",
        metadata={
            "help": "dense: score every slot; sce: only the slots of SCE buckets (section sce: sce_n_buckets, "
            "sce_bucket_size_x, sce_bucket_size_y, sce_mix), for tables too large to score densely"
        },
    )
    cache_score_block_size: int = field(
        default=65_536, metadata={"help": "slots scored at once when sampling (memory O(queries x block))"}
    )

    def __post_init__(self) -> None:
        _choice("cache_mode", self.cache_mode, CACHE_MODES)
        _choice("cache_dtype", self.cache_dtype, DTYPES)
        _choice("cache_candidates", self.cache_candidates, ("dense", "sce"))
        if not 0 <= self.refresh_fraction <= 1:
            raise ValueError(f"refresh_fraction={self.refresh_fraction} must be in [0, 1]")
        _positive("num_cache_negatives", self.num_cache_negatives)
        _positive("cache_fill_batch_size", self.cache_fill_batch_size)
        _positive("cache_score_block_size", self.cache_score_block_size)


@dataclass
class SCEConfig:
    """Scalable Cross-Entropy over the cached table (Mezentsev et al., RecSys 2024; ALGORITHMS.md A5). loss=sce."""

    sce_n_buckets: int = field(
        default=0, metadata={"help": "n_b bucket centres per step; 0 = int(2 sqrt(queries))"}
    )
    sce_bucket_size_x: int = field(
        default=0, metadata={"help": "b_x queries per bucket; 0 = int(2 sqrt(queries))"}
    )
    sce_bucket_size_y: int = field(
        default=256, metadata={"help": "b_y table rows per bucket (paper grid 64-4096)"}
    )
    sce_mix: bool = field(default=False, metadata={"help": "Mix centres: random combinations of the queries"})
    sce_block_size: int = field(
        default=65_536, metadata={"help": "table rows scored at once when picking items"}
    )

    def __post_init__(self) -> None:
        for name in ("sce_n_buckets", "sce_bucket_size_x"):
            _positive(name, getattr(self, name), allow_zero=True)
        _positive("sce_bucket_size_y", self.sce_bucket_size_y)
        _positive("sce_block_size", self.sce_block_size)
