"""jobs/evaluate.py: a checkpoint or an MLflow run, evaluated in every mode, logged to MLflow."""
from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from jobs import evaluate
from tests.training.test_loop import tiny_config
from training import checkpoint, tracking
from training.evaluation import evaluate as evaluate_model
from training.loop import train_loop
from training.session import LocalSession


@pytest.fixture(scope="module")
def ckpt_folder(tiny_data, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("ckpt")
    cfg = tiny_config(tiny_data, data={"max_train": 4})
    train_loop({"config": cfg.to_dict(), "run_id": ""}, LocalSession(folder))
    return str(folder / "epoch_0001")


def test_checkpoint_in_every_mode_is_logged(ckpt_folder, local_tracking, capsys):
    rc = evaluate.main(["--checkpoint", ckpt_folder, "--mode", "sampled", "--mode", "topk", "--mode", "exact",
                        "--tracking-uri", local_tracking, "--experiment", "eval"])
    assert rc == 0
    client = MlflowClient(local_tracking)
    (run,) = client.search_runs([client.get_experiment_by_name("eval").experiment_id])
    m = run.data.metrics
    assert set(m) == {"test_error", "test_error_sampled", "test_error_topk", "test_error_exact"}
    assert m["test_error"] == m["test_error_sampled"]
    assert all(6 * v == round(6 * v) for v in m.values())  # wrong answers over the 6 test images
    assert run.data.tags["gats.kind"] == "evaluate" and run.data.params["eval.modes"] == "sampled,topk,exact"
    assert "test error (exact)" in capsys.readouterr().out


def test_mlflow_run_id_loads_the_logged_model(ckpt_folder, local_tracking):
    model, ckpt = checkpoint.load_model(ckpt_folder)
    cfg = ckpt.config
    run = tracking.MlflowTracker.create(local_tracking, "train", "ats-4-tiny")
    run.log_checkpoint(ckpt_folder)
    run.finish()
    assert evaluate.main(["--run-id", run.run_id, "--mode", "topk", "--tracking-uri", local_tracking,
                          "--experiment", "eval-run"]) == 0
    client = MlflowClient(local_tracking)
    (ev,) = client.search_runs([client.get_experiment_by_name("eval-run").experiment_id])
    assert ev.data.tags["gats.source_run_id"] == run.run_id
    direct = evaluate_model(model, cfg, "test", ["topk"])["topk"]
    assert ev.data.metrics["test_error_topk"] == pytest.approx(direct)  # top-k is deterministic


def test_smoke(tiny_data, local_tracking):
    assert evaluate.main(["--smoke-test", "--data", tiny_data, "--tracking-uri", local_tracking]) == 0
