"""Helpers shared by test files (import as ``from helpers import ...``; pytest puts tests/ on the path)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def load_script(relative_path: str) -> ModuleType:
    """Import a repository script (``eval/…``, ``bench/…``) by path, its folder first on ``sys.path``.

    Scripts import their siblings by name (``from eval_common import main``), as they do when run.
    """
    path = REPO / relative_path
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


WORDS = (
    "the a of and to in is was for on with as by at from that this are be it "
    "query passage document retrieval dense sparse vector index search rank score cache "
    "negative positive train test model bert encoder tower table bucket softmax gradient"
).split()


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [f"w{i}" for i in range(60)]


def write_tokenizer_dir(path: Path) -> Path:
    """Write a BERT WordPiece tokenizer (vocab.txt + tokenizer_config.json) loadable by AutoTokenizer."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512}
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


def tiny_bert_config(**overrides):
    from transformers import BertConfig

    kwargs = dict(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=128,
    )
    kwargs.update(overrides)
    return BertConfig(**kwargs)


def make_text(rng, min_words: int = 3, max_words: int = 20) -> str:
    """A random sentence over the test vocabulary (so tokens are known words, lengths vary)."""
    return " ".join(
        rng.choice(WORDS[:20] + [f"w{i}" for i in range(60)], size=rng.integers(min_words, max_words))
    )


