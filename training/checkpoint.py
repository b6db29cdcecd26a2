"""The checkpoint format, in one place: what a training checkpoint folder holds, how it is written, found and loaded.

    <folder>/state.pt      {"model": state_dict, "optimizer": state_dict, "epoch": int, "classes": [str],
                            "in_channels": int, "budget_used_s": float}: tensors and plain values only
    <folder>/config.yaml   the resolved TrainConfig (credentials stripped)
    <folder>/selection.json  every epoch's metrics so far and the selected epoch (training.selection), for resumes
    <folder>/epoch.txt     the epoch, written LAST: a folder without it is incomplete and never loaded

Loading never unpickles code: `torch.load(..., weights_only=True)` accepts tensors, containers and plain values
only, so a crafted state.pt that would run code on load is refused with `UnsafeCheckpointError`.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training import config as C

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
EPOCH_FILE = "epoch.txt"  # written after state.pt and config.yaml: a checkpoint folder with it is complete


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete or not one of ours; the message says what to pass instead."""


class ModelNotFoundError(CheckpointError):
    """Neither a checkpoint folder nor an MLflow run with a logged model; the message names both ways to fix it."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds objects other than tensors and plain values: loading it could run code, so it is refused."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What a checkpoint folder holds, loaded."""

    config: C.TrainConfig
    model: dict[str, torch.Tensor]  # the core model's state_dict
    optimizer: dict[str, Any]
    epoch: int
    classes: tuple[str, ...]
    in_channels: int
    budget_used_s: float = 0.0


def save(folder: str | Path, *, config: C.TrainConfig, model: dict[str, torch.Tensor], optimizer: dict[str, Any],
         epoch: int, classes: tuple[str, ...] | list[str], in_channels: int, budget_used_s: float) -> None:
    """Write a complete checkpoint into `folder` (epoch.txt last). `config` is written with credentials stripped."""
    from training.secrets import redact_config

    folder = Path(folder)
    torch.save({"model": model, "optimizer": optimizer, "epoch": int(epoch), "classes": [str(c) for c in classes],
                "in_channels": int(in_channels), "budget_used_s": float(budget_used_s)}, folder / STATE_FILE)
    (folder / CONFIG_FILE).write_text(C.to_yaml(redact_config(config)))
    (folder / EPOCH_FILE).write_text(str(int(epoch)))


def epoch_of(folder: str | Path) -> int:
    """The epoch a checkpoint folder holds, -1 when it is incomplete."""
    try:
        return int((Path(folder) / EPOCH_FILE).read_text())
    except (OSError, ValueError):
        return -1


def latest(folders: list[str]) -> str | None:
    """The complete checkpoint folder with the highest epoch among `folders` (None when none is complete)."""
    complete = [f for f in folders if epoch_of(f) >= 0]
    return max(complete, key=epoch_of, default=None)


def load_state(folder: str | Path) -> dict[str, Any]:
    """state.pt of a complete checkpoint, loaded without unpickling code."""
    folder = Path(folder)
    if epoch_of(folder) < 0:
        raise CheckpointError(f"{str(folder)!r} is not a complete checkpoint (no {EPOCH_FILE}): pass a folder "
                              "written by jobs/train.py, e.g. <storage_path>/<run>/checkpoint_<time>.")
    try:
        return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"Refusing to load {str(folder / STATE_FILE)!r}: it holds objects other than tensors and plain values, "
            f"and unpickling them could run code ({str(exc).splitlines()[0]}). Checkpoints written by jobs/train.py "
            "never do; use one of those.") from None
    except (RuntimeError, EOFError, OSError) as exc:  # truncated or half-copied (a stop during the copy)
        raise CheckpointError(f"{str(folder / STATE_FILE)!r} is damaged or incomplete ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}): use an earlier checkpoint "
                              "of the run.") from None


def newest_loadable(run_dir: str | Path) -> str | None:
    """The newest checkpoint_* folder under a Ray run folder that is complete AND loads (a stop while Ray copied
    the last one can leave it half-written); None when there is none."""
    folders = sorted((p.parent for p in Path(run_dir).glob(f"checkpoint_*/{EPOCH_FILE}")),
                     key=lambda f: (epoch_of(f), str(f)), reverse=True)
    for folder in folders:
        try:
            load_state(folder)
        except CheckpointError:
            continue
        return str(folder)
    return None


def load(folder: str | Path) -> Checkpoint:
    """Everything in a complete checkpoint folder (config from its config.yaml)."""
    state = load_state(folder)
    return Checkpoint(config=C.load(Path(folder) / CONFIG_FILE), model=state["model"],
                      optimizer=state["optimizer"], epoch=int(state["epoch"]), classes=tuple(state["classes"]),
                      in_channels=int(state["in_channels"]), budget_used_s=float(state.get("budget_used_s", 0.0)))


def load_model(folder: str | Path):
    """(the TrainModule rebuilt from the checkpoint's config by the model registry, with its weights; the checkpoint).
    `.core` is the bare ATSModel / DeepMIL / CNNBaseline."""
    from training.models import build_model, import_plugins

    ckpt = load(folder)
    import_plugins(ckpt.config.model.plugins)
    model = build_model(ckpt.config.model, ckpt.in_channels, len(ckpt.classes))
    model.core.load_state_dict(ckpt.model)
    return model, ckpt


def load_model_from_run(run_id: str, tracking_uri: str):
    """(model, checkpoint) of an MLflow training run, from the checkpoint folder it logged as `model/`."""
    import tempfile

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from training.secrets import redact

    with tempfile.TemporaryDirectory(prefix="gats-model-") as folder:
        try:
            path = MlflowClient(tracking_uri).download_artifacts(run_id, "model", folder)
        except (MlflowException, OSError) as exc:
            raise ModelNotFoundError(
                f"{redact(run_id)!r} is neither a checkpoint folder nor a run with a logged model in the MLflow store "
                f"{redact(tracking_uri)} ({redact(str(exc).splitlines()[0])}). Pass a folder written by jobs/train.py "
                "(<storage_path>/<run>/checkpoint_<time>) or a run id shown by `mlflow ui`, with --tracking-uri for "
                "another store.") from None
        return load_model(path)
