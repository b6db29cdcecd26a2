"""The per-worker loop without Ray (LocalSession, direct PatchReader): every model kind trains, checkpoints and
resumes; plus the overlapped ATS forward equals the core model's forward."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from training import config as C
from training import checkpoint
from training.data import DirectFetcher, LowResViews, load_split, patch_reader_fn, shard_indices
from training.loop import train_loop
from training.models import build_model
from training.session import LocalSession

TINY_MODEL = {"patch_hw": 32, "n_patches": 4, "feature_dim": 16, "mil_stride": 32, "cnn_width": 4, "cnn_stages": 2}


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
    model = build_model(C.from_dict({"model": TINY_MODEL}).model, 1, len(classes))
    fetcher = DirectFetcher(reader)
    loss, logits = model(batch, fetcher, None, torch.Generator().manual_seed(3))
    ref = model.core(batch.low, patch_reader_fn(fetcher), batch.image_ids, batch.level0_hw, batch.low_hw,
                     low_scale=batch.low_scale, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(logits, ref.logits)
    torch.testing.assert_close(loss, model.core.loss(ref, batch.labels))
    assert fetcher.io.patches == 2 * 4 * 4
    assert batch.low_scale.tolist() == [[4.0, 4.0]] * 4  # 192 px at level 2: exactly 4, not 192 / 48


def test_ats_trains_checkpoints_and_resumes(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, optim={"epochs": 2})
    session = LocalSession(tmp_path)
    train_loop({"config": cfg.to_dict(), "run_id": ""}, session)
    assert [r["epoch"] for r in session.reports] == [1, 2]
    assert all(np.isfinite(r["train_loss"]) for r in session.reports)
    # the test error is a count of wrong answers over max_test = 4 images
    assert all(4 * r["test_error"] == round(4 * r["test_error"]) for r in session.reports)
    ckpt = checkpoint.load(tmp_path / "epoch_0002")
    # the checkpoint holds the config as run: model.band_scaled auto decided (uint8 digits: off)
    assert ckpt.epoch == 2 and ckpt.optimizer["state"] and ckpt.config == cfg.replace(model={"band_scaled": False})

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
    model, ckpt = checkpoint.load_model(tmp_path / "epoch_0001")  # rebuilt by the registry, weights loaded
    assert ckpt.classes == tuple(str(d) for d in range(10))
    assert all(torch.equal(v, ckpt.model[k]) for k, v in model.core.state_dict().items())


@pytest.mark.parametrize("name", ["ats", "nested"])
def test_band_scaled_nets_read_the_training_splits_statistics_and_reload_from_the_checkpoint(tiny_data, tmp_path,
                                                                                            name):
    from ats_model.nets import BandScaled
    from training.data import pooled_band_stats

    nested = {"nested": {"region_px": 128, "fine_downsample": 2, "n_regions": 2, "n_patches_per_region": 2,
                         "fine_net": "deep_pool"}} if name == "nested" else {}
    cfg = tiny_config(tiny_data, model={"name": name, "band_scaled": True, **nested}, data={"max_train": 4})
    session = LocalSession(tmp_path)
    train_loop({"config": cfg.to_dict(), "run_id": ""}, session)
    assert len(session.reports) == 1 and np.isfinite(session.reports[0]["train_loss"])
    model, ckpt = checkpoint.load_model(tmp_path / "epoch_0001")  # placeholders, overwritten by the saved buffers
    mean, std = pooled_band_stats(load_split(tiny_data, "train", 4)[0])
    scaled = [m for m in model.core.modules() if isinstance(m, BandScaled)]
    assert len(scaled) == (3 if name == "nested" else 2)  # every net: attention (coarse, fine) and feature
    for m in scaled:
        torch.testing.assert_close(m.mean.flatten(), torch.tensor(mean, dtype=torch.float32))
        torch.testing.assert_close(m.std.flatten(), torch.tensor(std, dtype=torch.float32))
    assert 0 < mean[0] < 0.5 and 0 < std[0]  # MNIST digits on black: dark on average, far from 1


@pytest.mark.ray
@pytest.mark.slow
def test_ray_train_survives_a_killed_worker_and_logs_to_an_mlflow_server(tiny_data, mlflow_server, tmp_path,
                                                                          monkeypatch):
    """The whole driver on an embedded 2-CPU Ray: 2 workers, 2 patch servers, a real `mlflow server`, a feature net
    from a plugin module. Rank 0 exits halfway through epoch 2; Ray Train restarts the group from the epoch-1
    checkpoint and the run finishes."""
    from mlflow.tracking import MlflowClient

    import ray

    from training import driver
    from training.tracking import EPOCH_METRICS, RUN_METRICS

    marker = tmp_path / "killed-once"
    # the feature net comes from a plugin module the workers must import themselves (model.plugins)
    cfg = tiny_config(tiny_data, data={"batch_size": 2, "max_train": 8, "n_attention_maps": 2},
                      model={"plugins": ["tests.training.plugin_nets"], "feature_net": "plugin_tiny"},
                      optim={"epochs": 2}, runtime={"num_workers": 2, "num_patch_servers": 2, "num_cpus": 2,
                                                    "storage_path": str(tmp_path / "ray"), "tracking_uri": mlflow_server,
                                                    "run_name": "ats-killed-worker", "experiment": "test-train"})
    cfg = driver.resolve(cfg)
    driver.start_ray(cfg)
    try:
        driver.run(cfg, on_step=KillOnce(str(marker), epoch=2))
    finally:
        ray.shutdown()
    assert marker.is_file()  # the worker really died once

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("test-train")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "ats-killed-worker"
    params = run.data.params
    assert params["model.n_patches"] == "4" and params["runtime.num_workers"] == "2"
    assert params["model.feature_net"] == "plugin_tiny" and params["model.plugins"] == "['tests.training.plugin_nets']"
    assert params["data.root"] == tiny_data and params["data.manifest_checksum"].startswith("sha256:")
    assert params["eval_mode"] == "sampled"
    for name in EPOCH_METRICS:  # each epoch once, though epoch 2 was started twice
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [1, 2], name
    assert run.data.metrics["train_loss"] < 5 and 4 * run.data.metrics["test_error"] == round(
        4 * run.data.metrics["test_error"])  # wrong answers over 4 test images
    missing = set(RUN_METRICS) - set(run.data.metrics) - {"cuda_max_allocated_mb"}
    assert not missing
    assert run.data.metrics["bytes_read_per_sample"] > 0 and run.data.metrics["patches_per_s"] > 0
    assert 0 < run.data.metrics["io_wait_fraction"] < 1  # the servers' reads are waited for, and not always
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "attention", "model"} <= top
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert logged == {"model/state.pt", "model/config.yaml", "model/epoch.txt",  # a weights-only checkpoint
                      "model/selection.json"}  # and the epochs' metrics (training/selection.py)
    maps = {a.path for a in client.list_artifacts(run.info.run_id, "attention/epoch_2")}
    assert maps == {f"attention/epoch_2/mmnist-test-0000{i}.{ext}" for i in (0, 1) for ext in ("png", "npy")}
    assert run.data.metrics["selected_epoch"] == 2  # no select_metric: the last epoch
    assert {a.path for a in client.list_artifacts(run.info.run_id, "confusion")} == {
        "confusion/test.csv", "confusion/test.png"}
    assert run.data.tags["gats.checkpoint"].startswith(str(tmp_path / "ray"))


def test_test_error_is_the_error_of_the_same_samples_as_before(tiny_data, tmp_path):
    """The gathered metrics did not change the headline number: test_error equals the count of wrong argmaxes
    under the per-worker evaluation generator seeded as it always was (10_000 + seed * 1000 + epoch * 100 + rank)."""
    cfg = tiny_config(tiny_data, data={"max_train": 4, "batch_size": 3}, optim={"seed": 2})
    session = LocalSession(tmp_path)
    train_loop({"config": cfg.to_dict(), "run_id": ""}, session)
    model, _ = checkpoint.load_model(tmp_path / "epoch_0001")
    from pipeline.reader import PatchReader

    reader = PatchReader(tiny_data)
    test, _ = load_split(tiny_data, "test", 4)
    views, fetcher = LowResViews(reader, 0.25), DirectFetcher(reader)
    gen = torch.Generator().manual_seed(10_000 + 2 * 1000 + 1 * 100 + 0)
    model.eval()
    wrong = 0
    for start in range(0, 4, 3):
        batch = views.batch(test[start:start + 3])
        wrong += int((model.logits(batch, fetcher, "sampled", gen).argmax(1) != batch.labels).sum())
    report = session.reports[0]
    assert report["test_error"] == wrong / 4
    assert {"test_balanced_accuracy", "test_auc"} <= set(report) and "val_error" not in report
    assert any(k.startswith("test_recall_") for k in report)


def test_in_memory_and_unprefetched_runs_train_exactly_like_reading_the_store(tiny_data, tmp_path):
    """The same seed gives the same losses whether pixels come from the store, from RAM, or without the prefetch
    thread: the data path changes where pixels come from, never which pixels or which samples."""
    losses = {}
    for name, data in {"store": {}, "ram": {"in_memory": True}, "no-prefetch": {"prefetch": False}}.items():
        session = LocalSession(tmp_path / name)
        train_loop({"config": tiny_config(tiny_data, data=data, optim={"epochs": 2}).to_dict(), "run_id": ""},
                   session)
        losses[name] = [r["train_loss"] for r in session.reports]
    assert losses["ram"] == losses["store"] and losses["no-prefetch"] == losses["store"]


def test_time_budget_stops_every_model_at_the_same_point_and_survives_resume(tiny_data, tmp_path, local_tracking):
    """A budget smaller than one step: one step of epoch 1 trains, epoch 1 is evaluated and checkpointed, no
    further epoch runs, and a resumed run that already spent its budget trains nothing more."""
    from mlflow.tracking import MlflowClient

    from training.tracking import MlflowTracker

    cfg = tiny_config(tiny_data, optim={"epochs": 3, "time_budget_s": 1e-6}, data={"batch_size": 2},
                      runtime={"tracking_uri": local_tracking})
    run = MlflowTracker.create(local_tracking, "budget", "budget")
    session = LocalSession(tmp_path)
    train_loop({"config": cfg.to_dict(), "run_id": run.run_id}, session)
    assert [r["epoch"] for r in session.reports] == [1]
    metrics = MlflowClient(local_tracking).get_run(run.run_id).data.metrics
    assert 0 < metrics["train_time_s"] == pytest.approx(checkpoint.load(tmp_path / "epoch_0001").budget_used_s)
    # one step of 2 samples: time per sample is half the training time
    assert metrics["time_per_sample_ms"] == pytest.approx(1000 * metrics["train_time_s"] / 2)
    assert metrics["samples_per_s"] == pytest.approx(1000 / metrics["time_per_sample_ms"])  # one worker

    again = LocalSession(tmp_path)
    train_loop({"config": cfg.to_dict(), "run_id": ""}, again)
    assert again.reports == []
    with pytest.raises(C.ConfigError, match="time_budget_s"):
        C.from_dict({"optim": {"time_budget_s": -1}})


class KillOnce:
    """A step hook: rank 0 exits (as a crashed worker would) halfway through `epoch`, once (the marker file says)."""

    def __init__(self, marker: str, epoch: int) -> None:
        self.marker, self.epoch = marker, epoch

    def __call__(self, epoch: int, step: int, steps: int, rank: int) -> None:
        import os
        from pathlib import Path

        if epoch == self.epoch and rank == 0 and step == steps // 2 and not Path(self.marker).exists():
            Path(self.marker).write_text(f"killed at epoch {epoch}, step {step}\n")
            os._exit(1)


def test_a_missing_plugin_names_the_fix(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, model={"plugins": ["no_such_plugin_module"]})
    with pytest.raises(C.ConfigError, match="model.plugins module 'no_such_plugin_module'.*working-dir"):
        train_loop({"config": cfg.to_dict(), "run_id": ""}, LocalSession(tmp_path))


def test_a_damaged_chunk_fails_training_with_the_typed_error_naming_the_image(tiny_data, tmp_path):
    """Never train on garbage: a chunk whose bytes changed after ingest stops the step with CorruptChunkError naming
    the image (no substitute pixels, no silent epoch)."""
    import shutil

    from pipeline.errors import CorruptChunkError
    from pipeline.manifest import read_manifest

    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    victim = next(r.image_id for r in read_manifest(str(root))[0] if r.split == "train")
    for chunk in (root / "images" / f"{victim}.zarr").glob("*/c/0/*/*"):  # every chunk of every level
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0x04
        chunk.write_bytes(bytes(data))
    cfg = tiny_config(str(root))
    with pytest.raises(CorruptChunkError, match=f"image '{victim}'.*is damaged"):
        train_loop({"config": cfg.to_dict(), "run_id": ""}, LocalSession(tmp_path / "ckpt"))


@pytest.fixture(scope="module")
def masked_data(tmp_path_factory) -> str:
    """tiny_data's recipe ingested with a nodata mask (0 = the black canvas): foreground = digits and noise."""
    from pipeline.ingest import WriteOptions, ingest_generated
    from pipeline.megapixel_mnist import MegapixelMNISTConfig

    root = str(tmp_path_factory.mktemp("masked") / "mnist")
    report = ingest_generated(root, MegapixelMNISTConfig(size=192, n_digits=3, n_noise=4), n_train=12, n_test=6,
                              options=WriteOptions(chunk=64, min_size=48, mask="nodata", nodata=0), workers=2)
    assert report.complete, report.summary()
    return root


