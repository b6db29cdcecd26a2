"""What the jobs print, as people read it: log lines with credentials redacted, and no progress-bar frames (carriage
returns) from MLflow's artifact transfers when the output is a log file, not a terminal.

`configure_logging` is called by the entry points (jobs/) and by each Ray Train worker, never on import.
"""
from __future__ import annotations

import logging
import os
import sys

from training.secrets import RedactingFilter


def configure_logging(level: int = logging.INFO, fmt: str = "%(asctime)s %(levelname)s %(name)s: %(message)s") -> None:
    """`logging.basicConfig` with credentials redacted from every line; MLflow's download/upload bars off when stderr
    is not a terminal (an explicit MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR wins)."""
    logging.basicConfig(level=level, format=fmt)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    if not sys.stderr.isatty():
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
