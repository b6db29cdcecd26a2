"""Progress of long jobs as people read it: a tqdm bar on a terminal, plain lines in a log file.

Shared by the entry points (ingest, predict, the demo) and the benchmarks; the libraries they call report progress
through callbacks (`on_start(total)`, `on_image(result)`) and never draw anything themselves.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, TextIO


def ingest_failed(outcome: Any) -> bool:
    """An ingest outcome (pipeline.ingest.Outcome) whose image failed."""
    return outcome.row.status == "failed"


class Progress:
    """`on_start` / `on_image` for a job: a tqdm bar when `stream` is a terminal, else a plain line every ~10% of
    the images (at most every 100) so that log files carry no carriage-return frames; silent when not `enabled`."""

    def __init__(self, label: str = "ingest", *, failed: Callable[[Any], bool] = ingest_failed, enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.label, self.is_failure = label, failed
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.bar: Any = None
        self.total = self.done = self.failed = 0
        self.every = 1

    def start(self, total: int) -> None:
        self.total = total
        if not self.enabled:
            return
        if getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.label, unit="image", file=self.stream)
        else:
            self.every = max(1, min(100, -(-total // 10)))

    def update(self, result: Any) -> None:
        self.done += 1
        self.failed += bool(self.is_failure(result))
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(failed=self.failed, refresh=False)
        elif self.enabled and (self.done % self.every == 0 or self.done == self.total):
            print(f"{self.label}: {self.done}/{self.total} images ({self.failed} failed)", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
