"""Step arithmetic (StepPlan) against a brute-force walk over micro-batches; data order against Accelerate's
sharding."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO

from dualenc.errors import InputError
from dualenc.training.plan import EpochSampler, StepPlan, micro_seed


def _walk(batches_per_epoch: int, accumulation: int, total_steps: int) -> list[tuple[int, int, int]]:
    """(epoch, first micro-batch, micro-batches) of every step, by walking the epochs micro-batch by
    micro-batch."""
    steps, epoch = [], 0
    while len(steps) < total_steps:
        group = []
        for micro in range(batches_per_epoch):
            group.append(micro)
            if len(group) == accumulation or micro == batches_per_epoch - 1:
                steps.append((epoch, group[0], len(group)))
                group = []
                if len(steps) == total_steps:
                    break
        epoch += 1
    return steps


@pytest.mark.parametrize(("batches", "accumulation"), [(5, 3), (10, 4), (6, 3), (1, 1), (2, 5), (7, 1)])
def test_plan_matches_a_walk_over_the_micro_batches(batches, accumulation):
    plan = StepPlan.make(batches, accumulation, max_steps=0, num_epochs=2.5)
    walk = _walk(batches, accumulation, plan.total_steps)
    assert plan.total_steps == math.ceil(2.5 * math.ceil(batches / accumulation))
    for step, (epoch, first, count) in enumerate(walk):
        assert (plan.epoch(step), plan.batches_before(step), plan.batches_in(step)) == (
            epoch,
            first,
            count,
        ), step
    assert plan.num_epochs() == walk[-1][0] + 1


def test_hand_counts():
    """10 micro-batches, accumulation 4: steps of 4, 4, 2 (3 per epoch, not 10 // 4 = 2)."""
    plan = StepPlan.make(10, 4, max_steps=7, num_epochs=0)
    assert plan.steps_per_epoch == 3 and plan.total_steps == 7
    assert [plan.batches_in(s) for s in range(7)] == [4, 4, 2, 4, 4, 2, 4]
    assert [plan.batches_before(s) for s in range(7)] == [0, 4, 8, 0, 4, 8, 0]
    assert [plan.epoch(s) for s in range(7)] == [0, 0, 0, 1, 1, 1, 2] and plan.num_epochs() == 3
    ids = [plan.micro_id(s, m) for s in range(7) for m in range(plan.batches_in(s))]
    assert len(set(ids)) == len(ids)  # one key per micro-batch
    assert len({micro_seed(1, r, i) for r in range(2) for i in ids}) == 2 * len(ids)


def test_bad_plans_are_refused():
    with pytest.raises(InputError, match="does not fill one global batch"):
        StepPlan.make(0, 1, max_steps=10, num_epochs=1)
    with pytest.raises(InputError, match="gradient_accumulation_steps"):
        StepPlan.make(5, 0, max_steps=10, num_epochs=1)


@pytest.mark.parametrize("processes", [2, 3])
def test_p_processes_with_batch_b_see_the_batches_of_one_process_with_batch_pb(processes):
    """Through Accelerate's own sharding (prepare_data_loader): the same global batches, in the same order."""
    from accelerate.data_loader import prepare_data_loader

    num_items, batch = 47, 4
    dataset = list(range(num_items))

    def batches(num_processes: int, index: int, size: int, epoch: int) -> list[list[int]]:
        sampler = EpochSampler(num_items, seed=3, multiple_of=batch * processes)
        loader = torch.utils.data.DataLoader(dataset, batch_size=size, sampler=sampler, drop_last=True)
        loader = prepare_data_loader(
            loader, num_processes=num_processes, process_index=index, put_on_device=False
        )
        loader.set_epoch(epoch)
        return [b.tolist() for b in loader]

    for epoch in (0, 1):
        one = batches(1, 0, batch * processes, epoch)
        shards = [batches(processes, rank, batch, epoch) for rank in range(processes)]
        assert all(len(s) == len(one) == num_items // (batch * processes) for s in shards)
        merged = [list(itertools.chain(*parts)) for parts in zip(*shards, strict=True)]
        assert merged == one
    assert batches(1, 0, batch * processes, 0) != batches(
        1, 0, batch * processes, 1
    )  # a new order each epoch


def test_accelerate_launch_with_cpu_and_two_processes_warns(tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process: the trainer says so."""
    triples = tmp_path / "t.tsv"
    triples.write_text("".join(f"query {i} w{i}\tquery {i} w{i} passage\tw{i + 1} other\n" for i in range(8)))
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes",
        "2",
        str(REPO / "recipes" / "train.py"),
        f"train_file={triples}",
        "train_format=triples",
        f"output_dir={tmp_path / 'run'}",
        f"datasets_cache_dir={tmp_path / 'hf'}",
        "random_init=true",
        "random_vocab_size=100",
        "per_device_train_batch_size=4",
        "max_steps=1",
        "cpu=true",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_CONFIG_FILE": str(tmp_path / "none.yaml")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "a launcher asked for several processes but this run has ONE" in proc.stderr
    assert "1 processes" in proc.stderr
