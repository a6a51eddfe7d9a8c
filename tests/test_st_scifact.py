"""eval/st_scifact.py: sentence-transformers' trainer on dualenc's SciFact pairs, run in-process on a tiny
random BERT (dropout off, so runs are deterministic) and a SciFact-shaped data dir written here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_script, make_text, read_log, tiny_bert_config, write_tokenizer_dir

pytest.importorskip("sentence_transformers")

# 13 train claims: c2 and c8 have 2 and 3 positives, c4 and c5 cite the same abstract, c11 repeats c10's text,
# c9 is judged 0 only (dualenc skips it) and c12 not at all: 11 claims, 14 pairs.
_PAIRS = "c0:d0 c1:d1 c2:d2 c2:d3 c3:d4 c4:d5 c5:d5 c6:d6 c7:d7 c8:d8 c8:d9 c8:d10 c10:d12 c11:d13"
TRAIN_QRELS = [tuple(pair.split(":")) for pair in _PAIRS.split()]
DEV_QRELS = [("v0", "d14"), ("v1", "d15"), ("v1", "d0"), ("v2", "d3")]
NUM_CLAIMS = 11


def _write_data(root: Path) -> dict:
    """corpus.jsonl (d7 has no title), queries.{train,dev}.tsv, qrels.{train,dev}.txt; returns the texts."""
    rng = np.random.default_rng(3)
    docs = {f"d{i}": ("" if i == 7 else f"w{i} title", make_text(rng, 8, 20)) for i in range(16)}
    claims = {f"c{i}": f"{make_text(rng, 3, 8)} w{40 + i}" for i in range(13)}
    claims["c11"] = claims["c10"]
    dev = {f"v{i}": make_text(rng, 3, 8) for i in range(3)}
    root.mkdir(parents=True)
    lines = [json.dumps({"_id": d, "title": title, "text": text}) for d, (title, text) in docs.items()]
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    splits = (("train", claims, TRAIN_QRELS + [("c9", "d11", 0)]), ("dev", dev, DEV_QRELS))
    for split, queries, qrels in splits:
        (root / f"queries.{split}.tsv").write_text("".join(f"{q}\t{t}\n" for q, t in queries.items()))
        (root / f"qrels.{split}.txt").write_text("".join(f"{r[0]} 0 {r[1]} {(r + (1,))[2]}\n" for r in qrels))
    return {"docs": docs, "claims": claims}


@pytest.fixture(scope="module")
def st() -> dict:
    module = load_script("eval/st_scifact.py")
    sys.modules[module.__name__] = module  # checkpoints pickle the training args, which name its sampler
    return vars(module)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """The data dir, a tiny sentence-transformers folder (mean pooling, normalized, no dropout), a cache."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertModel

    root = tmp_path_factory.mktemp("st_scifact")
    texts = _write_data(root / "data")
    torch.manual_seed(0)
    bert = write_tokenizer_dir(root / "bert")
    BertModel(tiny_bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).save_pretrained(
        bert
    )
    transformer = models.Transformer(str(bert), max_seq_length=64)
    modules = [transformer, models.Pooling(32, "mean"), models.Normalize()]
    SentenceTransformer(modules=modules, device="cpu").save(str(root / "model"))
    return {"root": root, "data": root / "data", "model": root / "model", "cache": root / "hf", **texts}


def _argv(setup: dict, run: Path, *extra: str) -> list[str]:
    paths = ["--model", setup["model"], "--data-dir", setup["data"], "--cache-dir", setup["cache"]]
    return [*map(str, paths), "--output-dir", str(run), "--logging-steps", "1", *extra]


@pytest.fixture(scope="module")
def mnrl_run(st, setup) -> Path:
    """MNRL, batch 4, 2 epochs: 11 // 4 = 2 steps per epoch."""
    run = setup["root"] / "mnrl_b4"
    st["main"](_argv(setup, run, "--loss", "mnrl", "--batch-size", "4", "--epochs", "2", "--seed", "7"))
    return run


