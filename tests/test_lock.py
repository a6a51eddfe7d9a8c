"""One writer per output directory: a second writer is refused with the holder's pid; kill -9 frees it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from dualenc.errors import InputError
from dualenc.io.lock import lock_path, output_lock

HOLDER = """
import sys, time
from dualenc.io.lock import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_writer_is_refused_until_the_holder_is_killed(tmp_path):
    out = tmp_path / "emb"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InputError, match=rf"in use by pid {holder.pid}"):
            with output_lock(out):
                pass
        holder.send_signal(signal.SIGKILL)
        assert holder.wait(timeout=30) == -signal.SIGKILL  # the kill happened
        deadline = time.monotonic() + 10
        while True:  # the OS drops the dead holder's lock
            try:
                with output_lock(out):
                    break
            except InputError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        holder.kill()
        holder.wait()
    assert lock_path(out) == tmp_path / ".emb.lock" and not out.exists()


def test_the_lock_is_released_after_the_block_and_on_error(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with output_lock(out):
            raise RuntimeError("boom")
    with output_lock(out):
        pass
    assert not os.path.exists(str(lock_path(out)) + ".pid")


def test_an_output_whose_parent_cannot_be_written_is_one_clear_error(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(InputError, match="cannot write there"):
        with output_lock(afile / "sub" / "out"):  # its parent would have to be made inside a file
            pass
    assert afile.read_text() == "x"
