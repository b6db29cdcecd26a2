"""benchmarks/gpu_suite.sh in its dry mode (GPU_SUITE_DRY=1): every part on the CPU at toy sizes, each leaving its
files, the training run read back from its MLflow store."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.benchmarks.runner import ROOT


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.network  # the tiny dataset is drawn from real MNIST digits
@pytest.mark.bench_smoke
def test_gpu_suite_runs_dry_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    env = {**os.environ, "GPU_SUITE_DRY": "1", "OUT": str(out)}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:] + (out / "timing.txt").read_text()
    timing = (out / "timing.txt").read_text()
    for part in ("cuda_tests", "cost_vs_size", "ingest", "train", "results"):
        assert f"{part} " in timing and "rc=0" in timing.split(f"{part} ")[1].splitlines()[0], timing
    assert "skipped" in (out / "cuda_tests.txt").read_text()  # no GPU here: the CUDA tests skip, they do not fail
    run = json.loads((out / "mnist_run.json").read_text())
    assert run["status"] == "FINISHED" and 0 <= run["metrics"]["test_error"] <= 1
    assert run["params"]["optim.clip_grad_norm"] == "1.0" and run["params"]["model.feature_net"] == "mnist_paper"
    assert run["history"]["elapsed_train_s"] and run["history"]["attention_on_objects"]
