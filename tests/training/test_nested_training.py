"""`--model nested` in the training library (issue 14): the config section, the region reads through the fetchers,
the per-worker loop without Ray (trains, logs regions and attention pixels per sample, heatmaps, checkpoints,
resumes, reloads), every evaluation mode, predict's `explain`, preflight, and one run of jobs/train.py on Ray."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ats_model.contracts import to_unit_float
from ats_model.nested import NestedExactTooLargeError
from tests.conftest import PROJECT
from tests.training.test_loop import tiny_config
from training import checkpoint
from training import config as C
from training.data import DirectFetcher, LowResViews, level_for_factor, load_split, region_reader_fn
from training.evaluation import evaluate_split
from training.loop import train_loop
from training.models import build_model
from training.preflight import preflight
from training.session import LocalSession

# 192 px images, 3 levels (factors 1, 2, 4), 64-px chunks. Coarse view: level 2 (48 px, data.low_scale=0.25).
# Regions of 128 level-0 px read at level 1 (factor 2): 64 fine px, one chunk each; a 2x2 region grid per image (the
# second row and column half inside). deep_pool as the fine net: 16x16 positions per region, small enough for the
# exact modes.
TINY_NESTED = {"name": "nested", "nested": {"region_px": 128, "fine_downsample": 2, "n_regions": 2,
                                            "n_patches_per_region": 2, "fine_net": "deep_pool"}}


def nested_config(root: str, **sections) -> C.TrainConfig:
    return tiny_config(root, **C.merge({"model": TINY_NESTED}, sections))


def test_the_config_section_is_settable_round_trips_and_maps_to_the_model():
    cfg = C.load(None, ["model.name=nested", "model.nested.n_regions=8", "model.nested.region_px=[256, 512]",
                        "model.nested.inner_replace=true", "model.patch_hw=32"])
    n = cfg.model.nested
    assert (n.n_regions, n.region_px, n.inner_replace, n.fine_downsample) == (8, (256, 512), True, 16)
    assert C.from_dict(cfg.to_dict()) == cfg and C.load(None, []).model.nested == C.NestedConfig()
    flat = C.flatten(cfg)
    assert flat["model.nested.n_regions"] == 8 and flat["model.nested.region_px"] == [256, 512]
    assert "model.nested" not in flat
    model_cfg = cfg.model.nested_config()  # what NestedATSModel gets
    assert model_cfg.sampling.n_regions == 8 and model_cfg.sampling.inner_replace
    assert (model_cfg.region_px, model_cfg.patch_hw, model_cfg.exact_budget_mb) == ((256, 512), (32, 32), 2048.0)


@pytest.mark.parametrize("overrides, fragment", [
    (["model.nested.n_region=3"], "Known keys of model.nested: n_regions"),
    (["model.nested.n_regions=0"], "model.nested: Expected n_regions >= 1"),
    (["model.nested.region_px=100"], "positive multiples of the fine downsample 16"),
    (["model.nested.allocation=counts"], "set outer_replace=True"),
    (["model.nested=8"], "Expected a mapping for section 'model.nested'"),
    (["model.nested.n_regions.x=1"], "like model.n_patches=10 or model.nested.n_regions=8"),
    (["model.name=nested", "model.replace=true"], "set model.replace=false and use model.nested.outer_replace"),
    (["model.name=nested", "model.smoothing=0.1"], "model.nested.region_smoothing"),
    (["model.name=nested", "data.in_memory=true"], "set data.in_memory=false"),
    (["runtime.eval_mode=exact_inner"], "applies to model.name=nested only: set runtime.eval_mode=exact"),
])
def test_config_errors_name_the_fix(overrides, fragment):
    with pytest.raises(C.ConfigError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
        C.load(None, overrides)


def test_region_reads_are_crops_of_the_fine_level_counted_as_regions(tiny_data):
    from pipeline.reader import PatchReader

    reader = PatchReader(tiny_data)
    examples, _ = load_split(tiny_data, "train", 2)
    ids = [e.image_id for e in examples]
    boxes = torch.tensor([[0, 0, 128, 128], [128, 64, 128, 128]])  # level 0; the second one half past the edge
    fetcher = DirectFetcher(reader)
    crops = region_reader_fn(fetcher)(ids, boxes, 2)  # (U, C, 64, 64)
    assert crops.shape == (2, 1, 64, 64) and crops.dtype == torch.float32
    for crop, image_id, box in zip(crops, ids, boxes.numpy()):
        torch.testing.assert_close(crop, to_unit_float(reader.read(image_id, box[None], 1))[0])  # level 1: factor 2
    assert (fetcher.io.regions, fetcher.io.patches) == (2, 0)
    assert level_for_factor(reader.info(ids[0]).downsamples, 4) == 2
    with pytest.raises(ValueError, match=r"exact factor 3 \(its levels' factors: 1, 2, 4\).*fine_downsample"):
        region_reader_fn(fetcher)(ids[:1], boxes[:1], 3)


def test_nested_trains_logs_its_costs_checkpoints_resumes_and_reloads(tiny_data, tmp_path, local_tracking):
    from mlflow.tracking import MlflowClient

    from training.tracking import MlflowTracker

    cfg = nested_config(tiny_data, data={"max_train": 8, "n_attention_maps": 1}, optim={"epochs": 2},
                        runtime={"tracking_uri": local_tracking})
    run = MlflowTracker.create(local_tracking, "nested", "nested")
    session = LocalSession(tmp_path)
    train_loop({"config": cfg.to_dict(), "run_id": run.run_id}, session)
    assert [r["epoch"] for r in session.reports] == [1, 2]
    assert all(np.isfinite(r["train_loss"]) and 4 * r["test_error"] == round(4 * r["test_error"])
               for r in session.reports)
    client = MlflowClient(local_tracking)
    metrics = client.get_run(run.run_id).data.metrics
    assert metrics["regions_per_sample"] == 2.0  # M = 2 distinct regions without replacement, each read once
    assert metrics["attention_px_per_sample"] == 48 * 48 + 2 * 64 * 64  # the coarse view + two fine crops
    assert metrics["bytes_read_per_sample"] > 0
    maps = {a.path for a in client.list_artifacts(run.run_id, "attention/epoch_2")}
    # the loop's heatmap of the first test image, and its map as an array
    assert maps == {"attention/epoch_2/mmnist-test-00000.png", "attention/epoch_2/mmnist-test-00000.npy"}

    model, ckpt = checkpoint.load_model(tmp_path / "epoch_0002")  # rebuilt from config.yaml by the registry
    assert ckpt.config == cfg.replace(model={"band_scaled": False})  # as run: band_scaled auto decided
    assert type(model).__name__ == "NestedModule"
    assert all(torch.equal(v, ckpt.model[k]) for k, v in model.core.state_dict().items())
    assert {k.split(".")[0] for k in ckpt.model} == {"coarse_net", "fine_net", "feature_net", "classifier"}

    again = LocalSession(tmp_path)  # the latest checkpoint is picked up: only epoch 3 runs
    train_loop({"config": cfg.replace(optim={"epochs": 3}).to_dict(), "run_id": ""}, again)
    assert [r["epoch"] for r in again.reports] == [3]


def test_every_evaluation_mode_heatmaps_and_explain(tiny_data):
    from pipeline.reader import PatchReader

    cfg = nested_config(tiny_data, runtime={"eval_repeats": 2})
    reader = PatchReader(tiny_data)
    test, classes = load_split(tiny_data, "test", 2)
    views, fetcher = LowResViews(reader, 0.25), DirectFetcher(reader)
    torch.manual_seed(0)
    model = build_model(cfg.model, 1, len(classes))
    for mode in ("sampled", "topk", "exact_inner", "exact"):
        result = evaluate_split(model, test, views, fetcher, cfg.replace(runtime={"eval_mode": mode}), 0, 1)
        assert 0 <= result.metrics["error"] <= 1 and result.confusion.sum() == 2, mode
        assert ("error_se" in result.metrics) == (mode == "sampled"), mode  # eval_repeats: sampled only
    batch = views.batch(test)
    tight = build_model(cfg.replace(model={"exact_budget_mb": 0.01}).model, 1, len(classes))
    with pytest.raises(NestedExactTooLargeError, match="mode='exact_inner'"):
        tight.logits(batch, fetcher, "exact", None)

    maps = model.attention_maps(batch, fetcher)  # the coarse region attention, the fine one inside the top M
    assert [m.shape for m in maps] == [(48, 48), (48, 48)] and all(np.isfinite(m).all() and m.min() >= 0
                                                                  for m in maps)
    e = model.explain(batch, fetcher, "topk", 3, torch.Generator().manual_seed(0))
    assert e.probabilities.shape == (10,) and abs(e.probabilities.sum() - 1) < 1e-9
    assert e.attention.shape == (2, 2) and abs(e.attention.sum() - 1) < 1e-6  # the 2x2 region grid, A sums to 1
    assert (e.origin_yx, e.step_yx) == ((64.0, 64.0), (128.0, 128.0))
    assert e.boxes.shape == (3, 4) and (e.boxes[:, 2:] == 32).all() and (np.diff(e.box_attention) <= 0).all()


def test_preflight_refuses_misaligned_regions_foreign_factors_and_too_many_regions(tiny_data):
    preflight(nested_config(tiny_data))
    with pytest.raises(C.ConfigError, match=r"region_px=\[64, 64\].*not whole 64-px chunks.*region_px to a multiple "
                                            r"of 128"):
        preflight(nested_config(tiny_data, model={"nested": {"region_px": 64}}))
    with pytest.raises(C.ConfigError, match=r"fine_downsample=8: No pyramid level .* factors: 1, 2, 4"):
        preflight(nested_config(tiny_data, model={"nested": {"fine_downsample": 8, "region_px": 512}}))
    # a 2x2 region grid: 4 drawable regions per image
    with pytest.raises(C.ConfigError, match=r"n_regions=5 .* has 4 drawable regions.*n_regions to <= 4"):
        preflight(nested_config(tiny_data, model={"nested": {"n_regions": 5}}))
    preflight(nested_config(tiny_data, model={"nested": {"n_regions": 5, "outer_replace": True}}))


@pytest.mark.ray
@pytest.mark.slow
def test_jobs_train_model_nested_lands_a_finished_run_in_mlflow(tiny_data, tmp_path):
    """The CLI as a user runs it: embedded Ray, one Ray Train worker, one patch server (regions and patches both
    read through it), a local SQLite MLflow store."""
    from mlflow.tracking import MlflowClient

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = ["data.low_scale=0.25", "model.patch_hw=32", "model.feature_dim=16", "model.nested.region_px=128",
            "model.nested.fine_downsample=2", "model.nested.n_regions=2", "model.nested.n_patches_per_region=2",
            "runtime.num_workers=1", "runtime.num_patch_servers=1", f"runtime.storage_path={tmp_path / 'ray'}"]
    cmd = [sys.executable, "jobs/train.py", "--data", tiny_data, "--model", "nested", "--smoke-test",
           "--experiment", "nested", "--run-name", "nested-smoke", *sum((["--set", s] for s in sets), [])]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(cmd, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("nested").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["model.nested.n_regions"] == "2"
    metrics = run.data.metrics
    assert metrics["regions_per_sample"] == 2.0 and metrics["attention_px_per_sample"] == 48 * 48 + 2 * 64 * 64
    assert metrics["bytes_read_per_sample"] > 0 and np.isfinite(metrics["train_loss"])
    assert {"model", "attention"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
