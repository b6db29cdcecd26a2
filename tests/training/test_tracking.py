"""Tracking: where runs go by default, rank gating, and a round trip through a local MLflow store."""
from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from training import tracking


def test_default_store_is_absolute_and_in_the_project(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("GATS_HOME", raising=False)
    uri = tracking.default_tracking_uri()
    assert uri.startswith("sqlite:////") and uri.endswith("/.gats/mlflow.db")
    assert Path(uri[len("sqlite:///"):]).parent.parent == tracking.project_dir()
    assert (tracking.project_dir() / "pyproject.toml").is_file()


def test_env_selects_the_server(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.default_tracking_uri() == "http://127.0.0.1:5999"


def test_only_rank_zero_tracks(local_tracking):
    assert isinstance(tracking.tracker_for(1, local_tracking, "abc"), tracking.NullTracker)
    assert isinstance(tracking.tracker_for(0, local_tracking, ""), tracking.NullTracker)


def test_round_trip_in_a_local_store(local_tracking, tmp_path):
    run = tracking.MlflowTracker.create(local_tracking, "exp", "ats-10-test", {"gats.model": "ats"})
    run.log_params({f"p{i}": i for i in range(150)})
    run.log_metrics({"train_loss": 1.5}, step=1)
    run.log_metrics({"train_loss": 1.0}, step=2)
    png = tmp_path / "img-1.png"
    tracking.save_heatmap(png, [[[0.0, 1.0], [1.0, 0.0]]], [[0.1, 0.2], [0.3, 0.4]], "t")
    run.log_artifact(png, "attention/epoch_1")
    run.finish()
    client = MlflowClient(local_tracking)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "ats-10-test"
    assert got.data.params["p149"] == "149" and got.data.tags["gats.model"] == "ats"
    assert [m.value for m in client.get_metric_history(run.run_id, "train_loss")] == [1.5, 1.0]
    assert [a.path for a in client.list_artifacts(run.run_id, "attention/epoch_1")] == ["attention/epoch_1/img-1.png"]
    assert got.info.artifact_uri.startswith("file://" + str(tmp_path))
