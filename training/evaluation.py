"""Evaluate a trained model on a split, in one or more modes (what jobs/evaluate.py calls).

    model, ckpt = checkpoint.load_model(folder)               a checkpoint folder written by training
    model, cfg = load_from_run(run_id, tracking_uri)          the `model/` checkpoint logged with an MLflow run
    errors = evaluate(model, cfg, "test", ["sampled", "topk"])

Neither load unpickles code: the weights are loaded with `weights_only=True` and the model is rebuilt from its
config by the model registry. Patches are read in this process through a PatchReader (no Ray).
"""
from __future__ import annotations

import tempfile
from typing import Sequence

import torch

from training import checkpoint
from training import config as C
from training.data import DirectFetcher, LowResViews, load_split
from training.loop import evaluate_split
from training.models import KINDS, TrainModule


def load_from_run(run_id: str, tracking_uri: str) -> tuple[TrainModule, C.TrainConfig]:
    """(model, config) of an MLflow training run, from the checkpoint folder it logged as `model/`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="gats-eval-") as folder:
        path = client.download_artifacts(run_id, "model", folder)
        model, ckpt = checkpoint.load_model(path)
    return model, ckpt.config


def evaluate(model: TrainModule, cfg: C.TrainConfig, split: str, modes: Sequence[str], max_n: int = 0
             ) -> dict[str, float]:
    """{mode: error} of `model` on `split` of cfg.data.root."""
    from pipeline.reader import PatchReader

    torch.manual_seed(cfg.optim.seed)
    reader = PatchReader(cfg.data.root)
    examples, _ = load_split(cfg.data.root, split, max_n)
    views, fetcher = LowResViews(reader, KINDS[cfg.model.name].view_scale(cfg.data)), DirectFetcher(reader)
    try:
        return {mode: evaluate_split(model, examples, views, fetcher, cfg, 0, 1, mode=mode)  # type: ignore[arg-type]
                for mode in modes}
    finally:
        fetcher.close()