def write_collection(path: Path, num_docs: int, seed: int = 0, prefix: str = "d") -> list[str]:
    """Write an MS MARCO style ``id<TAB>text`` collection of random texts; returns the ids."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = [f"{prefix}{i:04d}" for i in range(num_docs)]
    path.write_text("".join(f"{i}\t{make_text(rng)}\n" for i in ids), encoding="utf-8")
    return ids


def write_triples(path: Path, num_queries: int = 48, seed: int = 0) -> Path:
    """Text triples where the positive repeats the query's words (learnable) and the negative does not."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(num_queries):
        query = make_text(rng, 3, 6)
        positive = f"{query} {make_text(rng, 2, 8)}"
        lines.append(f"{query}\t{positive}\t{make_text(rng, 4, 12)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_overrides(tmp_path: Path, **extra) -> list[str]:
    values = {
        "train_file": str(write_triples(tmp_path / "triples.tsv")),
        "train_format": "triples",
        "datasets_cache_dir": str(tmp_path / "hf"),
        "output_dir": str(tmp_path / "run"),
        "max_steps": 30,
        "logging_steps": 1,
        "save_steps": 0,
        "per_device_train_batch_size": 8,
        "random_vocab_size": 300,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def read_log(run_dir: Path) -> list[dict]:
    return [
        json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines() if line.strip()
    ]


def last_logged_step(run_dir: Path) -> int:
    """The step of the last complete line of a log another process is writing (0 when there is none yet)."""
    path = run_dir / "train_log.jsonl"
    lines = (
        path.read_text().split("\n")[:-1] if path.exists() else []
    )  # a line counts once its newline is out
    return json.loads(lines[-1])["step"] if lines else 0


TRAIN_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import dualenc.training.loop as train_module
    import dualenc.training.step as train_step
    from dualenc.training.config import load_config

    slow = sys.argv[1] == "1"
    if slow:  # slow every micro-batch down (every loss runs it) so the parent can kill us after a checkpoint
        forward = train_step.TrainingModule.forward
        def slow_forward(*args, **kwargs):
            time.sleep(0.15)
            return forward(*args, **kwargs)
        train_step.TrainingModule.forward = slow_forward
    train_module.train(load_config(sys.argv[2], sys.argv[3:]))
    """
)


def train_subprocess(
    tmp_path: Path, slow: bool, overrides: list[str], config: str | None = None
) -> subprocess.Popen:
    script = tmp_path / "train_script.py"
    script.write_text(TRAIN_SCRIPT)
    cmd = [
        sys.executable,
        str(script),
        "1" if slow else "0",
        config or str(REPO / "recipes" / "configs" / "tiny.yaml"),
        *overrides,
    ]
    return subprocess.Popen(
        cmd, env={**os.environ, "PYTHONHASHSEED": "0"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


K = 20


def brute_force(queries: np.ndarray, docs: np.ndarray, keys: np.ndarray, k: int):
    """Oracle: rank every doc by (-score, key) with numpy lexsort; float64 scores."""
    scores = queries.astype(np.float64) @ docs.astype(np.float64).T  # (Q, N)
    order = np.stack([np.lexsort((keys, -row))[:k] for row in scores])  # (Q, k)
    return np.take_along_axis(scores, order, 1), order


def int_data(seed: int = 0, num_docs: int = 2000, dim: int = 16, num_queries: int = 60):
    """Integer-valued float32 vectors (every dot product exact in float32) with many duplicate docs (ties).

    Doc ids are a shuffled, unpadded numbering ("D17" > "D100" as strings), so id order != row order.
    """
    rng = np.random.default_rng(seed)
    docs = rng.integers(-50, 51, size=(num_docs, dim)).astype(np.float32)
    docs[num_docs // 2 :: 2] = docs[rng.integers(0, num_docs // 2, size=len(docs[num_docs // 2 :: 2]))]
    queries = rng.integers(-50, 51, size=(num_queries, dim)).astype(np.float32)
    queries[: num_queries // 2] = docs[rng.integers(0, num_docs, size=num_queries // 2)]  # self hits
    doc_ids = [f"D{i}" for i in rng.permutation(num_docs)]
    return queries, docs, doc_ids


def gauss_data(seed: int = 2, num_docs: int = 2000, dim: int = 64, num_queries: int = 50):
    rng = np.random.default_rng(seed)
    docs = rng.standard_normal((num_docs, dim)).astype(np.float32)
    queries = rng.standard_normal((num_queries, dim)).astype(np.float32)
    return queries, docs, [f"g{i:05d}" for i in range(num_docs)]


def assert_ties_present(ref_scores: np.ndarray) -> None:
    """The exact tests are only meaningful if equal scores occur inside (or at the edge of) the top k."""
    tied = (np.diff(ref_scores, axis=1) == 0).any(axis=1)
    assert tied.sum() >= 10, tied.sum()


def ids_of(rows: np.ndarray, doc_ids: list[str]) -> list[list[str]]:
    return [[doc_ids[i] for i in row if i >= 0] for row in rows]


GPU_MACHINE_BLOCKER = """
import importlib.abc, sys
class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"datasets", "faiss", "ir_measures", "pyarrow"}:
            raise ImportError(f"{name} is not installed on the GPU machine")
sys.meta_path.insert(0, _Absent())
"""


def gpu_machine_env(tmp: Path, **extra: str) -> dict:
    """This environment plus a sitecustomize that blocks the data libraries (child processes inherit it)."""
    site = tmp / "gpu_machine_site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(GPU_MACHINE_BLOCKER)
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


EXIT_PROBE_SITE = REPO / "tests" / "exit_probe"  # its sitecustomize.py reports who reaches finalization


def exit_probe_env(env: dict, folder: Path) -> dict:
    """``env`` with exit_probe/sitecustomize.py first on PYTHONPATH, reporting into ``folder``: each process
    that reaches the interpreter's finalization writes there the gloo threads still alive in it."""
    path = os.pathsep.join(filter(None, [str(EXIT_PROBE_SITE), env.get("PYTHONPATH")]))
    return {**env, "PYTHONPATH": path, "DUALENC_EXIT_PROBE": str(folder)}


def read_exit_probes(folder: Path) -> list[tuple[str, object]]:
    """(RANK or 'solo', its live gloo threads) for each process that reached finalization, sorted."""
    return sorted((p.name.split(".")[0], json.loads(p.read_text())) for p in folder.iterdir())


# a five-document corpus and three queries, the training-data tests' shared fixture files
TINY_CORPUS = (
    "d1\tTitle one\tText one\nd2\t\tText two\nd3\t\tText three\nd4\tFour\tText four\nd5\t\tText five\n"
)
TINY_QUERIES = "q1\tquery one\nq2\tquery two\nq3\tquery three\n"


def write(path: Path, content: str) -> Path:
    """Write ``content`` as UTF-8, gzipped when the name ends in ``.gz``."""
    data = content.encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def jsonl(*records: dict) -> str:
    """JSON lines, one per record."""
    return "".join(json.dumps(r) + "\n" for r in records)
