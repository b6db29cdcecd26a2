"""Credentials in URIs (tracking URI, Ray address, storage path, data root) and in the environment never reach what a
run records: params, tags, artifacts (config.yaml, the model checkpoint), checkpoints on disk and log lines."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from training import config as C
from training.secrets import RedactingFilter, redact, redact_config

SECRET = "pw-S3CRET-42"
ENV_SECRET = "env-SECRET-77"


@pytest.mark.parametrize("text, expected", [
    ("http://alice:pw@mlflow:5000/x", "http://***@mlflow:5000/x"),
    ("ray://alice@head:10001", "ray://***@head:10001"),
    ("uri s3://key:sec%2Fret@bucket/p and https://a:b@h", "uri s3://***@bucket/p and https://***@h"),
    ("s3://bucket/prefix", "s3://bucket/prefix"),
    ("sqlite:////tmp/a@b/mlflow.db", "sqlite:////tmp/a@b/mlflow.db"),  # a path with @ is no user-info
    ("user@example.org", "user@example.org"),
])
def test_redact_strips_user_info_of_every_uri_and_nothing_else(text, expected):
    assert redact(text) == expected


def test_redact_config_touches_every_string_field():
    cfg = C.from_dict({"data": {"root": f"s3://k:{SECRET}@b/p"},
                       "runtime": {"address": f"ray://u:{SECRET}@h:1", "storage_path": f"s3://k:{SECRET}@b/r",
                                   "tracking_uri": f"http://u:{SECRET}@h"}})
    shown = redact_config(cfg)
    assert SECRET not in C.to_yaml(shown) and SECRET in C.to_yaml(cfg)  # the workers keep what they need
    assert shown.runtime.tracking_uri == "http://***@h" and shown.model == cfg.model


def test_a_run_with_credentials_everywhere_records_none(tiny_data, mlflow_server, tmp_path, monkeypatch, caplog,
                                                        capsys):
    """A real `mlflow server` reached through a URI that carries a password; the run's params, tags, every artifact,
    the checkpoint folder, the log lines and what evaluation prints must not contain it (nor an AWS_* secret)."""
    from mlflow.tracking import MlflowClient

    from jobs import evaluate
    from tests.training.test_loop import tiny_config
    from training import driver
    from training.loop import train_loop
    from training.session import LocalSession

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    uri = mlflow_server.replace("http://", f"http://gats:{SECRET}@")
    cfg = tiny_config(tiny_data, data={"max_train": 4}, runtime={
        "tracking_uri": uri, "address": f"ray://admin:{SECRET}@head:10001", "storage_path": f"s3://k:{SECRET}@b/ray",
        "run_name": "secret-run", "experiment": "secrets"})
    caplog.set_level(logging.INFO)
    logging.getLogger().addFilter(RedactingFilter())  # what training.logs.configure_logging installs on handlers
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
    run = driver.create_run(cfg)
    folder = tmp_path / "ckpt"
    train_loop({"config": cfg.to_dict(), "run_id": run.run_id}, LocalSession(folder))
    run.log_checkpoint(folder / "epoch_0001")
    run.set_tags({"gats.checkpoint": f"s3://k:{SECRET}@b/ray/checkpoint_1"})
    run.finish()
    assert evaluate.main(["--run-id", run.run_id, "--tracking-uri", uri, "--mode", "topk", "--max-images", "2"]) == 0

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("secrets").experiment_id])
    assert len(runs) == 2  # the training run and the evaluation run, both reached through the password URI
    seen: list[str] = []
    for r in runs:
        seen += [f"{k}={v}" for k, v in r.data.params.items()] + [f"{k}={v}" for k, v in r.data.tags.items()]
        local = Path(client.download_artifacts(r.info.run_id, "", str(tmp_path / r.info.run_id)))
        seen += [p.read_bytes().decode("latin-1") for p in local.rglob("*") if p.is_file()]
    assert any("model/state.pt" in str(p) for p in (tmp_path / run.run_id).rglob("*"))
    assert any("***@" in s for s in seen)  # the URIs are there, redacted
    seen += [p.read_bytes().decode("latin-1") for p in folder.rglob("*") if p.is_file()]
    seen += [caplog.text, "\n".join(r.getMessage() for r in caplog.records), *capsys.readouterr()]
    assert any("MLflow run secret-run" in s for s in seen)  # the log line that names the store was written
    leaks = [s[:200] for s in seen if SECRET in s or ENV_SECRET in s]
    assert not leaks
