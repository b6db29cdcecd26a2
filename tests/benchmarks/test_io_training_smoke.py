"""benchmarks/io_training.py --smoke runs end to end: a tiny generated dataset, one fresh process per configuration
(RAM-fed, store-fed, store-fed without prefetch), metrics read back from MLflow, both tables, the store/RAM ratio and
the targets (the figures themselves are the benchmark's business; here the wiring and their sanity)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROWS = ("local RAM (in_memory), prefetch on", "local store, direct, prefetch on", "local store, direct, prefetch off")


@pytest.mark.slow
def test_io_training_smoke() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "io_training.py"), "--smoke"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    out = done.stdout
    assert "load average at start:" in out and "load average at end:" in out
    assert "### 1. ATS time per sample" in out and "### 2. Fraction of step time waiting on I/O" in out
    assert "Ray," not in out  # no Ray rows in the smoke run
    for name in ROWS:
        cells = {}
        for line in out.splitlines():
            if line.startswith(f"| {name} |"):
                cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells, f"no table row for {name}:\n{out}"
        runs, ms, _, wait, rate, _, read = cells[1:8]
        assert runs == "1" and float(ms) > 0 and 0 <= float(wait) <= 1 and float(rate) > 0, cells
        # RAM-fed reads nothing from the store while training; store-fed reads chunks every step
        assert (float(read.replace(",", "")) == 0) == name.startswith("local RAM"), cells
    ratio = re.search(r"store / RAM time per sample: ([0-9.]+)x .* target <= 1\.3x (MET|MISSED)", out)
    assert ratio and float(ratio.group(1)) > 0, out
    assert re.search(r"- local store, direct, prefetch on: io_wait_fraction [0-9.]+ -> target <= 0\.15 (MET|MISSED)",
                     out)
