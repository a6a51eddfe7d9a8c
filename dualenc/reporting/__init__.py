"""Reports on training runs: from a run directory's log, config and summary (and an eval report, if any) to
``report.md`` with a table, figures of the training curves and ``report.json`` (``dualenc report``)."""

from dualenc.reporting.curves import BestDev, best_dev, curve, table_row
from dualenc.reporting.report import default_out, write_report
from dualenc.reporting.run_files import RunFiles, read_run_dir, read_train_log

__all__ = [
    "BestDev",
    "RunFiles",
    "best_dev",
    "curve",
    "default_out",
    "read_run_dir",
    "read_train_log",
    "table_row",
    "write_report",
]
