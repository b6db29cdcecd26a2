"""Progress of long jobs as people read it: a tqdm bar on a terminal, plain lines in a log file.

Shared by the entry points (ingest, the demo) and the benchmarks; the libraries they call report progress through
callbacks (`on_start(total)`, `on_image(outcome)`) and never draw anything themselves.
"""
from __future__ import annotations

import sys
from typing import Any, TextIO

from pipeline.ingest import Outcome


class Progress:
    """`on_start` / `on_image` for a job: a tqdm bar when `stream` is a terminal, else a plain line every ~10% of
    the images (at most every 100) so that log files carry no carriage-return frames; silent when not `enabled`."""

    def __init__(self, *, enabled: bool = True, stream: TextIO | None = None) -> None:
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

            self.bar = tqdm(total=total, desc="ingest", unit="image", file=self.stream)
        else:
            self.every = max(1, min(100, -(-total // 10)))

    def update(self, outcome: Outcome) -> None:
        self.done += 1
        self.failed += outcome.row.status == "failed"
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(failed=self.failed, refresh=False)
        elif self.enabled and (self.done % self.every == 0 or self.done == self.total):
            print(f"ingest: {self.done}/{self.total} images ({self.failed} failed)", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
