"""Before a run resumes: the checkpoint must come from the same run settings and the same process count, and
load whole. Anything else is refused with one clear error instead of a shape error deep inside Accelerate, or
silently different training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import yaml

from dualenc.errors import InputError
from dualenc.io import atomic

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"

# settings a resumed run may change: where and how often it logs, saves and evaluates, and where it reads from
MAY_CHANGE = {
    "train.output_dir",
    "train.resume_from",
    "train.logging_steps",
    "train.save_steps",
    "train.save_total_limit",
    "train.eval_steps",
    "train.eval_batch_size",
    "train.report_to",
    "data.dataloader_num_workers",
    "data.datasets_cache_dir",
}


def _field_defaults() -> dict[str, Any]:
    """``section.key`` -> the default of every config field that has a plain default."""
    from dualenc.training.config import SECTIONS

    return {
        f"{section}.{field.name}": field.default
        for section, cls in SECTIONS.items()
        for field in dataclasses.fields(cls)
        if field.default is not dataclasses.MISSING
    }


def _flatten(sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        f"{section}.{key}": value for section, values in sections.items() for key, value in values.items()
    }


def check_same_settings(checkpoint: Path, config: dict[str, dict[str, Any]]) -> None:
    """Refuse to resume ``checkpoint`` with a config that differs from the one it was saved with (other than
    :data:`MAY_CHANGE`); the error lists every differing key with both values. A key the checkpoint's config
    lacks (a setting added since) counts at its default."""
    path = Path(checkpoint) / "config.yaml"
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise InputError(f"checkpoint config unreadable ({type(err).__name__}: {err})", path=path) from None
    if not isinstance(saved, dict):
        raise InputError("checkpoint config is not a mapping of sections", path=path)
    old, new = _flatten(saved), _flatten(config)
    # a setting added to dualenc after the checkpoint was saved: that run trained at the setting's default
    old |= {k: v for k, v in _field_defaults().items() if k not in old and k in new}
    differ = sorted(k for k in old.keys() | new.keys() if k not in MAY_CHANGE and old.get(k) != new.get(k))
    if differ:
        listed = "; ".join(f"{k}: checkpoint {old.get(k)!r}, now {new.get(k)!r}" for k in differ)
        raise InputError(
            f"cannot resume {checkpoint} with different settings ({listed}); resume with the checkpoint's "
            "config, or start a new run in another output_dir"
        )


def check_same_processes(checkpoint: Path, state: dict[str, Any], num_processes: int) -> None:
    """Refuse to resume on another number of processes: the data order, the global batch and the negative
    cache's shards all depend on it."""
    saved = state.get("num_processes")
    if saved is not None and saved != num_processes:
        raise InputError(
            f"checkpoint {checkpoint} was saved by {saved} process(es); this run has {num_processes}: "
            f"resume with {saved}"
        )


def damaged(checkpoint: Path, err: BaseException) -> InputError:
    """The error for a checkpoint that does not load (truncated or corrupted files)."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return InputError(
        f"checkpoint {checkpoint} is damaged and cannot be loaded ({type(err).__name__}: {first[:300]}); "
        "resume from an earlier checkpoint with resume_from=DIR"
    )


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def write_manifest(checkpoint: Path) -> None:
    """``manifest.json``: every file of the checkpoint with its size and SHA-256, written last."""
    files = sorted(p for p in Path(checkpoint).rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(checkpoint)): [p.stat().st_size, _digest(p)] for p in files}
    atomic.write_text(Path(checkpoint) / MANIFEST, json.dumps(entries, indent=1) + "\n")


def check_manifest(checkpoint: Path) -> None:
    """Refuse a checkpoint whose files are missing, truncated or changed since it was saved. Accelerate loads
    some files leniently (a damaged RNG state only logs a warning), so the manifest is checked first."""
    path = Path(checkpoint) / MANIFEST
    if not path.exists():
        logger.warning(
            "checkpoint %s has no %s (saved by an older dualenc): its files are not checked",
            checkpoint,
            MANIFEST,
        )
        return
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise damaged(checkpoint, err) from None
    for name, (size, digest) in entries.items():
        file = Path(checkpoint) / name
        if not file.is_file():
            raise damaged(checkpoint, FileNotFoundError(f"{name} is missing"))
        if file.stat().st_size != size or _digest(file) != digest:
            raise damaged(checkpoint, ValueError(f"{name} differs from what was saved (size or SHA-256)"))
