"""Training where users run it: `torchrun --nproc_per_node 2 recipes/train.py ... cpu=true` against one
process.

Every run goes through the real launcher and the real recipe script, with a real schedule (linear, warm-up),
gradient accumulation 1 and 3, and an epoch of 5 micro-batches (so accumulation 3 gives steps of 3 and 2).
- the matrix: the logged learning rates, optimizer steps and epochs equal a hand computation, and 2 processes
  with batch 4 log the losses of 1 process with batch 8 (to 1e-5), for every loss that runs on 2 processes;
- kill -9 of the 2-process run after a checkpoint, then resume_from=latest: the losses after the resume and
  the final weights equal the uninterrupted 2-process run (dropout on). Each kill test asserts the kill
  happened.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    REPO,
    exit_probe_env,
    last_logged_step,
    make_text,
    read_exit_probes,
    tiny_bert_config,
    write_tokenizer_dir,
)

from dualenc.errors import InputError

NUM_QUERIES = 44  # global batch 8 -> 40 used per epoch (a different 4 left out each epoch) -> 5 batches
GLOBAL_BATCH, MAX_STEPS, WARMUP_RATIO, LR = 8, 7, 0.3, 1e-3
LOSSES = ["inbatch", "cache", "cache_ce"]  # loss=sce runs on one process only (refused on more)


def _write_triples(path: Path) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(NUM_QUERIES):
        query = make_text(rng, 3, 6)
        lines.append(f"{query}\t{query} {make_text(rng, 2, 8)}\t{make_text(rng, 4, 12)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _write_shared_triples(path: Path) -> Path:
    """Triples whose positives come from 30 passages: some passages are the positive of 2 or more queries."""
    rng = np.random.default_rng(1)
    pool = [make_text(rng, 2, 8) for _ in range(30)]
    lines = [
        f"query {i} {make_text(rng, 3, 6)}\t{pool[rng.integers(30)]}\t{make_text(rng, 4, 12)}"
        for i in range(NUM_QUERIES)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _model_dir(root: Path, dropout: float) -> Path:
    """A dualenc model dir of a tiny random BERT (mean pooling, normalised) with the given dropout."""
    from transformers import BertModel

    from dualenc.model.encoder import DualEncoder

    torch.manual_seed(0)
    hf = root / "hf"
    BertModel(
        tiny_bert_config(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    ).save_pretrained(hf)
    write_tokenizer_dir(hf)
    model = DualEncoder.from_hf(hf, pooling="mean", normalize=True, query_max_len=16, passage_max_len=24)
    model.save_pretrained(root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("processes")
    return {
        "triples": _write_triples(root / "triples.tsv"),
        "shared": _write_shared_triples(root / "shared.tsv"),
        "model": _model_dir(root / "no_dropout", 0.0),
        "model_dropout": _model_dir(root / "dropout", 0.1),
        "root": root,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(processes: int, script: Path, overrides: list[str]) -> list[str]:
    if processes == 1:
        return [sys.executable, str(script), *overrides]
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
    ]
    return [*launcher, str(script), *overrides, "cpu=true"]


def _overrides(setup: dict, out: Path, processes: int, loss: str, gas: int, **extra) -> list[str]:
    values = {
        "train_file": setup["triples"],
        "train_format": "triples",
        "datasets_cache_dir": out.parent / f"hf-{out.name}",
        "model_name_or_path": setup["model"],
        "random_init": "false",
        "output_dir": out,
        "train_group_size": 2,
        "per_device_train_batch_size": GLOBAL_BATCH // processes,
        "gradient_accumulation_steps": gas,
        "max_steps": MAX_STEPS,
        "warmup_ratio": WARMUP_RATIO,
        "lr_scheduler_type": "linear",
        "learning_rate": LR,
        "logging_steps": 1,
        "save_steps": 0,
        "temperature": 0.05,
        "loss": loss,
        "refresh_fraction": 0.1,
        "num_cache_negatives": 2,
        "cache_fill_batch_size": 16,
        "seed": 7,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _train(processes: int, overrides: list[str], script: Path = REPO / "recipes" / "train.py") -> None:
    """Run the recipe on ``processes`` processes; it must exit 0, and on 2 its workers must end without the
    interpreter's finalization (where torch's leaked gloo group aborted a finished run now and then)."""
    with tempfile.TemporaryDirectory(prefix="exit_probe") as probes:
        proc = subprocess.run(
            _command(processes, script, overrides),
            env=exit_probe_env(ENV, Path(probes)),
            capture_output=True,
            text=True,
            timeout=900,
        )
        finalized = [rank for rank, _ in read_exit_probes(Path(probes))]
    assert proc.returncode == 0, proc.stderr[-5000:]
    # one process: it exits normally (and so the probe works); two: only the launcher finalizes
    assert finalized == ["solo"], finalized


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]


def _hand_lr(step: int) -> float:
    """transformers' linear schedule after ``step`` optimizer steps: warm-up int(0.3 x 7) = 2 steps."""
    warmup = int(WARMUP_RATIO * MAX_STEPS)
    if step < warmup:
        return LR * step / warmup
    return LR * max(0.0, (MAX_STEPS - step) / (MAX_STEPS - warmup))


