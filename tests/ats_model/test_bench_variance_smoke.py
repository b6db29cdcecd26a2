"""Smoke test: benchmarks/estimator_variance.py --quick runs, and its built-in checks hold."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_estimator_variance_benchmark_quick() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "estimator_variance.py"), "--quick", "--threads", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for heading in ("Exact enumeration", "Monte Carlo, K = 1024, N = 64", "Cost of the US weights"):
        assert heading in out
    worst = float(re.search(r"Var\(US\)/Var\(ORD\) over every case with N >= 2, F or G: ([0-9.e+-]+)", out)[1])
    assert worst <= 1.0
    bias = float(re.search(r"relative bias of E\[F\], E\[G\] \(WR, ORD, US\) over all cases: ([0-9.e+-]+)", out)[1])
    assert bias < 1e-12
    assert out.count("| 1024 | 64 |") == 2 and all(f"| {n} | 1 |" in out for n in (10, 64, 256))
