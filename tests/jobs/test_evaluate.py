"""jobs/evaluate.py: a checkpoint or an MLflow run, evaluated in every mode, logged to MLflow."""
from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from training import config as C
from jobs import evaluate, tracking
from jobs.train import load_checkpoint
from training.loop import LocalSession, train_loop
from tests.jobs.test_train import tiny_config


@pytest.fixture(scope="module")
def checkpoint(tiny_data, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("ckpt")
    cfg = tiny_config(tiny_data, data={"max_train": 4})
    train_loop({"config": cfg.to_dict(), "run_id": ""}, LocalSession(folder))
    return str(folder / "epoch_0001")


def test_checkpoint_in_every_mode_is_logged(checkpoint, local_tracking, capsys):
    rc = evaluate.main(["--checkpoint", checkpoint, "--mode", "sampled", "--mode", "topk", "--mode", "exact",
                        "--tracking-uri", local_tracking, "--experiment", "eval"])
    assert rc == 0
    client = MlflowClient(local_tracking)
    (run,) = client.search_runs([client.get_experiment_by_name("eval").experiment_id])
    m = run.data.metrics
    assert set(m) == {"test_error", "test_error_sampled", "test_error_topk", "test_error_exact"}
    assert all(0 <= v <= 1 for v in m.values()) and m["test_error"] == m["test_error_sampled"]
    assert run.data.tags["gats.kind"] == "evaluate" and run.data.params["eval.modes"] == "sampled,topk,exact"
    assert "test error (exact)" in capsys.readouterr().out


def test_mlflow_run_id_loads_the_logged_model(checkpoint, local_tracking):
    model, cfg, _ = load_checkpoint(checkpoint)
    run = tracking.MlflowTracker.create(local_tracking, "train", "ats-4-tiny")
    run.log_text(C.to_yaml(cfg), "config.yaml")
    run.log_model(model)
    run.finish()
    assert evaluate.main(["--run-id", run.run_id, "--mode", "topk", "--tracking-uri", local_tracking,
                          "--experiment", "eval-run"]) == 0
    client = MlflowClient(local_tracking)
    (ev,) = client.search_runs([client.get_experiment_by_name("eval-run").experiment_id])
    assert ev.data.tags["gats.source_run_id"] == run.run_id
    direct = evaluate.evaluate(model, cfg, "test", ["topk"])["topk"]
    assert ev.data.metrics["test_error_topk"] == pytest.approx(direct)  # top-k is deterministic


def test_smoke(tiny_data, local_tracking):
    assert evaluate.main(["--smoke-test", "--data", tiny_data, "--tracking-uri", local_tracking]) == 0
