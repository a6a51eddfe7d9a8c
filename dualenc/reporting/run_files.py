"""Reading a training run's directory: ``train_log.jsonl``, ``config.yaml``, ``train_summary.json`` (written
by :mod:`dualenc.training.run_log` and :mod:`dualenc.training.loop`) and an eval report such as ``test.json``.

The log and the config are required; a missing or malformed one raises one :class:`InputError` naming the file
and, where it has one, the line. The summary (absent while a run is still going or after a kill) and the test
report are optional; present but malformed, they are errors too. Nothing here imports torch or the training
code: a report reads the files of any run, finished or not.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dualenc.errors import InputError
from dualenc.io.config_file import read_yaml_mapping
from dualenc.io.input_files import existing_file, iter_lines, read_json

LOG_FILE, CONFIG_FILE, SUMMARY_FILE = "train_log.jsonl", "config.yaml", "train_summary.json"
CONFIG_SECTIONS = ("model", "data", "train", "loss", "cache", "sce")
# logged values the report reads: each must be a number (or null) where present
NUMERIC_KEYS = (
    "loss",
    "accuracy",
    "p_pos",
    "rest_mass",
    "coverage",
    "lr",
    "grad_norm",
    "step_time_s",
    "elapsed_s",
    "peak_rss_gib",
    "peak_mem_gib",
)


@dataclass
class RunFiles:
    """What one run directory holds. ``records`` are the log's objects in file order; ``test`` is the eval
    report (None when ``test_path`` does not exist)."""

    name: str
    run_dir: Path
    config: dict[str, dict[str, Any]]
    records: list[dict[str, Any]]
    summary: dict[str, Any] | None
    test: dict[str, Any] | None
    test_path: Path


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_record(record: Any, path: str, line: int) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise InputError(f"expected a JSON object, got {type(record).__name__}", path=path, line=line)
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise InputError(
            f'no "step" (a whole number >= 0) in {json.dumps(record)[:80]}', path=path, line=line
        )
    for key, value in record.items():
        used = key in NUMERIC_KEYS or key.startswith(("dev/", "cache/"))
        if used and value is not None and not _is_number(value):
            raise InputError(f"{key!r} is not a number: {value!r}", path=path, line=line)
    return record


def read_train_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The objects of a ``train_log.jsonl``, in file order; blank lines skipped.

    Each line must be a JSON object with an integer ``step`` and numbers for the values a report reads. The
    one exception is a last line without its newline that does not parse: a running trainer is writing it,
    and it is left out.
    """
    path = existing_file(path)
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(size - 1, 0))
        complete = size == 0 or fh.read(1) == b"\n"
    lines = list(iter_lines(path))
    records = []
    for index, (line_no, text) in enumerate(lines):
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            if index == len(lines) - 1 and not complete:  # being written
                break
            raise InputError(
                f"invalid JSON: {err.msg} (column {err.colno})", path=path, line=line_no
            ) from None
        records.append(_check_record(record, path, line_no))
    if not records:
        raise InputError("no logged steps: the log is empty", path=path)
    return records


def _key_line(path: Path, key: str) -> int | None:
    """The 1-based line of the top-level ``key`` of a YAML file, None if it cannot be found."""
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return None
    if not isinstance(node, yaml.MappingNode):
        return None
    for key_node, _ in node.value:
        if getattr(key_node, "value", None) == key:
            return key_node.start_mark.line + 1
    return None


def read_run_config(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The sections of a run's ``config.yaml`` as plain mappings (no check of their keys: a report reads
    the config of any version). A missing file, bad YAML or a section that is not a mapping is an error."""
    path = Path(path)
    if not path.is_file():
        raise InputError(
            "file not found" if not path.exists() else "is a directory, expected a file", path=path
        )
    loaded = read_yaml_mapping(path, "config sections")
    config = {}
    for section, values in loaded.items():
        if values is None:
            values = {}
        if not isinstance(values, dict):
            line = _key_line(path, str(section))
            raise InputError(f"section {section!r} is not a mapping of keys", path=path, line=line)
        config[str(section)] = values
    return config


def _optional_object(path: Path, what: str) -> dict[str, Any] | None:
    """A JSON object file, None when it does not exist."""
    if not path.exists():
        return None
    loaded = read_json(path)
    if not isinstance(loaded, dict):
        raise InputError(f"expected a JSON object ({what}), got {type(loaded).__name__}", path=path)
    return loaded


def read_test_report(path: Path) -> dict[str, Any] | None:
    """An eval report (``eval/*.py``: ``{"measures": {name: value}, "config": ..., "commit": ...}``), None
    when ``path`` does not exist."""
    report = _optional_object(path, "an eval report")
    if report is None:
        return None
    measures = report.get("measures")
    if not isinstance(measures, dict) or not all(_is_number(v) for v in measures.values()):
        raise InputError('not an eval report: no "measures" object of numbers', path=path)
    return report


def read_run_dir(
    run_dir: str | os.PathLike, *, name: str | None = None, test_report: str = "test.json"
) -> RunFiles:
    """Read the files of one run directory (see the module docstring)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        problem = "is a file, expected a run directory" if run_dir.exists() else "run directory not found"
        raise InputError(problem, path=run_dir)
    config = read_run_config(run_dir / CONFIG_FILE)
    records = read_train_log(run_dir / LOG_FILE)
    summary = _optional_object(run_dir / SUMMARY_FILE, "a training summary")
    test_path = run_dir / test_report
    return RunFiles(
        name=name or run_dir.resolve().name,
        run_dir=run_dir,
        config=config,
        records=records,
        summary=summary,
        test=read_test_report(test_path),
        test_path=test_path,
    )


def finite(value: Any) -> bool:
    """A number that is neither NaN nor infinite."""
    return _is_number(value) and math.isfinite(value)
