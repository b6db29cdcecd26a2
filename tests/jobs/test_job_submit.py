"""The job API: `ray start --head` on 127.0.0.1, `ray job submit --working-dir . -- python jobs/train.py
--smoke-test ...`, wait for SUCCEEDED; the run lands in the MLflow store it was given."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import BIN, PROJECT


@pytest.mark.ray
@pytest.mark.slow
def test_ray_job_submit_smoke_test_succeeds(ray_head, tiny_data, tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    entry = [sys.executable, "jobs/train.py", "--smoke-test", "--data", tiny_data, "--model", "ats",
             "--run-name", "job-submit-smoke", "--experiment", "job-api",
             "--set", "data.low_scale=0.25", "--set", "model.patch_hw=32", "--set", "model.n_patches=4",
             "--set", "model.feature_dim=16", "--set", f"runtime.tracking_uri={tracking_uri}",
             "--set", f"runtime.storage_path={tmp_path / 'ray'}"]
    cmd = [str(BIN / "ray"), "job", "submit", "--address", ray_head["address"], "--working-dir", ".",
           "--submission-id", f"gats-smoke-{tmp_path.name}", "--", *entry]
    proc = subprocess.run(cmd, cwd=PROJECT, env=ray_head["env"], capture_output=True, text=True, timeout=420)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "succeeded" in out.lower(), out[-4000:]

    status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", ray_head["address"],
                             f"gats-smoke-{tmp_path.name}"], env=ray_head["env"], capture_output=True, text=True,
                            timeout=60)
    assert "succeeded" in (status.stdout + status.stderr).lower()

    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("job-api").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["data.max_train"] == "8"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test_error")] == [1]
    assert Path(run.data.tags["gats.checkpoint"]).is_relative_to(tmp_path)
