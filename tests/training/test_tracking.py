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


def test_experiments_are_tagged_as_model_training_unless_they_say_otherwise(local_tracking):
    client = MlflowClient(local_tracking)
    kind = tracking.EXPERIMENT_KIND_TAG
    run = tracking.MlflowTracker.create(local_tracking, "new", "r1")
    assert client.get_experiment(client.get_run(run.run_id).info.experiment_id).tags[kind] == tracking.MODEL_TRAINING
    old = client.create_experiment("made-before")  # an experiment from before the tag: tagged on its next run
    tracking.MlflowTracker.create(local_tracking, "made-before", "r2")
    assert client.get_experiment(old).tags[kind] == "custom_model_development"
    chosen = client.create_experiment("chosen", tags={kind: "genai_development"})  # someone's choice stays
    tracking.MlflowTracker.create(local_tracking, "chosen", "r3")
    assert client.get_experiment(chosen).tags[kind] == "genai_development"


def test_the_manifest_is_the_runs_dataset_input_and_the_note_describes_the_run(local_tracking):
    import json

    from pipeline.manifest import ManifestRow

    shape = {"height": 1500, "width": 1200, "channels": 3, "dtype": "uint8", "levels": 3}
    rows = [ManifestRow(f"s{i}", f"s3://b/s{i}", f"s{i}.svs", label, split, **shape)
            for i, (label, split) in enumerate([("tumor", "train"), ("normal", "train"), ("tumor", "test")])]
    rows.append(ManifestRow("bad", "", "bad.svs", "normal", "train", status="failed", error="unreadable"))
    root, checksum = "s3://alice:s3cret@minio:9000/bucket/slides", "sha256:" + "ab12cd34" * 8
    run = tracking.MlflowTracker.create(local_tracking, "exp", "ats-10-slides")
    summary = run.log_dataset(root, rows, ("normal", "tumor"), checksum, context="evaluation")
    run.set_note(tracking.run_note(tracking.model_title("ats", 10), summary, ["one more line"]))
    got = MlflowClient(local_tracking).get_run(run.run_id)
    (entry,) = got.inputs.dataset_inputs
    assert (entry.dataset.name, entry.dataset.digest, entry.dataset.source_type) == ("slides", "ab12cd34", "s3")
    assert {t.key: t.value for t in entry.tags} == {"mlflow.data.context": "evaluation"}
    assert json.loads(entry.dataset.source) == {"uri": "s3://***@minio:9000/bucket/slides"}
    assert [c["name"] for c in json.loads(entry.dataset.schema)["mlflow_colspec"]] == [
        "image_id", "label", "split", "height", "width"]
    profile = json.loads(entry.dataset.profile)
    assert profile["num_rows"] == 3 and profile["failed"] == 1 and profile["checksum"] == checksum
    assert profile["splits"] == {"train": 2, "test": 1} and profile["per_class"] == {"normal": 1, "tumor": 2}
    assert profile["per_split_class"] == {"train": {"normal": 1, "tumor": 1}, "test": {"tumor": 1}}
    note = got.data.tags["mlflow.note.content"]
    assert note.startswith("**ATS-10: attention sampling, 10 patches per image**")
    assert "`s3://***@minio:9000/bucket/slides` (sha256:ab12cd34ab12...)" in note
    assert "- images: train 2, test 1 (1 failed); 2 classes" in note and note.endswith("- one more line")
    assert "s3cret" not in json.dumps([entry.dataset.to_dictionary(), got.data.tags])


def test_links_open_the_model_training_view_without_credentials():
    url = tracking.experiment_url("http://bob:pw@mlflow:5000/", "7", "abc")
    assert url == "http://***@mlflow:5000/#/experiments/7/runs/abc?workflowType=machine_learning"
    assert tracking.experiment_url("http://mlflow:5000", "7").endswith("/#/experiments/7?workflowType=machine_learning")
