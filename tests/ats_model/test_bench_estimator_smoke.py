"""Smoke tests: benchmarks/estimator_training.py and benchmarks/estimator_cost.py run with --quick and print their
tables (the numbers themselves are the benchmarks' business; here only the wiring and the built-in checks)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--threads", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


@pytest.mark.slow
def test_estimator_training_benchmark_quick() -> None:
    out = _run("estimator_training.py")
    for heading in ("(a) After the last epoch", "(b) Per epoch", "(c) All measurements by the attention mass"):
        assert heading in out
    assert re.search(r"^\| ORD \| 1 \| ", out, re.M) and re.search(r"^\| US \| 1 \| ", out, re.M)
    epochs = re.findall(r"^\| (\d+) \| ([0-9.]+) \(", out, re.M)  # (b): epoch, attention-gradient ratio
    assert [int(e) for e, _ in epochs] == [0, 1, 2]
    assert all(0 < float(ratio) < 10 for _, ratio in epochs)


@pytest.mark.slow
def test_estimator_cost_benchmark_quick() -> None:
    out = _run("estimator_cost.py")
    for heading in ("1. Weights next to a full training step", "2. Where the US weights spend their time",
                    "3. Options: accuracy against a fine float64 grid"):
        assert heading in out
    assert re.search(r"^\| 10 \| \d+ \(\d+\) \| \d+ \(\d+\) \| ", out, re.M)  # the step row at N = 10
    # the benchmark's re-implementation of the quadrature reproduces the library, so its option errors mean something
    match = re.search(r"with the library's grid matches `unordered_weights` to (\d\.\de[+-]\d+)", out)
    assert match and float(match[1]) < 1e-12
    current = re.search(r"^\| current: [^|]+\| 10 \|(?:[^|]+\|){3} ([0-9.e+-]+) \| ([0-9.e+-]+) \|", out, re.M)
    assert current and float(current[1]) < 1e-12 and float(current[2]) < 1e-12