def test_min_tissue_draws_only_patches_on_foreground_and_trains(masked_data, tmp_path):
    """Sampled boxes, read back at level 0, hold digit or noise pixels with the mask on; at initialisation (flat
    attention) most do not without it. Then an epoch trains with the mask, heatmaps and all."""
    from pipeline.reader import PatchReader

    reader = PatchReader(masked_data)
    examples, classes = load_split(masked_data, "train")
    on_foreground = {}
    for min_tissue in (0.0, 0.05):
        batch = LowResViews(reader, 0.25, min_tissue).batch(examples)
        model = build_model(C.from_dict({"model": TINY_MODEL}).model, 1, len(classes))
        plan = model.core.plan(batch.low, batch.level0_hw, batch.low_hw, low_scale=batch.low_scale,
                               generator=torch.Generator().manual_seed(0), **batch.masking)
        hits = [bool(reader.read(i, plan.boxes[k].numpy()).reshape(4, -1).any(1).all())
                for k, i in enumerate(batch.image_ids)]  # every drawn patch of image k holds a non-zero pixel
        on_foreground[min_tissue] = sum(hits) / len(hits)
    assert on_foreground[0.05] == 1.0 and on_foreground[0.0] < 0.5

    cfg = tiny_config(masked_data, data={"max_train": 8, "min_tissue": 0.05, "n_attention_maps": 2})
    session = LocalSession(tmp_path)
    train_loop({"config": cfg.to_dict(), "run_id": ""}, session)
    assert len(session.reports) == 1 and np.isfinite(session.reports[0]["train_loss"])


