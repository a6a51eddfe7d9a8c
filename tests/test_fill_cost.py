"""The cost of a cache fill is recorded beside its shard and handed back when a restart reuses the shard."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from dualenc.negcache.fill_cost import FillCost, cost_path, measure_fill, recorded_cost

BUSY_S = 0.3


def _busy(seconds: float) -> None:
    """Spend ``seconds`` of this process's CPU time."""
    until = time.process_time() + seconds
    while time.process_time() < until:
        pass


def _encoding_fill(shard: Path, rows: int = 4):
    """A fill that encodes: burns CPU, then writes ``shard``."""

    def fill() -> Path:
        _busy(BUSY_S)
        np.save(shard, np.ones((rows, 2), np.float32))
        return shard

    return fill


def _reusing_fill(shard: Path):
    """A fill that finds ``shard`` done and only returns it."""
    return lambda: shard


def test_an_encoded_shard_records_its_cost_and_adds_nothing_to_this_session(tmp_path):
    shard = tmp_path / "emb.00000-of-00001.npy"
    got, reused = measure_fill(_encoding_fill(shard), shard)
    assert got == shard and reused == FillCost()  # this session's clocks already hold the encode
    record = recorded_cost(shard)
    assert record is not None and record.cpu_s >= BUSY_S and record.wall_s >= BUSY_S
    assert cost_path(shard).name == "emb.00000-of-00001.npy.fill_cost.json"


def test_a_reused_shard_hands_back_the_recorded_cost_and_keeps_the_record(tmp_path):
    shard = tmp_path / "emb.00000-of-00001.npy"
    measure_fill(_encoding_fill(shard), shard)
    first, record_text = recorded_cost(shard), cost_path(shard).read_text()
    for _ in range(2):  # a second and a third restart reuse the same shard: the same cost, never more
        got, reused = measure_fill(_reusing_fill(shard), shard)
        assert got == shard and reused == first
    assert cost_path(shard).read_text() == record_text


def test_a_shard_encoded_again_is_measured_again_not_counted_twice(tmp_path):
    shard = tmp_path / "emb.00000-of-00001.npy"
    measure_fill(_encoding_fill(shard), shard)
    old = recorded_cost(shard)
    os.utime(shard, ns=(1, 1))  # as if another version: the record no longer names this file
    assert recorded_cost(shard) is None
    _, reused = measure_fill(_encoding_fill(shard, rows=8), shard)
    assert reused == FillCost()
    new = recorded_cost(shard)
    assert new is not None and new != old


@pytest.mark.parametrize(
    "text", ["", "{not json", '{"wall_s": 1.0}', '{"wall_s": "x", "cpu_s": 1, "made_for": {}}']
)
def test_a_damaged_record_is_not_trusted(tmp_path, text):
    shard = tmp_path / "emb.00000-of-00001.npy"
    measure_fill(_encoding_fill(shard), shard)
    cost_path(shard).write_text(text)
    assert recorded_cost(shard) is None
    _, reused = measure_fill(_encoding_fill(shard), shard)  # measured afresh, nothing handed back
    assert reused == FillCost() and recorded_cost(shard) is not None


def test_no_shard_no_record(tmp_path):
    assert recorded_cost(tmp_path / "missing.npy") is None
