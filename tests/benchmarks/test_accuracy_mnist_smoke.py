"""The accuracy benchmark runs end to end on a tiny dataset: two `jobs/train.py` processes at once (ATS and the CNN;
the smoke leaves out U-N, the ATS job with the uniform attention net) on one shared fresh MLflow store, the time
budget stops each run, and the table is read back from MLflow."""
from __future__ import annotations

import re

import pytest

from tests.benchmarks.runner import run_benchmark


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.network  # the tiny dataset is drawn from real MNIST digits
@pytest.mark.bench_smoke
def test_accuracy_benchmark_smoke() -> None:
    from benchmarks.accuracy_mnist import SMOKE

    proc = run_benchmark("accuracy_mnist.py", "--smoke", timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| (ATS-4|U-4|CNN x0\.25) \| 1 \| ([0-9.]+) \|",
                                                           proc.stdout, re.M)}
    assert set(rows) == {"ATS-4", "CNN x0.25"}, proc.stdout
    # One run per method, so the cell is that run's last test error: errors / n over all SMOKE.n_test images (one
    # worker, data.max_test unset), printed with 3 decimals. So n * error is a whole number of images, 0..n.
    n = SMOKE.n_test
    for label, cell in rows.items():
        wrong = n * float(cell)
        assert round(wrong) in range(n + 1) and abs(wrong - round(wrong)) <= n * 0.0005, (label, cell, n)
