"""What a cache fill cost, recorded beside its shard so that a restart which reuses the shard still counts it.

A run's wall and CPU clocks are carried across sessions by its checkpoints. A run killed after the cache fill
but before its first checkpoint starts over, and its fill (:meth:`~dualenc.negcache.NegativeCache.fill`)
reuses the shard already on disk in a moment: without this record the restarted run's clocks would miss the
whole encode of the corpus. The record names the shard file it was measured for (size and modification
time), so a shard encoded again, for whatever reason, is measured again instead of counted twice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dualenc.io import atomic


@dataclass(frozen=True)
class FillCost:
    """Seconds of work (wall clock, this process's CPU time) that produced a cache shard."""

    wall_s: float = 0.0
    cpu_s: float = 0.0


def cost_path(shard: Path) -> Path:
    """The record of ``shard`` (``<shard>.fill_cost.json`` beside it)."""
    return shard.with_name(shard.name + ".fill_cost.json")


def _shard_identity(shard: Path) -> dict:
    stat = shard.stat()
    return {"shard": shard.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def recorded_cost(shard: Path) -> FillCost | None:
    """The cost recorded for ``shard`` as it is now on disk; None when there is no record, or the record is
    of another version of the file (encoded again since) or unreadable."""
    path = cost_path(shard)
    if not (path.is_file() and shard.is_file()):
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("made_for") != _shard_identity(shard):
            return None
        return FillCost(float(record["wall_s"]), float(record["cpu_s"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def measure_fill(fill: Callable[[], Path], expected_shard: Path) -> tuple[Path, FillCost]:
    """Run ``fill`` (which returns the shard's path, ``expected_shard`` when all goes well) and return the
    shard with the cost of earlier sessions' work that this session reused and its own clocks do not hold.

    A shard already recorded on disk costs this session next to nothing (it is read, not encoded): its
    recorded cost is returned, to be added to the run's clocks. Otherwise the shard was encoded now (from
    scratch, or finishing a fill killed part way, whose finished chunks then go uncounted): this session's
    seconds are recorded beside it, and nothing is returned to add (the session's clocks already hold them).
    """
    earlier = recorded_cost(expected_shard)
    wall_0, cpu_0 = time.perf_counter(), time.process_time()
    shard = fill()
    if earlier is not None and recorded_cost(shard) == earlier:  # reused, the very file that was measured
        return shard, earlier
    spent = FillCost(time.perf_counter() - wall_0, time.process_time() - cpu_0)
    record = {"wall_s": spent.wall_s, "cpu_s": spent.cpu_s, "made_for": _shard_identity(shard)}
    atomic.write_json(cost_path(shard), record)
    return shard, FillCost()


__all__ = ["FillCost", "cost_path", "measure_fill", "recorded_cost"]
