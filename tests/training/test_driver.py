"""The driver's set-up before Ray starts: what `resolve` fills in, and the Ray Train log noise it silences."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from training import config as C
from training import driver


def test_resolve_fills_paths_and_names_and_turns_bars_off_without_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    monkeypatch.chdir(tmp_path)
    cfg = driver.resolve(C.from_dict({"data": {"root": "data/mnist"}, "runtime": {"progress": True}}))
    assert cfg.data.root == str(tmp_path / "data" / "mnist")  # absolute: the job API's working dir is a copy
    assert cfg.runtime.tracking_uri == f"sqlite:///{tmp_path / 'm.db'}"
    assert cfg.runtime.run_name.startswith("ats-10-mnist-") and Path(cfg.runtime.storage_path).is_absolute()
    assert cfg.runtime.progress is False  # pytest captures stderr: no terminal, so a line per epoch, no bar frames
    with pytest.raises(C.ConfigError, match="--data ROOT"):
        driver.resolve(C.TrainConfig())


def test_the_worker_set_up_hook_silences_the_placement_group_cleaner():
    noisy = logging.getLogger(driver.RAY_TRAIN_NOISE)
    before = noisy.level
    try:
        noisy.setLevel(logging.NOTSET)
        assert noisy.isEnabledFor(logging.WARNING)
        driver.quiet_worker_logs()
        assert not noisy.isEnabledFor(logging.WARNING) and noisy.isEnabledFor(logging.ERROR)
    finally:
        noisy.setLevel(before)
    import ray.train.v2._internal.execution.controller.placement_group_cleaner as cleaner  # the module still exists

    assert cleaner.logger.name == driver.RAY_TRAIN_NOISE
