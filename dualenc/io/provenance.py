"""Provenance for reported numbers: commit, machine and library versions, recorded next to every metric."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

PACKAGES = (
    "dualenc",
    "torch",
    "transformers",
    "datasets",
    "accelerate",
    "faiss-cpu",
    "ir-measures",
    "pytrec-eval-terrier",
)


def git_commit(path: str | os.PathLike = ".") -> str:
    """``HEAD`` of the repository holding ``path``, with ``-dirty`` when there are uncommitted changes."""
    try:
        cwd = Path(path).resolve()
        cwd = cwd if cwd.is_dir() else cwd.parent
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return sha.strip() + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment_info(path: str | os.PathLike = ".") -> dict:
    """Commit, machine, accelerator and versions of the packages that shape the numbers."""
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "commit": git_commit(path),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": gpu,
        },
        "python": platform.python_version(),
        "versions": versions,
    }


def dir_fingerprint(path: str | os.PathLike) -> str:
    """Hash of the file names, sizes and modification times under ``path`` (cheap identity of a model dir)."""
    digest = hashlib.sha256()
    root = Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]
