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
    names = {"error", "balanced_accuracy", "auc"}
    assert {f"test_{n}{mode}" for n in names for mode in ("", "_sampled", "_topk", "_exact")} <= set(m)
    recalls = {k for k in m if k.startswith("test_recall_") and not k.endswith(("_sampled", "_topk", "_exact"))}
    assert recalls and all(m[k] == m[f"{k}_sampled"] and f"{k}_exact" in m for k in recalls)
    assert all(m[f"test_{n}"] == m[f"test_{n}_sampled"] for n in names)  # the first mode's, unsuffixed
    assert all(6 * m[f"test_error{s}"] == round(6 * m[f"test_error{s}"]) for s in ("", "_sampled", "_topk", "_exact"))
    assert not any(k.endswith("_se") or "_se_" in k for k in m)  # one sampling: no standard errors
    assert run.data.tags["gats.kind"] == "evaluate" and run.data.params["eval.modes"] == "sampled,topk,exact"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "confusion")}
    assert artifacts == {f"confusion/test_{mode}.{ext}" for mode in ("sampled", "topk", "exact")
                         for ext in ("csv", "png")}
    out = capsys.readouterr().out
    assert "test error" in out and "test auc" in out and "exact" in out.splitlines()[0]


def test_repeats_average_samplings_and_log_their_standard_error(ckpt_folder, local_tracking):
    rc = evaluate.main(["--checkpoint", ckpt_folder, "--mode", "sampled", "--mode", "topk", "--repeats", "3",
                        "--tracking-uri", local_tracking, "--experiment", "eval-repeats"])
    assert rc == 0
    client = MlflowClient(local_tracking)
    (run,) = client.search_runs([client.get_experiment_by_name("eval-repeats").experiment_id])
    m = run.data.metrics
    assert {"test_error_se", "test_error_se_sampled", "test_auc_se_sampled"} <= set(m)
    assert "test_error_se_topk" not in m  # top-k is deterministic: one pass
    assert 18 * m["test_error_sampled"] == round(18 * m["test_error_sampled"])  # mean of 3 passes over 6 images
    assert run.data.params["runtime.eval_repeats"] == "3"


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
    assert ev.data.metrics["test_error_topk"] == pytest.approx(direct["error"])  # top-k is deterministic
    assert ev.data.metrics["test_auc_topk"] == pytest.approx(direct["auc"], nan_ok=True)


def test_smoke(tiny_data, local_tracking):
    assert evaluate.main(["--smoke-test", "--data", tiny_data, "--tracking-uri", local_tracking]) == 0
