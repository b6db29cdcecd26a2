"""benchmarks/scaling.py --smoke runs end to end: its own tiny ingested dataset, a fresh process with an embedded Ray
for 2 workers x 2 patch servers, the run metrics read back from MLflow and the table (the numbers themselves are the
benchmark's business; here the wiring and their sanity)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.benchmarks.runner import run_benchmark


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.network  # the tiny dataset is drawn from real MNIST digits
@pytest.mark.bench_smoke
def test_scaling_smoke(tmp_path: Path) -> None:
    raw = tmp_path / "scaling.json"
    done = run_benchmark("scaling.py", "--smoke", "--json", str(raw), timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    out = done.stdout
    assert "load average at start:" in out and "load average at end:" in out
    assert "| workers | servers | samples/s (median) |" in out
    assert out.count("| 2 | 2 | ") == 1 and "| 1 | 1 | " not in out and "| 2 | 1 | " not in out

    report = json.loads(raw.read_text())
    assert report["calibration"]["ms_per_patch"] > 0 and report["calibration"]["bytes_per_patch"] > 0
    runs = {(r["workers"], r["servers"]): r for r in report["runs"]}
    assert set(runs) == {(2, 2)}
    for r in runs.values():
        for key in ("samples_per_s", "time_per_sample_ms", "patches_per_s", "bytes_read_per_sample"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        # every patch comes through the servers: the step waits for some of them, and computes besides
        assert 0 < r["io_wait_fraction"] < 1, r
        # ATS-10 reads ten patches per training sample (the loop counts training steps only, not evaluation)
        assert r["patches_per_s"] == pytest.approx(10 * r["samples_per_s"], rel=1e-6)
    # samples_per_s sums each worker's samples / step_s, time_per_sample_ms is 1000 * sum(step_s) / sum(samples):
    # for W workers on equal (padded) shards the product is >= 1000 * W (AM-HM), equal when the workers' step times are
    two = runs[(2, 2)]
    assert two["samples_per_s"] * two["time_per_sample_ms"] >= 2000 * (1 - 1e-6), two
