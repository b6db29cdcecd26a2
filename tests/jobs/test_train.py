"""The per-worker loop without Ray (LocalSession, direct PatchReader): every model kind trains, checkpoints and
resumes; plus the overlapped ATS forward equals the core model's forward."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from jobs import config as C
from jobs.data import DirectFetcher, LowResViews, load_split, patch_reader_fn, shard_indices
from jobs.train_loop import LocalSession, build_model, core, train_loop

TINY_MODEL = {"patch_size": 32, "n_patches": 4, "feature_dim": 16, "mil_stride": 32, "cnn_width": 4, "cnn_stages": 2}


def tiny_config(root: str, **sections) -> C.TrainConfig:
    base = {"data": {"root": root, "low_scale": 0.25, "cnn_scale": 0.5, "batch_size": 4, "max_test": 4},
            "model": TINY_MODEL, "optim": {"epochs": 1, "lr": 3e-3},
            "runtime": {"progress": False, "num_workers": 1, "num_patch_servers": 0}}
    return C.from_dict(C.merge(base, sections))


def test_shards_are_equal_and_cover_everything():
    shards = [shard_indices(10, r, 3, epoch=2) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    assert set(sum(shards, [])) == set(range(10))
    assert shard_indices(10, 0, 3, epoch=2) != shard_indices(10, 0, 3, epoch=3)
    assert sorted(sum((shard_indices(7, r, 2, shuffle=False, pad=False) for r in range(2)), [])) == list(range(7))


def test_streaming_forward_matches_the_core_model(tiny_data):
    from pipeline.reader import PatchReader

    reader = PatchReader(tiny_data)
    examples, classes = load_split(tiny_data, "train", 4)
    batch = LowResViews(reader, 0.25).batch(examples)
    model = build_model(C.ModelConfig(**TINY_MODEL), 1, len(classes))
    fetcher = DirectFetcher(reader)
    out = model(batch, fetcher, torch.Generator().manual_seed(3))
    ref = model.ats(batch.low, patch_reader_fn(fetcher), batch.image_ids, batch.level0_hw, batch.low_hw,
                    generator=torch.Generator().manual_seed(3))
    assert torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(out.logits, ref.logits)
    assert fetcher.io.patches == 2 * 4 * 4


def test_ats_trains_checkpoints_and_resumes(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, optim={"epochs": 2})
    session = LocalSession(tmp_path)
    train_loop({"config": cfg.to_dict(), "run_id": ""}, session)
    assert [r["epoch"] for r in session.reports] == [1, 2]
    assert all(np.isfinite(r["train_loss"]) and 0 <= r["test_error"] <= 1 for r in session.reports)
    state = torch.load(tmp_path / "epoch_0002" / "state.pt", weights_only=False)
    assert state["epoch"] == 2 and "optimizer" in state and (tmp_path / "epoch_0002" / "config.yaml").is_file()

    again = LocalSession(tmp_path)  # the latest checkpoint is picked up: only epoch 3 runs
    train_loop({"config": cfg.replace(optim={"epochs": 3}).to_dict(), "run_id": ""}, again)
    assert [r["epoch"] for r in again.reports] == [3]


@pytest.mark.parametrize("name", ["uniform", "deepmil", "cnn"])
def test_every_model_kind_runs_an_epoch(tiny_data, tmp_path, name):
    cfg = tiny_config(tiny_data, model={"name": name}, data={"max_train": 4},
                      optim={"class_weighted": name == "cnn"}, runtime={"eval_mode": "exact"})
    session = LocalSession(tmp_path)
    train_loop({"config": cfg.to_dict(), "run_id": ""}, session)
    assert len(session.reports) == 1 and np.isfinite(session.reports[0]["train_loss"])
    state = torch.load(tmp_path / "epoch_0001" / "state.pt", weights_only=False)
    rebuilt = core(build_model(cfg.model, 1, 10))
    rebuilt.load_state_dict(state["model"])
