"""benchmarks/mnist_learning.py --smoke: the in-process learning diagnosis runs and prints its windows and the test
error, and --oracle draws patches on digits only (its whole-digit share beats the flat attention's)."""
from __future__ import annotations

import json
import re

import pytest

from tests.benchmarks.runner import run_benchmark


@pytest.mark.network  # real MNIST digits
@pytest.mark.bench_smoke
def test_mnist_learning_smoke(tmp_path) -> None:
    shares = {}
    for oracle in (False, True):
        out = tmp_path / f"o{oracle}.jsonl"
        proc = run_benchmark("mnist_learning.py", "--smoke", "--out", str(out), *(["--oracle"] if oracle else []),
                             timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert re.search(r"^test error [0-9.]+ \(4 images, sampled\)", proc.stdout, re.M), proc.stdout
        result = json.loads(out.read_text())
        assert [h["step"] for h in result["history"]] == [2, 4]
        shares[oracle] = sum(h["whole"] for h in result["history"])
    assert shares[True] > shares[False]
