"""benchmarks/io_training.py --smoke runs end to end: a tiny generated dataset, one fresh process per configuration
(RAM-fed, store-fed, store-fed without prefetch), metrics read back from MLflow, both tables, the store/RAM ratio and
the targets (the figures themselves are the benchmark's business; here the wiring and their sanity)."""
from __future__ import annotations

import re

import pytest

from tests.benchmarks.runner import run_benchmark

ROWS = ("local RAM (in_memory), prefetch on", "local store, direct, prefetch on", "local store, direct, prefetch off")


@pytest.mark.slow
@pytest.mark.network  # the tiny dataset is drawn from real MNIST digits
@pytest.mark.bench_smoke
def test_io_training_smoke() -> None:
    done = run_benchmark("io_training.py", "--smoke", timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    out = done.stdout
    assert "load average at start:" in out and "load average at end:" in out
    assert "### 1. ATS time per sample" in out and "### 2. Fraction of step time waiting on I/O" in out
    assert "Ray," not in out  # no Ray rows in the smoke run
    waits = {}
    for name in ROWS:
        cells = {}
        for line in out.splitlines():
            if line.startswith(f"| {name} |"):
                cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells, f"no table row for {name}:\n{out}"
        runs, ms, vs_ram, wait, rate, _, read = cells[1:8]
        assert runs == "1" and float(ms) > 0 and float(rate) > 0, cells
        # One worker: samples/s = samples / step_s and ms/sample = 1000 * step_s / samples, so rate = 1000 / ms
        # up to the table's rounding (ms to 1 ms, samples/s to 0.01)
        assert 1000 / (float(ms) + 0.5) - 0.005 <= float(rate) <= 1000 / (float(ms) - 0.5) + 0.005, cells
        ram = name.startswith("local RAM")
        assert (vs_ram == "1.00x") if ram else vs_ram.endswith("x"), cells  # RAM against itself
        # RAM-fed reads nothing from the store while training; store-fed reads chunks every step
        assert (float(read.replace(",", "")) == 0) == ram, cells
        # A store-fed step blocks on the chunks it reads (> 0); every step also computes (< 1)
        assert float(wait) < 1 and (ram or float(wait) > 0), cells
        waits[name] = float(wait)
    # The implied ratio is (1 - wait RAM) / (1 - wait store) of the prefetch-on rows: recompute it from the table's
    # rounded waits (3 decimals), the line rounds to 2
    implied = re.search(r"\(1 - wait RAM\) / \(1 - wait store\): ([0-9.]+)x", out)
    a, b = waits[ROWS[0]], waits[ROWS[1]]
    low, high = (1 - a - 5e-4) / (1 - b + 5e-4), (1 - a + 5e-4) / (1 - b - 5e-4)
    assert implied and low - 0.005 <= float(implied.group(1)) <= high + 0.005, (a, b, out)
    ratio = re.search(r"store / RAM time per sample: ([0-9.]+)x .* target <= 1\.3x (MET|MISSED)", out)
    assert ratio and float(ratio.group(1)) > 0, out
    assert re.search(r"- local store, direct, prefetch on: io_wait_fraction [0-9.]+ -> target <= 0\.15 (MET|MISSED)",
                     out)