@pytest.fixture(scope="module")
def train_data(st, setup) -> tuple:
    """dualenc's reading of the train files (its own loader), and the script's pairs from it."""
    from dualenc.training.data import load_train_data

    names = {"corpus": "corpus.jsonl", "queries": "queries.train.tsv", "qrels": "qrels.train.txt"}
    files = {f"{key}_file": setup["data"] / name for key, name in names.items()}
    data = load_train_data(format="qrels", cache_dir=setup["cache"], **files)
    return (data, *st["training_pairs"](data))


def test_pairs_and_epoch_draws_are_dualencs(st, setup, train_data):
    from dualenc.io.readers import doc_text
    from dualenc.training.batches import GroupDataset

    data, pairs, pair_of = train_data
    got = list(zip(pairs["anchor"], pairs["positive"], strict=True))
    by_hand = [(setup["claims"][q], doc_text(*setup["docs"][d])) for q, d in TRAIN_QRELS]
    assert sorted(got) == sorted(by_hand) and len(got) == 14
    corpus = data.corpus.with_format(None)
    oracle = [  # dualenc's own reading: each group's positives, as corpus rows
        (g["query"], doc_text(corpus[row]["title"], corpus[row]["text"]))
        for g in data.groups.with_format(None)
        for row in g["positives"]
    ]
    assert sorted(got) == sorted(oracle)
    rows = st["epoch_rows"](data, pair_of, 7, 3)
    groups = GroupDataset(data, 1, seed=7)
    for epoch, epoch_rows in enumerate(rows):
        groups.set_epoch(epoch)
        drawn = [corpus[groups[i]["doc_idx"][0]] for i in range(NUM_CLAIMS)]
        queries = [groups[i]["query"] for i in range(NUM_CLAIMS)]
        expected = [(q, doc_text(doc["title"], doc["text"])) for q, doc in zip(queries, drawn, strict=True)]
        assert [got[r] for r in epoch_rows] == expected
    assert rows[0] != rows[1] or rows[1] != rows[2]  # the draws change with the epoch


def test_sampler_batches_one_epochs_draws_without_duplicates(st, train_data):
    data, pairs, pair_of = train_data
    rows = st["epoch_rows"](data, pair_of, 0, 2)
    sampler = st["DrawnPairsBatchSampler"](pairs, rows=rows, batch_size=4, drop_last=True)
    assert len(sampler) == NUM_CLAIMS // 4
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == 2 and all(len(b) == 4 for b in batches)
        seen = [r for b in batches for r in b]
        assert len(set(seen)) == 8 and set(seen) <= set(rows[epoch])  # the epoch's draws, each once
        for batch in batches:
            texts = [t for r in batch for t in (pairs[r]["anchor"], pairs[r]["positive"])]
            assert len(set(texts)) == len(texts)  # no claim or abstract twice in a batch