def test_a_13_band_uint16_geotiff_dataset_trains_with_per_band_scaling(tmp_path):
    """Multiband 16-bit rasters through the whole path: GeoTIFF -> ingest -> ATS on 13 bands, every net reading
    (x - mean) / std with the training split's statistics (12-bit values in uint16 sit near 0.03 over the dtype's
    maximum; scaled, they are about unit variance). model.band_scaled is left unset: auto turns it on for uint16."""
    from ats_model.nets import BandScaled
    from pipeline.ingest import WriteOptions, ingest_sources
    from tests.pipeline.test_geotiff import sentinel_like, write_geotiff
    from training.data import pooled_band_stats

    lines = []
    for i in range(8):
        pixels = sentinel_like(i, 128, 128)
        if i % 2:
            pixels[7, 40:70, 40:70] = 4000  # class 1: a bright square in band 8
        lines.append(f"{write_geotiff(tmp_path / f's{i}.tif', pixels)},{i % 2},{'train' if i < 6 else 'test'}")
    (tmp_path / "list.csv").write_text("path,label,split\n" + "\n".join(lines) + "\n")
    root = str(tmp_path / "data")
    assert ingest_sources(root, [str(tmp_path / "list.csv")], options=WriteOptions(chunk=64, min_size=32)).complete
    cfg = tiny_config(root, data={"batch_size": 2})
    assert cfg.model.band_scaled is None
    session = LocalSession(tmp_path / "ckpt")
    train_loop({"config": cfg.to_dict(), "run_id": ""}, session)
    assert len(session.reports) == 1 and np.isfinite(session.reports[0]["train_loss"])
    model, saved = checkpoint.load_model(tmp_path / "ckpt" / "epoch_0001")
    assert saved.config.model.band_scaled is True  # the checkpoint records the decision, so predict rebuilds the same nets
    mean, std = pooled_band_stats(load_split(root, "train")[0])
    scaled = [m for m in model.core.modules() if isinstance(m, BandScaled)]
    assert len(scaled) == 2 and scaled[0].mean.numel() == 13
    torch.testing.assert_close(scaled[0].mean.flatten(), torch.tensor(mean, dtype=torch.float32))
    assert max(mean) < 0.07 and min(std) > 0
    # a run trained unscaled (explicitly, or by the old default) resumes unscaled under auto: same nets, same weights
    plain = LocalSession(tmp_path / "plain")
    train_loop({"config": tiny_config(root, model={"band_scaled": False}, data={"batch_size": 2}).to_dict(),
                "run_id": ""}, plain)
    resumed = tiny_config(root, data={"batch_size": 2}, optim={"epochs": 2},
                          runtime={"resume_from": str(tmp_path / "plain" / "epoch_0001")})
    train_loop({"config": resumed.to_dict(), "run_id": ""}, LocalSession(tmp_path / "resumed"))
    _, saved = checkpoint.load_model(tmp_path / "resumed" / "epoch_0002")
    assert saved.config.model.band_scaled is False


