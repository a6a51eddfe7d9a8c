"""The sections of a training config: each field's type, default and help text (with its unit), and the checks
of its values. The ``cache`` and ``sce`` sections live with what they configure
(:mod:`dualenc.negcache.config`, :mod:`dualenc.losses.sce_config`). Names follow Tevatron / Hugging Face where
the meaning is the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dualenc.io.config_file import choice, help_field, positive
from dualenc.losses.base import MAX_SCALE
from dualenc.model.options import POOLINGS, TORCH_DTYPES
from dualenc.training.formats import TRAIN_FORMATS

DTYPES = tuple(TORCH_DTYPES)
LOSSES = ("inbatch", "cache", "cache_ce", "sce")
BATCH_SAMPLING = ("random", "no_duplicates")
MIXED_PRECISION = ("no", "bf16", "fp16")
# report_to name -> (module Accelerate imports, pip package)
TRACKER_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "comet_ml": ("comet_ml", "comet-ml"),
    "aim": ("aim", "aim"),
    "clearml": ("clearml", "clearml"),
    "dvclive": ("dvclive", "dvclive"),
}
TRACKERS = ("none", *TRACKER_PACKAGES)


@dataclass
class ModelConfig:
    """The two towers."""

    model_name_or_path: str = help_field(
        "", "dualenc / sentence-transformers / Hugging Face model dir to start from"
    )
    pooling: str | None = help_field(
        None, "cls | mean; null = what the model dir says (cls for a plain HF model)"
    )
    normalize: bool | None = help_field(
        None, "L2-normalise embeddings; null = what the model dir says (false for HF)"
    )
    untie_encoder: bool = help_field(False, "separate query and passage towers (Tevatron)")
    query_max_len: int | None = help_field(None, "query truncation, tokens; null = model's")
    passage_max_len: int | None = help_field(None, "passage truncation, tokens; null = model's")
    query_prefix: str | None = help_field(None, 'text prepended to queries, e.g. "query: "')
    passage_prefix: str | None = help_field(None, "text prepended to passages")
    dtype: str = help_field("float32", "weight dtype: float32 | bfloat16 | float16")
    gradient_checkpointing: bool = help_field(False, "recompute activations in backward")
    random_init: bool = help_field(
        False,
        "ignore model_name_or_path: a randomly initialised BERT (sizes below) with a WordPiece "
        "vocabulary trained on the training texts (tests, smoke runs)",
    )
    random_hidden_size: int = help_field(32, "random BERT: hidden size")
    random_num_layers: int = help_field(2, "random BERT: transformer layers")
    random_num_heads: int = help_field(2, "random BERT: attention heads")
    random_intermediate_size: int = help_field(64, "random BERT: feed-forward size")
    random_vocab_size: int = help_field(2000, "random BERT: WordPiece vocabulary size")
    random_dropout: float = help_field(0.1, "random BERT: hidden and attention dropout")

    def __post_init__(self) -> None:
        if self.pooling is not None:
            choice("pooling", self.pooling, POOLINGS)
        choice("dtype", self.dtype, DTYPES)
        if not self.random_init and not self.model_name_or_path:
            raise ValueError("set model_name_or_path (or random_init=true)")
        for name in ("query_max_len", "passage_max_len"):
            if getattr(self, name) is not None:
                positive(name, getattr(self, name))


@dataclass
class DataConfig:
    """Training and dev data (see dualenc/training/formats.py for the formats)."""

    train_file: str | None = help_field(
        None, "Tevatron JSONL groups, id groups JSONL (dualenc mine) or triples TSV"
    )
    train_format: str = help_field("auto", "auto | tevatron | groups | triples | qrels")
    corpus_file: str | None = help_field(None, "collection (.tsv / BEIR .jsonl) for id data")
    queries_file: str | None = help_field(None, "training queries (.tsv / .jsonl)")
    qrels_file: str | None = help_field(None, "training qrels (format qrels: positives)")
    min_relevance: int = help_field(1, "qrels grade that counts as a positive")
    corpus_columns: str | None = help_field(
        None,
        "TSV columns of corpus_file and dev_corpus_file, e.g. 'id,text,-' (- ignores a column); null: "
        "2 (id, text) or 3 (id, title, text) columns, or a header line",
    )
    train_group_size: int = help_field(
        1, "documents per query: 1 positive + (train_group_size - 1) hard negatives"
    )
    batch_sampling: str = help_field(
        "random",
        "random: each epoch a random order; no_duplicates: the same, reordered so that no global batch holds "
        "two queries with the same text or a shared positive (sentence-transformers' NO_DUPLICATES)",
    )
    dev_corpus_file: str | None = help_field(None, "dev collection for evaluation in training")
    dev_topics_file: str | None = help_field(None, "dev queries")
    dev_qrels_file: str | None = help_field(None, "dev qrels")
    dataloader_num_workers: int = help_field(0, "DataLoader worker processes")
    datasets_cache_dir: str | None = help_field(None, "Arrow cache dir (null = datasets')")

    def __post_init__(self) -> None:
        choice("train_format", self.train_format, TRAIN_FORMATS)
        choice("batch_sampling", self.batch_sampling, BATCH_SAMPLING)
        positive("train_group_size", self.train_group_size)
        dev = [self.dev_corpus_file, self.dev_topics_file, self.dev_qrels_file]
        if any(dev) and not all(dev):
            raise ValueError(
                "dev evaluation needs dev_corpus_file, dev_topics_file and dev_qrels_file together"
            )


@dataclass
class TrainConfig:
    """Optimisation, schedule, precision, checkpoints, logging."""

    output_dir: str = help_field("outputs/run", "run directory: checkpoints, logs, models")
    seed: int = help_field(42, "seed of model init, data order, sampling")
    per_device_train_batch_size: int = help_field(32, "queries per process per micro-batch")
    gradient_accumulation_steps: int = help_field(
        1, "micro-batches per optimizer step (negatives stay per micro-batch)"
    )
    grad_cache: bool = help_field(
        False,
        "GradCache (Gao et al. 2021): the whole micro-batch's loss, encoded and back-propagated in chunks "
        "(memory of one chunk, gradients of the large batch)",
    )
    grad_cache_query_chunk: int = help_field(32, "grad_cache: queries per forward/backward chunk")
    grad_cache_passage_chunk: int = help_field(32, "grad_cache: documents per forward/backward chunk")
    learning_rate: float = help_field(2e-5, "peak learning rate (AdamW)")
    weight_decay: float = help_field(0.01, "AdamW weight decay (not on biases/LayerNorm)")
    num_train_epochs: float = help_field(1.0, "epochs over the query groups")
    max_steps: int = help_field(-1, "optimizer steps; > 0 overrides num_train_epochs")
    lr_scheduler_type: str = help_field("linear", "transformers.get_scheduler name")
    warmup_ratio: float = help_field(0.1, "fraction of steps for linear warmup")
    max_grad_norm: float = help_field(1.0, "gradient clipping norm; 0 = off")
    mixed_precision: str = help_field("no", "no | bf16 | fp16 (Accelerate autocast)")
    logging_steps: int = help_field(10, "log every N optimizer steps")
    save_steps: int = help_field(0, "checkpoint every N steps; 0 = only at the end")
    save_total_limit: int = help_field(2, "checkpoints kept (oldest deleted); 0 = all")
    eval_steps: int = help_field(0, "evaluate on the dev set every N steps; 0 = at the end")
    eval_measure: str = help_field("nDCG@10", "ir-measures string used to pick the best model")
    eval_batch_size: int = help_field(128, "texts per forward pass in evaluation")
    resume_from: str | None = help_field(None, '"latest" or a checkpoint dir')
    report_to: str = help_field(
        "none",
        "none | tensorboard | wandb | mlflow | comet_ml | aim | clearml | dvclive (Accelerate trackers)",
    )
    cpu: bool = help_field(False, "force CPU even when a GPU is present")

    def __post_init__(self) -> None:
        choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        choice("report_to", self.report_to, TRACKERS)
        for name in (
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "grad_cache_query_chunk",
            "grad_cache_passage_chunk",
            "learning_rate",
            "logging_steps",
        ):
            positive(name, getattr(self, name))
        for name in (
            "save_steps",
            "eval_steps",
            "save_total_limit",
            "warmup_ratio",
            "max_grad_norm",
            "weight_decay",
        ):
            positive(name, getattr(self, name), allow_zero=True)
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("set max_steps > 0 or num_train_epochs > 0")


@dataclass
class LossConfig:
    """Which loss, and its temperature."""

    loss: str = help_field(
        "inbatch",
        "inbatch: softmax CE over in-batch + hard negatives; cache: + negatives sampled from the "
        "negative cache (section cache); cache_ce: exact softmax over the whole cached table as constants; "
        "sce: Scalable CE over the cached table (section sce), the memory-light cache_ce",
    )
    temperature: float = help_field(1.0, "scores are q.d / temperature (Tevatron)")
    learn_temperature: bool = help_field(False, "learn log(1/temperature), start at the above")
    negatives_x_device: bool = help_field(
        True, "use every process's documents as negatives (all-gather with gradients)"
    )
    mask_false_negatives: bool = help_field(
        True, "mask in-batch documents that are known positives of the query"
    )

    def __post_init__(self) -> None:
        choice("loss", self.loss, LOSSES)
        positive("temperature", self.temperature)
        low = 1.0 / MAX_SCALE  # a learned 1/τ is capped at MAX_SCALE: starting above it, it would not learn
        if self.learn_temperature and self.temperature < low:
            raise ValueError(f"learn_temperature=true needs temperature >= {low}, got {self.temperature}")

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