def test_run_writes_summary_log_and_what_compare_training_reads(setup, mnrl_run, tmp_path):
    import sentence_transformers

    summary = json.loads((mnrl_run / "train_summary.json").read_text())
    assert (summary["steps"], summary["epochs"], summary["steps_per_epoch"]) == (4, 2, NUM_CLAIMS // 4)
    settings = [summary[k] for k in ("loss", "batch_size", "mini_batch_size", "seed", "lr", "max_seq_length")]
    assert settings == ["mnrl", 4, None, 7, 2e-5, 256]
    assert summary["loss_class"] == "MultipleNegativesRankingLoss" and summary["scale"] == 20.0
    assert [summary[k] for k in ("claims", "pairs", "warmup_steps", "weight_decay")] == [11, 14, 0, 0.01]
    assert summary["library"] == f"sentence-transformers {sentence_transformers.__version__}"
    assert summary["eval_measure"] == "nDCG@10" and summary["resumed_from"] is None
    assert summary["wall_s"] == pytest.approx(summary["session_wall_s"]) and summary["wall_s"] > 0
    assert 0 < summary["cpu_s"] <= summary["wall_s"] * torch.get_num_threads() + 1
    assert 0 < summary["peak_rss_gib"] < 64 and summary["made_by"]["versions"]["torch"]
    log = read_log(mnrl_run)
    losses, dev = [r for r in log if "loss" in r], [r for r in log if "dev/nDCG@10" in r]
    assert [r["step"] for r in losses] == [1, 2, 3, 4] and all(r["step_time_s"] > 0 for r in losses)
    assert [r["lr"] for r in losses] == pytest.approx([2e-5, 1.5e-5, 1e-5, 0.5e-5])  # no warm-up: int(0.4)
    assert [r["step"] for r in dev] == [2, 4]  # the end of each epoch
    best = max(dev, key=lambda r: r["dev/nDCG@10"])  # the first of equal scores, as the trainer keeps it
    assert (summary["best_step"], summary["best_metric"]) == (best["step"], best["dev/nDCG@10"])
    scored = {
        "config": {"model": str(mnrl_run / "best_model")},
        "run_file": str(mnrl_run / "eval" / "run.trec"),
    }
    (tmp_path / "test.json").write_text(json.dumps({"measures": {"nDCG@10": 0.5}, **scored}))
    row = load_script("eval/compare_training.py").summarise_run("st", mnrl_run, str(tmp_path / "test.json"))
    assert (row["steps"], row["best_step"], row["wall_s"]) == (4, best["step"], summary["wall_s"])
    assert row["curves"]["dev"] == [(r["step"], r["dev/nDCG@10"]) for r in dev] and row["median_step_s"] > 0


def test_best_model_is_the_best_checkpoint_and_loads_in_dualenc(st, setup, mnrl_run):
    from sentence_transformers import SentenceTransformer

    from dualenc.model.encoder import DualEncoder

    texts = [setup["claims"]["c0"], " ".join(setup["docs"]["d0"])]
    best = mnrl_run / "best_model"
    ours = DualEncoder.from_pretrained(best).eval()
    assert (ours.config.pooling, ours.config.normalize, ours.config.passage_max_len) == ("mean", True, 256)
    with torch.no_grad():
        emb = ours.encode_docs(ours.tokenize_docs(texts))
    ref = SentenceTransformer(str(best), device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=0)
    step = json.loads((mnrl_run / "train_summary.json").read_text())["best_step"]
    checkpoint = SentenceTransformer(str(mnrl_run / "checkpoints" / f"checkpoint-{step}"), device="cpu")
    torch.testing.assert_close(checkpoint.encode(texts, convert_to_tensor=True), ref)
    start = SentenceTransformer(str(setup["model"]), device="cpu").encode(texts, convert_to_tensor=True)
    assert not torch.allclose(start, ref, atol=1e-4)  # trained
    files = {p: p.stat().st_mtime_ns for p in mnrl_run.rglob("*")}
    argv = _argv(setup, mnrl_run, "--loss", "mnrl", "--batch-size", "4", "--epochs", "2", "--seed", "7")
    assert st["main"](argv) is None  # finished: nothing to do
    assert {p: p.stat().st_mtime_ns for p in mnrl_run.rglob("*")} == files


def test_cached_loss_equals_mnrl_on_the_first_step(st, setup):
    """CMNRL (GradCache, chunks of 2) and MNRL are one objective: same first-step loss, same updated model."""
    from sentence_transformers import SentenceTransformer

    texts, first, encoded = list(setup["claims"].values())[:4], {}, {}
    for loss, extra in (("mnrl", []), ("cmnrl", ["--mini-batch-size", "2"])):
        run = setup["root"] / f"{loss}_b8"
        argv = _argv(setup, run, "--loss", loss, "--batch-size", "8", "--max-steps", "1", *extra)
        summary = st["main"](argv)
        assert (summary["steps"], summary["mini_batch_size"]) == (1, None if loss == "mnrl" else 2)
        first[summary["loss_class"]] = next(r["loss"] for r in read_log(run) if "loss" in r)
        model = SentenceTransformer(str(run / "best_model"), device="cpu")
        encoded[loss] = model.encode(texts, convert_to_tensor=True)
    mnrl, cmnrl = first["MultipleNegativesRankingLoss"], first["CachedMultipleNegativesRankingLoss"]
    assert cmnrl == pytest.approx(mnrl, abs=1e-5) and mnrl > 0.5
    torch.testing.assert_close(encoded["cmnrl"], encoded["mnrl"], atol=1e-5, rtol=0)


def test_interrupted_run_resumes_from_its_last_checkpoint(st, setup, mnrl_run, monkeypatch, capsys):
    run = setup["root"] / "resumed"
    argv = _argv(setup, run, "--loss", "mnrl", "--batch-size", "4", "--epochs", "2", "--seed", "7")
    step_end = st["RunClock"].on_step_end

    def killed_at_step_3(self, args, state, control, **kwargs):
        step_end(self, args, state, control, **kwargs)
        if state.global_step == 3:
            raise RuntimeError("killed")

    monkeypatch.setattr(st["RunClock"], "on_step_end", killed_at_step_3)
    with pytest.raises(RuntimeError, match="killed"):
        st["main"](argv)
    monkeypatch.undo()
    assert not (run / "train_summary.json").exists()
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]
    with pytest.raises(SystemExit) as exc:  # the checkpoints are of another run
        st["main"]([*argv, "--lr", "3e-5"])
    assert exc.value.code == 2 and "other settings" in capsys.readouterr().err
    summary = st["main"](argv)
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["steps"] == 4
    assert summary["wall_s"] > summary["session_wall_s"]  # the clock carries the first session's time
    assert (
        summary["cpu_s"]
        > json.loads((Path(summary["resumed_from"]) / "run_clock.json").read_text())["cpu_s"]
        > 0
    )
    whole = json.loads((mnrl_run / "train_summary.json").read_text())
    assert summary["best_step"] == whole["best_step"]
    assert summary["best_metric"] == pytest.approx(whole["best_metric"], abs=1e-6)
    resumed, uninterrupted = read_log(run), read_log(mnrl_run)
    assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted]
    for ours, ref in zip(resumed, uninterrupted, strict=True):
        for key in ("loss", "dev/nDCG@10"):
            assert ours.get(key) == pytest.approx(ref.get(key), abs=1e-6)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--loss", "adam", "--batch-size", "4"], "argument --loss: invalid choice: 'adam'"),
        (["--loss", "cmnrl", "--batch-size", "4"], "--loss cmnrl needs --mini-batch-size"),
        (["--loss", "mnrl", "--batch-size", "4", "--mini-batch-size", "2"], "--loss mnrl takes none"),
        (["--loss", "mnrl", "--batch-size", "0"], "--batch-size must be > 0, got 0"),
        (["--loss", "mnrl", "--batch-size", "4", "--seed", "-1"], "need --seed >= 0"),
        (["--loss", "mnrl", "--batch-size", "12"], "11 training claims do not fill one batch of 12"),
        (["--loss", "mnrl", "--batch-size", "4", "--data-dir", "NODEV"], "qrels.dev.txt: file not found"),
        (["--loss", "mnrl", "--batch-size", "4", "--model", "NOMODEL"], "not a sentence-transformers folder"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2_before_anything_is_written(
    st, setup, tmp_path, capsys, extra, message
):
    nodev = tmp_path / "nodev"
    nodev.mkdir()
    for path in setup["data"].iterdir():
        if path.name != "qrels.dev.txt":
            (nodev / path.name).write_bytes(path.read_bytes())
    extra = [{"NODEV": str(nodev), "NOMODEL": str(tmp_path)}.get(arg, arg) for arg in extra]
    with pytest.raises(SystemExit) as exc:
        st["main"](_argv(setup, tmp_path / "run", *extra))
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("st_scifact: error:")]
    assert len(errors) == 1 and message in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nodev"]  # no run folder, no lock file
