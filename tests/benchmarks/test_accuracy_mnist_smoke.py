"""The accuracy benchmark runs end to end on a tiny dataset: two `jobs/train.py` processes at once on one shared
fresh MLflow store, the time budget stops each run, and the table is read back from MLflow."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.ray
def test_accuracy_benchmark_smoke() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accuracy_mnist.py"), "--smoke"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| (ATS-4|U-4|CNN x0\.25) \| 1 \| ([0-9.]+) \|",
                                                           proc.stdout, re.M)}
    assert set(rows) == {"ATS-4", "U-4", "CNN x0.25"}, proc.stdout
    assert all(0 <= float(v) <= 1 for v in rows.values())