def test_clip_grad_norm_bounds_the_step(tiny_data, tmp_path):
    """Gradients clipped to a norm of 1e-20: Adam's step m / (sqrt(v) + eps) is ~1e-12 of lr, so the weights stay
    where they started; without clipping they move."""
    moved = {}
    for clip in (0.0, 1e-20):
        cfg = tiny_config(tiny_data, data={"max_train": 4}, optim={"clip_grad_norm": clip})
        torch.manual_seed(cfg.optim.seed)
        start = build_model(cfg.model, 1, 10).core.state_dict()
        session = LocalSession(tmp_path / f"clip{clip}")
        train_loop({"config": cfg.to_dict(), "run_id": ""}, session)
        end = checkpoint.load(tmp_path / f"clip{clip}" / "epoch_0001").model
        moved[clip] = max(float((end[k].float() - v.float()).abs().max()) for k, v in start.items())
    assert moved[0.0] > 1e-4 and moved[1e-20] < 1e-8


def test_bf16_autocast_trains_on_the_cpu_too(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, data={"max_train": 4}, runtime={"precision": "bf16"})
    session = LocalSession(tmp_path)
    train_loop({"config": cfg.to_dict(), "run_id": ""}, session)
    assert np.isfinite(session.reports[0]["train_loss"]) and 0 <= session.reports[0]["test_error"] <= 1
