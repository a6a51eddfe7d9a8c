"""The Python API logs as the command line does once logging is configured.

docs/api.md, "Progress and logs", says how.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SNIPPET = textwrap.dedent(
    """
    import logging, sys
    if sys.argv[2] == "configured":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("dualenc").setLevel(logging.INFO)
    from dualenc.io import read_collection
    rows = read_collection(sys.argv[1], cache_dir=sys.argv[3])
    print(len(rows))
    """
)


@pytest.mark.parametrize("mode", ["configured", "silent"])
def test_library_logs_once_logging_is_configured(tmp_path, mode):
    (tmp_path / "c.tsv").write_text("d1\tone\nd2\ttwo\nd3\tthree\n", encoding="utf-8")
    cmd = [sys.executable, "-c", SNIPPET, str(tmp_path / "c.tsv"), mode, str(tmp_path / "hf")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "3"
    line = "INFO dualenc.io.readers: read 3 collection rows from"
    assert (line in done.stderr) == (mode == "configured"), done.stderr[-3000:]
