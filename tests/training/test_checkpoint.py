"""The checkpoint format: complete folders only, and loading never runs code (weights_only), whatever the file says."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from training import checkpoint
from training import config as C


class _WritesAFile:
    """What an attacker would pickle: unpickling it runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _crafted(folder: Path, marker: Path) -> Path:
    """A checkpoint folder that looks complete but whose state.pt runs code when unpickled."""
    folder.mkdir(parents=True)
    torch.save({"model": {}, "optimizer": _WritesAFile(marker), "epoch": 1, "classes": ["0"], "in_channels": 1,
                "budget_used_s": 0.0}, folder / checkpoint.STATE_FILE)
    (folder / checkpoint.CONFIG_FILE).write_text(C.to_yaml(C.TrainConfig()))
    (folder / checkpoint.EPOCH_FILE).write_text("1")
    return folder


def test_a_crafted_checkpoint_is_refused_everywhere_and_runs_nothing(tiny_data, tmp_path, local_tracking):
    from jobs import evaluate, train
    from tests.training.test_loop import tiny_config
    from training.loop import train_loop
    from training.session import LocalSession

    marker = tmp_path / "pwned"
    folder = _crafted(tmp_path / "evil", marker)
    with pytest.raises(checkpoint.UnsafeCheckpointError, match="could run code"):
        checkpoint.load(folder)
    assert evaluate.main(["--checkpoint", str(folder), "--tracking-uri", local_tracking]) == 2
    assert train.main(["--data", tiny_data, "--model", "ats", "--resume", str(folder)]) == 2  # before Ray starts
    cfg = tiny_config(tiny_data, runtime={"resume_from": str(folder)})
    with pytest.raises(checkpoint.UnsafeCheckpointError):
        train_loop({"config": cfg.to_dict(), "run_id": ""}, LocalSession(tmp_path / "run"))
    assert not marker.exists()
    # the negative control: the same file unpickled the unsafe way does run the command
    torch.load(folder / checkpoint.STATE_FILE, weights_only=False)
    assert marker.exists()


def test_save_load_round_trip_and_incomplete_folders(tmp_path):
    cfg = C.TrainConfig().replace(model={"n_patches": 3})
    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    optimiser = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9)
    (tmp_path / "a").mkdir()
    checkpoint.save(tmp_path / "a", config=cfg, model=weights, optimizer=optimiser.state_dict(), epoch=4,
                    classes=("cat", "dog"), in_channels=3, budget_used_s=12.5)
    loaded = checkpoint.load(tmp_path / "a")
    assert loaded.config == cfg and loaded.epoch == 4 and loaded.classes == ("cat", "dog")
    assert torch.equal(loaded.model["w"], weights["w"]) and (loaded.in_channels, loaded.budget_used_s) == (3, 12.5)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / checkpoint.EPOCH_FILE).unlink()  # a write that stopped before its last file
    assert checkpoint.epoch_of(tmp_path / "b") == -1
    assert checkpoint.latest([str(tmp_path / "b"), str(tmp_path / "a")]) == str(tmp_path / "a")
    with pytest.raises(checkpoint.CheckpointError, match="not a complete checkpoint"):
        checkpoint.load(tmp_path / "b")