def _hand_micro_batches(gas: int) -> int:
    """Micro-batches of the 7 steps: 5 per epoch, in steps of min(gas, what is left of the epoch)."""
    per_epoch = -(-5 // gas)
    return sum(min(gas, 5 - (step % per_epoch) * gas) for step in range(MAX_STEPS))


def _hand_encodes(setup: dict, loss: str, gas: int) -> dict[str, tuple[int, int]]:
    """Sequences encoded with and without grad, by phase, on any number of processes: each micro-batch
    encodes 8 queries, their 8 x 2 documents and (loss=cache) their 8 x 2 drawn negatives with grad; the cache
    fill encodes the corpus (the triples' distinct passages) and each step refreshes round(0.1 x corpus)."""
    rows = [line.split("\t") for line in setup["triples"].read_text().splitlines()]
    corpus = len({text for _, pos, neg in rows for text in (pos, neg)})
    per_query = 1 + 2 + (2 if loss == "cache" else 0)
    cached = loss != "inbatch"
    return {
        "training": (_hand_micro_batches(gas) * GLOBAL_BATCH * per_query, 0),
        "cache_fill": (0, corpus if cached else 0),
        "cache_refresh": (0, MAX_STEPS * max(1, round(0.1 * corpus)) if cached else 0),
        "dev_eval": (0, 0),
        "checkpoint": (0, 0),
    }


def _encodes(out: Path) -> dict[str, tuple[int, int]]:
    cost = json.loads((out / "train_summary.json").read_text())["cost_by_phase"]
    return {name: (phase["grad_sequences"], phase["nograd_sequences"]) for name, phase in cost.items()}


def _hand_epochs(gas: int) -> list[int]:
    """Epoch of each of the 7 steps: 5 micro-batches per epoch in steps of min(gas, what is left)."""
    per_epoch = -(-5 // gas)
    return [step // per_epoch for step in range(MAX_STEPS)]


@pytest.mark.slow
@pytest.mark.parametrize("gas", [1, 3])
@pytest.mark.parametrize("loss", LOSSES)
def test_two_processes_follow_the_one_process_run(setup, loss, gas, tmp_path):
    runs, tokens = {}, {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        _train(processes, _overrides(setup, out, processes, loss, gas))
        runs[processes] = _log(out)
        summary = json.loads((out / "train_summary.json").read_text())
        assert summary["steps"] == MAX_STEPS and summary["epochs"] == _hand_epochs(gas)[-1] + 1
        # the encodes of every process are counted: 2 processes with batch 4 encode what 1 with batch 8 does
        assert _encodes(out) == _hand_encodes(setup, loss, gas), processes
        tokens[processes] = summary["cost_by_phase"]["training"]["grad_tokens"]
    assert 0 < tokens[2] <= tokens[1]  # each half batch is padded to its own longest input
    for processes, log in runs.items():
        assert [row["step"] for row in log] == list(range(1, MAX_STEPS + 1)), processes
        assert [row["lr"] for row in log] == pytest.approx(
            [_hand_lr(s) for s in range(1, MAX_STEPS + 1)], abs=1e-12
        )
        assert [row["epoch"] for row in log] == _hand_epochs(gas)
    one, two = [row["loss"] for row in runs[1]], [row["loss"] for row in runs[2]]
    np.testing.assert_allclose(two, one, atol=1e-5, rtol=0)
    assert one[-1] < one[0]  # it trains: warm-up then decay, not a schedule stuck at 0
    if loss != "inbatch":
        draws = [row["cache/draws"] for row in runs[2]]
        assert all(d > 0 for d in draws) if loss == "cache" else True


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["inbatch", "cache"])
def test_grad_cache_on_two_processes_follows_the_plain_one_process_run(setup, loss, tmp_path):
    """GradCache (chunks of 3 queries and 3 documents: 4 queries x G=2 per process split 3+1 and 3+3+2), 2
    processes with cross-device negatives, accumulation 3 over an uneven epoch, a learned temperature: the
    logged losses, learning rates and final weights equal the plain 1-process run's (no dropout)."""
    extra = {"learn_temperature": "true", "gradient_accumulation_steps": 3}
    plain, cached = tmp_path / "plain", tmp_path / "grad_cache"
    _train(1, _overrides(setup, plain, 1, loss, 3, **extra))
    gc = {"grad_cache": "true", "grad_cache_query_chunk": 3, "grad_cache_passage_chunk": 3}
    _train(2, _overrides(setup, cached, 2, loss, 3, **extra, **gc))
    one, two = _log(plain), _log(cached)
    assert [row["step"] for row in two] == list(range(1, MAX_STEPS + 1))
    assert [row["lr"] for row in two] == [row["lr"] for row in one]
    np.testing.assert_allclose([row["loss"] for row in two], [row["loss"] for row in one], atol=1e-5, rtol=0)
    assert json.loads((cached / "config.yaml").read_text().split("grad_cache: ")[1].split()[0]) is True
    from safetensors.torch import load_file

    ref, got = (
        load_file(plain / "final_model" / "model.safetensors"),
        load_file(cached / "final_model" / "model.safetensors"),
    )
    assert ref.keys() == got.keys()
    moved = load_file(setup["model"] / "model.safetensors")
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-5, msg=name)
    assert any(not torch.equal(ref[n], moved[n]) for n in ref if n in moved)  # training moved the weights


def _global_batches_with_a_shared_positive(setup: dict, tmp_path: Path, kind: str) -> int:
    """Global batches (8 queries) of epochs 0-2 of the shared triples where two queries share a positive."""
    from dualenc.training.data import load_train_data
    from dualenc.training.no_duplicates import epoch_sampler, group_keys

    data = load_train_data(setup["shared"], format="triples", cache_dir=str(tmp_path / "hf-keys"))
    keys, count = group_keys(data.groups), 0
    sampler = epoch_sampler(kind, data.groups, seed=7, multiple_of=GLOBAL_BATCH)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        for start in range(0, len(order), GLOBAL_BATCH):
            rows = [row for item in order[start : start + GLOBAL_BATCH] for row in keys[item] if row >= 0]
            count += len(rows) != len(set(rows))
    return count


@pytest.mark.slow
def test_no_duplicates_batches_on_two_processes_follow_the_one_process_run_without_masking(setup, tmp_path):
    """batch_sampling=no_duplicates over queries that share positives, accumulation 3 over an uneven epoch:
    2 processes with batch 4 and false-negative masking log the losses of 1 process with batch 8 and no
    masking, so the global batches are the same and hold nothing to mask (random batches of this seed do)."""
    assert _global_batches_with_a_shared_positive(setup, tmp_path, "random") > 0
    assert _global_batches_with_a_shared_positive(setup, tmp_path, "no_duplicates") == 0
    extra = {"train_file": setup["shared"], "batch_sampling": "no_duplicates", "train_group_size": 1}
    one, two = tmp_path / "one", tmp_path / "two"
    _train(1, _overrides(setup, one, 1, "inbatch", 3, **extra, mask_false_negatives="false"))
    _train(2, _overrides(setup, two, 2, "inbatch", 3, **extra))
    for out in (one, two):
        log = _log(out)
        assert [row["step"] for row in log] == list(range(1, MAX_STEPS + 1)), out
        assert [row["lr"] for row in log] == pytest.approx(
            [_hand_lr(s) for s in range(1, MAX_STEPS + 1)], abs=1e-12
        )
        assert [row["epoch"] for row in log] == _hand_epochs(3)
        assert "batch_sampling: no_duplicates" in (out / "config.yaml").read_text()
    losses = [[row["loss"] for row in _log(out)] for out in (one, two)]
    np.testing.assert_allclose(losses[1], losses[0], atol=1e-5, rtol=0)
    assert losses[0][-1] < losses[0][0]


def test_sce_on_two_processes_is_refused_before_any_work(setup, tmp_path):
    out = tmp_path / "sce"
    proc = subprocess.run(
        _command(2, REPO / "recipes" / "train.py", _overrides(setup, out, 2, "sce", 1)),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0 and "loss=sce runs on one process" in proc.stderr
    assert not (out / "cache_fill").exists() and not (out / "train_log.jsonl").exists()


# ---------------------------------------------------------------- kill -9 under 2 processes, then resume

SLOW_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import dualenc.training.step as train_step

    forward = train_step.TrainingModule.forward

    def slow_forward(self, *args, **kwargs):  # every loss goes through here: slow each micro-batch down
        time.sleep(0.4)
        return forward(self, *args, **kwargs)

    train_step.TrainingModule.forward = slow_forward
    sys.path.insert(0, sys.argv.pop(1))
    from train import main
    main(sys.argv[1:])
    """
)


def _launch_patched(script: Path, text: str, overrides: list[str]) -> subprocess.Popen:
    """Start the 2-process recipe through ``text`` (a wrapper that patches dualenc, then runs train.py)
    written to ``script``, in a session of its own (so that it can be killed as a whole)."""
    script.write_text(text)
    return subprocess.Popen(
        [*_command(2, script, [str(REPO / "recipes"), *overrides])],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _wait_until_unlocked(run_dir: Path, timeout_s: float = 120) -> None:
    from dualenc.io.lock import output_lock

    deadline = time.time() + timeout_s
    while True:
        try:
            with output_lock(run_dir):
                return
        except InputError:
            assert time.time() < deadline, "the killed run's processes still hold its output directory"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("loss", "grad_cache", "sampling"),
    [
        *((loss, False, "random") for loss in LOSSES),
        ("cache", True, "random"),
        ("inbatch", False, "no_duplicates"),
    ],
)
def test_kill_9_two_processes_then_resume_is_exact(setup, loss, grad_cache, sampling, tmp_path):
    gas, save = 3, 3  # the checkpoint at step 3 sits mid-epoch 1: the resume skips 3 micro-batches
    extra = {"model_name_or_path": setup["model_dropout"], "save_steps": save, "save_total_limit": 0}
    if sampling == "no_duplicates":  # queries that share positives, rearranged into batches without them
        extra.update(train_file=setup["shared"], batch_sampling=sampling)
    if grad_cache:  # dropout on: the replayed chunks' masks must come back the same after the resume
        extra.update(grad_cache="true", grad_cache_query_chunk=3, grad_cache_passage_chunk=3)
    reference = tmp_path / "reference"
    _train(2, _overrides(setup, reference, 2, loss, gas, **extra))

    killed = tmp_path / "killed"
    overrides = _overrides(setup, killed, 2, loss, gas, **extra)
    victim = _launch_patched(tmp_path / "slow_train.py", SLOW_SCRIPT, overrides)
    deadline = time.time() + 600
    while not ((killed / "checkpoints" / f"step_{save:08d}").exists() and last_logged_step(killed) > save):
        assert victim.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)  # the launcher and both training processes
    assert victim.wait(timeout=60) == -signal.SIGKILL
    logged = [row["step"] for row in _log(killed)]
    assert (
        save < max(logged) < MAX_STEPS and not (killed / "final_model").exists()
    )  # it really was interrupted

    _wait_until_unlocked(killed)  # the launcher's workers die of its death a moment later
    _train(2, [*overrides, "resume_from=latest"])
    ref, got = _log(reference), _log(killed)
    assert [row["step"] for row in got] == list(range(1, MAX_STEPS + 1))  # no step missing or logged twice
    assert [row["loss"] for row in got[save:]] == [row["loss"] for row in ref[save:]]
    assert [row["lr"] for row in got] == [row["lr"] for row in ref]
    # the encodes carried over the resume plus those after it: the uninterrupted run's, every phase
    assert _encodes(killed) == _encodes(reference)
    if not grad_cache:
        assert _encodes(killed) == _hand_encodes(setup, loss, gas)
    else:  # GradCache's first pass: the same queries and documents once more, without grad
        assert _encodes(killed)["training"][1] > 0
    from safetensors.torch import load_file

    final_ref = load_file(reference / "final_model" / "model.safetensors")
    final_got = load_file(killed / "final_model" / "model.safetensors")
    assert final_ref.keys() == final_got.keys()
    for name in final_ref:
        assert torch.equal(final_ref[name], final_got[name]), name


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (from /proc), children first."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _kill_9_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it (the launcher's workers may sit in other groups)."""
    for victim in [*_descendants(pid), pid]:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


BUSY_FILL_S = 3.0
BUSY_FILL_SCRIPT = textwrap.dedent(
    f"""
    import sys, time
    import dualenc.retrieval.encode_to_disk as encode_to_disk
    import dualenc.training.step as train_step

    encode_texts, forward = encode_to_disk.encode_texts, train_step.TrainingModule.forward

    def busy_encode_texts(*args, **kwargs):  # the cache fill: {BUSY_FILL_S} s of CPU per process first
        until = time.process_time() + {BUSY_FILL_S}
        while time.process_time() < until:
            pass
        return encode_texts(*args, **kwargs)

    def slow_forward(self, *args, **kwargs):  # then time to kill it between the fill and a checkpoint
        time.sleep(0.4)
        return forward(self, *args, **kwargs)

    encode_to_disk.encode_texts, train_step.TrainingModule.forward = busy_encode_texts, slow_forward
    sys.path.insert(0, sys.argv.pop(1))
    from train import main
    main(sys.argv[1:])
    """
)


@pytest.mark.slow
def test_kill_9_after_the_cache_fill_before_a_checkpoint_keeps_the_fill_on_the_clocks(setup, tmp_path):
    """2 processes killed after the fill and before any checkpoint: the restart starts over but reuses the
    fill's shards, and its wall and CPU clocks still count the fill the killed session did."""
    from dualenc.negcache.fill_cost import recorded_cost

    killed = tmp_path / "killed"
    overrides = _overrides(setup, killed, 2, "cache", 1)  # save_steps=0: the only checkpoint is the last
    victim = _launch_patched(tmp_path / "busy_fill_train.py", BUSY_FILL_SCRIPT, overrides)
    records = [killed / "cache_fill" / "*" / f"emb.{r:05d}-of-00002.npy.fill_cost.json" for r in range(2)]
    deadline = time.time() + 600
    while not (
        all(list(killed.glob(str(p.relative_to(killed)))) for p in records) and last_logged_step(killed)
    ):
        assert victim.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    _kill_9_tree(victim.pid)  # the launcher and both training processes, at once
    assert victim.wait(timeout=60) == -signal.SIGKILL
    _wait_until_unlocked(killed)
    assert not (killed / "checkpoints").exists() or not any((killed / "checkpoints").iterdir())
    assert 0 < last_logged_step(killed) < MAX_STEPS and not (killed / "final_model").exists()
    shard = next(killed.glob("cache_fill/*/emb.00000-of-00002.npy"))
    fill = recorded_cost(shard)  # rank 0's fill, whose CPU clock is the run's
    assert fill is not None and fill.cpu_s >= BUSY_FILL_S and fill.wall_s >= BUSY_FILL_S
    record_text = (shard.parent / (shard.name + ".fill_cost.json")).read_text()

    _train(2, [*overrides, "resume_from=latest"])
    summary = json.loads((killed / "train_summary.json").read_text())
    assert summary["resumed_from"] is None  # no checkpoint: it started over ...
    assert (
        shard.parent / (shard.name + ".fill_cost.json")
    ).read_text() == record_text  # ... reusing the fill
    assert summary["wall_s"] == pytest.approx(summary["session_wall_s"] + fill.wall_s, abs=1e-6)
    assert summary["cpu_s"] >= fill.cpu_s
    assert [row["step"] for row in _log(killed)] == list(range(1, MAX_STEPS + 1))
