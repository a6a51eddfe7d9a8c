"""The sentence-transformers folder of an ``HFEncoder`` tower: write one, read a foreign one.

Files (the HF model and tokenizer at the folder's root)::

    config.json, model.safetensors, tokenizer files  HF save_pretrained of the model and the tokenizer
    modules.json                                     Transformer "" -> Pooling "1_Pooling" [-> Normalize]
    sentence_bert_config.json                        max_seq_length (the tower's max_len), do_lower_case false
    1_Pooling/config.json                            legacy pooling_mode_* flags (read by ST 3.x to 6.x)
    config_sentence_transformers.json                prompts (our prefixes), similarity_fn_name

How these folders make up a model directory, next to ``dualenc_config.json``: ``dualenc.model.model_dir``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dualenc.errors import InputError
from dualenc.io.atomic import write_json
from dualenc.io.input_files import read_json
from dualenc.model.options import POOLINGS
from dualenc.model.towers import HFEncoder

# sentence-transformers <= 5 pooling flags; ST 6 still reads them and maps them to its ``pooling_mode``
_ST_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


def write_st_folder(
    folder: Path,
    encoder: HFEncoder,
    tokenizer: Any,
    max_len: int,
    prompts: dict[str, str],
    default: str | None,
) -> None:
    """Write one sentence-transformers folder: HF model + tokenizer at its root, Pooling, maybe Normalize."""
    folder.mkdir(parents=True, exist_ok=True)
    encoder.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    modules = [("", "Transformer"), ("1_Pooling", "Pooling")] + (
        [("2_Normalize", "Normalize")] * encoder.normalize
    )
    entries = [
        {"idx": i, "name": str(i), "path": sub, "type": f"sentence_transformers.models.{kind}"}
        for i, (sub, kind) in enumerate(modules)
    ]
    write_json(folder / "modules.json", entries)
    write_json(folder / "sentence_bert_config.json", {"max_seq_length": max_len, "do_lower_case": False})
    flags = {key: mode == encoder.pooling for key, mode in _ST_POOLING_FLAGS.items()}
    write_json(
        folder / "1_Pooling" / "config.json",
        {"word_embedding_dimension": encoder.dim, **flags, "include_prompt": True},
    )
    prompts = {name: text for name, text in prompts.items() if text}
    st_config = {
        "prompts": prompts,
        "default_prompt_name": default if default in prompts else None,
        "similarity_fn_name": "cosine" if encoder.normalize else "dot",
    }
    write_json(folder / "config_sentence_transformers.json", st_config)


def read_st_dir(root: Path) -> tuple[Path, dict[str, Any]]:
    """Read a sentence-transformers folder: (the HF model dir, detected DualEncoderConfig fields).

    Args:
        root: the folder holding ``modules.json``.
    """
    modules_file = root / "modules.json"
    modules = read_json(modules_file)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise InputError("expected a JSON list of module objects", path=modules_file)
    model_dir, detected = None, {}
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        sub = root / module.get("path", "")
        if kind == "Transformer":
            model_dir = sub
            detected.update(_read_st_max_len(sub))
        elif kind == "Pooling":
            detected["pooling"] = _read_st_pooling(sub / "config.json")
        elif kind == "Normalize":
            detected["normalize"] = True
        else:
            raise InputError(
                f"unsupported sentence-transformers module {module.get('type')!r}; "
                "dualenc reads Transformer, Pooling and Normalize",
                path=modules_file,
            )
    if model_dir is None or "pooling" not in detected:
        raise InputError("expected a Transformer and a Pooling module", path=modules_file)
    prompts_file = root / "config_sentence_transformers.json"
    prompts = (read_json(prompts_file).get("prompts") or {}) if prompts_file.is_file() else {}
    if prompts.get("query"):
        detected["query_prefix"] = prompts["query"]
    doc_prompts = [prompts[name] for name in ("document", "passage", "corpus") if prompts.get(name)]
    if doc_prompts:
        detected["passage_prefix"] = doc_prompts[0]
    return model_dir, detected


def _read_st_pooling(path: Path) -> str:
    """Pooling mode from ``1_Pooling/config.json`` (ST 6 ``pooling_mode`` or the older boolean flags)."""
    config = read_json(path)
    if "pooling_mode" in config:
        modes = config["pooling_mode"]
        modes = [modes] if isinstance(modes, str) else list(modes)
    else:  # no flag set means mean pooling, as in sentence-transformers
        modes = [mode for key, mode in _ST_POOLING_FLAGS.items() if config.get(key)] or ["mean"]
    if len(modes) != 1 or modes[0] not in POOLINGS:
        raise InputError(
            f"unsupported pooling mode {'+'.join(modes)!r}; dualenc supports {' and '.join(POOLINGS)}",
            path=path,
        )
    if config.get("include_prompt", True) is False:
        raise InputError("include_prompt=false (prompt left out of pooling) is not supported", path=path)
    return modes[0]


def _read_st_max_len(model_dir: Path) -> dict[str, int]:
    """Both max lengths from ``max_seq_length`` (ST <= 5) or the tokenizer's ``model_max_length`` (ST 6).

    sentence-transformers truncates queries and documents alike, so a foreign ST folder sets both.
    """
    for name, key in (
        ("sentence_bert_config.json", "max_seq_length"),
        ("tokenizer_config.json", "model_max_length"),
    ):
        if (model_dir / name).is_file():
            value = read_json(model_dir / name).get(key)
            if isinstance(value, int) and 0 < value < 1_000_000:  # HF writes a huge sentinel for "no limit"
                return {"query_max_len": value, "passage_max_len": value}
    return {}
