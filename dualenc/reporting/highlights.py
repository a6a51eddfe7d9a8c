"""A run's header in the report: the settings that matter from its ``config.yaml`` (model, loss, batch,
learning rate, steps, temperature, cache or SCE settings) and what made it (commit, machine) from its
summary."""

from __future__ import annotations

from typing import Any

from dualenc.reporting.run_files import RunFiles

# what the logged ``loss`` of each loss is (dualenc.losses): the value plotted as "training loss"
LOSS_NOTES = {
    "inbatch": "softmax cross-entropy over the batch's documents (in-batch and hard negatives)",
    "cache": (
        "cross-entropy over [positive, the batch's documents, one lumped logit for the cache's rest]: "
        "its value is the interpretable -log p+ (p_pos), its gradient from negatives sampled from the cache"
    ),
    "cache_ce": (
        "cross-entropy over [positive, the batch's documents, one lumped logit for the cache's rest]: "
        "its value is the interpretable -log p+ (p_pos), its gradient from the rest's softmax-weighted mean "
        "embedding"
    ),
    "sce": "scalable cross-entropy over bucketed candidates of the cached table (coverage: rows in a bucket)",
}
CACHE_KEYS = (
    "cache_mode",
    "cache_size",
    "refresh_fraction",
    "num_cache_negatives",
    "cache_inbatch",
    "cache_candidates",
    "cache_dtype",
)
SCE_KEYS = ("sce_n_buckets", "sce_bucket_size_x", "sce_bucket_size_y", "sce_mix")


def _model(model: dict[str, Any]) -> str:
    if model.get("random_init"):
        return (
            f"random BERT ({model.get('random_num_layers', '?')} layers, hidden "
            f"{model.get('random_hidden_size', '?')}, vocabulary {model.get('random_vocab_size', '?')})"
        )
    text = str(model.get("model_name_or_path") or "?")
    extras = [f"{k} {model[k]}" for k in ("pooling", "normalize") if model.get(k) is not None]
    extras += ["untied towers"] if model.get("untie_encoder") else []
    lengths = [model.get("query_max_len"), model.get("passage_max_len")]
    if any(v is not None for v in lengths):
        extras.append("max length query {} / passage {} tokens".format(*(v or "model's" for v in lengths)))
    return text + (f" ({', '.join(extras)})" if extras else "")


def _data(data: dict[str, Any]) -> str:
    files = [str(data[k]) for k in ("train_file", "corpus_file", "queries_file", "qrels_file") if data.get(k)]
    return f"{data.get('train_format', '?')}: {', '.join(files) or '?'}"


def _steps(train: dict[str, Any]) -> str:
    max_steps = train.get("max_steps")
    if isinstance(max_steps, int) and max_steps > 0:
        return f"{max_steps} optimizer steps"
    return f"{train.get('num_train_epochs', '?')} epochs"


def _batch(cfg: dict[str, dict[str, Any]]) -> str:
    train, data = cfg.get("train", {}), cfg.get("data", {})
    text = (
        f"{train.get('per_device_train_batch_size', '?')} queries per process x "
        f"{train.get('gradient_accumulation_steps', 1)} accumulation, "
        f"{data.get('train_group_size', '?')} documents per query"
    )
    return text + (" (GradCache)" if train.get("grad_cache") else "")


def _settings(section: dict[str, Any], keys: tuple[str, ...]) -> str:
    return ", ".join(f"{k}={section[k]}" for k in keys if k in section)


def config_highlights(run: RunFiles) -> dict[str, str]:
    """Label -> text of the settings worth reading first; cache settings only for a loss that has a cache."""
    cfg = run.config
    train, loss = cfg.get("train", {}), cfg.get("loss", {})
    name = str(loss.get("loss", "?"))
    out = {
        "model": _model(cfg.get("model", {})),
        "training data": _data(cfg.get("data", {})),
        "loss": name + (f": {LOSS_NOTES[name]}" if name in LOSS_NOTES else ""),
        "temperature": str(loss.get("temperature", "?"))
        + (" (learned)" if loss.get("learn_temperature") else ""),
        "batch": _batch(cfg),
        "learning rate": (
            f"{train.get('learning_rate', '?')} ({train.get('lr_scheduler_type', '?')}, warmup "
            f"{train.get('warmup_ratio', '?')} of the steps)"
        ),
        "steps": _steps(train),
    }
    if cfg.get("data", {}).get("dev_corpus_file"):
        every = f"every {train['eval_steps']} steps and " if train.get("eval_steps") else ""
        out["dev evaluation"] = f"{train.get('eval_measure', '?')}, {every}at the end"
    else:
        out["dev evaluation"] = "none (no dev set in the config)"
    if name != "inbatch" and "cache" in cfg:
        keys = [k for k in CACHE_KEYS if k != "cache_size" or cfg["cache"].get("cache_mode") != "corpus"]
        out["cache"] = _settings(cfg["cache"], tuple(keys))
    if name == "sce" and "sce" in cfg:
        out["sce"] = _settings(cfg["sce"], SCE_KEYS)
    return out


def made_by(run: RunFiles) -> dict[str, str]:
    """Commit and machine from ``train_summary.json``'s ``made_by`` (empty without a summary)."""
    info = (run.summary or {}).get("made_by")
    if not isinstance(info, dict):
        return {}
    machine = info.get("machine") if isinstance(info.get("machine"), dict) else {}
    versions = info.get("versions") if isinstance(info.get("versions"), dict) else {}
    where = [str(machine[k]) for k in ("platform", "processor") if machine.get(k)]
    if machine.get("cpu_count"):
        where.append(f"{machine['cpu_count']} CPUs")
    where.append(f"GPU {machine['gpu']}" if machine.get("gpu") else "no GPU")
    out = {"commit": str(info.get("commit", "?")), "machine": ", ".join(where)}
    libs = [f"{k} {versions[k]}" for k in ("torch", "transformers", "accelerate") if versions.get(k)]
    if libs:
        out["versions"] = ", ".join(libs)
    return out
