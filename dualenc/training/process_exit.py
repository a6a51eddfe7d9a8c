"""How a process of a multi-process training run ends, once its run is complete.

torch's DistributedDataParallel keeps the gloo process group alive past ``destroy_process_group`` (torch
2.13: wrap any module in DDP, delete it, collect, destroy the group, and its ``gloo_tcp_loop`` and two
``pt_gloo_runloop`` threads still run), so they are still running when the interpreter finalizes. A process
that reaches finalization with a live gloo group can abort there ("terminate called without an active
exception", SIGABRT; pytorch/pytorch#190489 shows it for a group never destroyed). It happened to a
2-process run after it had written everything, and the launcher reported the run failed.
"""

from __future__ import annotations

import logging
import os
import sys


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``, set by torchrun and accelerate launch)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def end_process(code: int = 0) -> None:
    """End this process now with ``code`` when it is one of several, skipping the interpreter's finalization
    (and so the live gloo threads' teardown); return, for a normal exit, when it is the only one.

    Call it only once the run is over and its files are closed: logging and stdio are flushed here, and no
    ``atexit`` handler runs after it.
    """
    if launched_processes() <= 1:
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
