"""training/predict.py, by known answer: one bright square on a dark 256x256 image and an attention net that scores
brightness; the exported boxes, contours and attention OME-Zarr must land on the square, in level-0 pixels."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr
from matplotlib.path import Path as MplPath

from pipeline.exports import OutputFolderError
from pipeline.ingest import WriteOptions, ingest_sources
from training import checkpoint
from training import config as C
from training.data import LowResViews
from training.models import build_model
from training.checkpoint import ModelNotFoundError
from training.predict import (PredictInputError, PredictOptions, SplitNotFoundError, load_model,
                              predict)

SQUARE = (100, 150, 24, 24)  # (y0, x0, h, w) level-0 px of the bright object
CENTRE = (SQUARE[0] + SQUARE[2] / 2, SQUARE[1] + SQUARE[3] / 2)  # (y, x) = (112, 162)


@dataclass(frozen=True)
class Scene:
    root: str  # ingested: "bright" (split test, the square) and "dark" (split train, all zeros)
    npy: str  # the bright image as a .npy source
    ckpt: str  # an ATS checkpoint whose attention logits grow with pixel brightness


def bright_model(name: str = "ats") -> tuple[C.TrainConfig, torch.nn.Module]:
    """A model on 32x32 views (factor 8), 4 patches of 32 px; for ATS the attention net scores brightness:
    logits = 20 tanh(tanh(pixel)), through the centre taps of its three 'same' convs."""
    cfg = C.TrainConfig().replace(data={"low_scale": 0.125, "cnn_scale": 0.125},
                                  model={"name": name, "n_patches": 4, "patch_hw": [32, 32], "feature_dim": 8,
                                         "mil_hidden": 8, "cnn_width": 4, "cnn_stages": 2})
    torch.manual_seed(0)
    module = build_model(cfg.model, 1, 2)
    if name == "ats":
        net = module.core.attention_net.net
        with torch.no_grad():
            for conv, gain in ((net[0], 1.0), (net[2], 1.0), (net[4], 20.0)):
                conv.weight.zero_()
                conv.bias.zero_()
                conv.weight[0, 0, 1, 1] = gain
    return cfg, module


def save_checkpoint(folder: Path, cfg: C.TrainConfig, module: torch.nn.Module) -> str:
    folder.mkdir(parents=True)
    checkpoint.save(folder, config=cfg, model=module.core.state_dict(), optimizer={}, epoch=1,
                    classes=("bright", "dark"), in_channels=1, budget_used_s=0.0)
    return str(folder)


def make_scene(folder: Path) -> Scene:
    """The images, ingested (chunk 64, levels down to 16 px), and the checkpoint."""
    bright = np.zeros((256, 256), np.uint8)
    y0, x0, h, w = SQUARE
    bright[y0:y0 + h, x0:x0 + w] = 255
    np.save(folder / "bright.npy", bright)
    np.save(folder / "dark.npy", np.zeros((256, 256), np.uint8))
    (folder / "list.csv").write_text("path,label,split\nbright.npy,bright,test\ndark.npy,dark,train\n")
    report = ingest_sources(str(folder / "data"), [str(folder / "list.csv")], options=WriteOptions(chunk=64,
                                                                                                    min_size=16))
    assert report.complete, report.summary()
    cfg, module = bright_model()
    return Scene(str(folder / "data"), str(folder / "bright.npy"), save_checkpoint(folder / "ckpt", cfg, module))


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Scene:
    return make_scene(tmp_path_factory.mktemp("predict"))


@pytest.fixture(scope="module")
def predicted(scene: Scene, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("out") / "run"
    return out, predict(scene.ckpt, out, data=scene.root)


def inside(ring: list[list[float]], y: float, x: float) -> bool:
    return bool(MplPath(np.asarray(ring)).contains_point((x, y)))


def test_known_answer_boxes_contours_and_zarr_land_on_the_object(scene: Scene, predicted) -> None:
    out, report = predicted
    assert report.ok and [p.image_id for p in report.predictions] == ["bright"]  # split "test" only
    features = json.loads((out / "geojson" / "bright.geojson").read_text())["features"]
    boxes = [f for f in features if f["properties"].get("kind") == "top_k_box"]
    assert [f["properties"]["rank"] for f in boxes] == [1, 2, 3, 4]  # top_k 0: the model's n_patches
    (top1,) = boxes[0]["geometry"]["coordinates"]
    xs, ys = zip(*top1)
    assert min(xs) <= CENTRE[1] <= max(xs) and min(ys) <= CENTRE[0] <= max(ys) and max(xs) - min(xs) == 32
    # exactly the boxes the model reads in topk mode: ATSModel.plan on the same view with the level's exact factor
    from pipeline.reader import PatchReader
    from training.data import Example

    model = load_model(scene.ckpt)
    batch = LowResViews(PatchReader(scene.root), 0.125).batch([Example("bright", 0, 256, 256, 1)])
    plan = model.module.core.plan(batch.low, batch.level0_hw, batch.low_hw, low_scale=batch.low_scale, mode="topk")
    assert sorted(f["properties"]["box_yxhw"] for f in boxes) == sorted(plan.boxes[0].tolist())
    half = next(f for f in features if f["properties"].get("mass") == 0.5)
    assert half["properties"]["mass_inside"] >= 0.5
    assert any(inside(polygon[0], *CENTRE) for polygon in half["geometry"]["coordinates"])
    assert not any(inside(polygon[0], 40, 40) for polygon in half["geometry"]["coordinates"])

    group = zarr.open_group(str(out / "heatmaps" / "bright.zarr"), mode="r")
    transforms = group.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    assert transforms == [{"type": "scale", "scale": [8.0, 8.0]}, {"type": "translation", "translation": [3.5, 3.5]}]
    attention = group["0"][:]
    iy, ix = np.unravel_index(np.argmax(attention), attention.shape)
    y, x = 8.0 * iy + 3.5 + 0.5, 8.0 * ix + 3.5 + 0.5  # OME coordinate of a pixel centre k is k: +0.5 -> continuous
    assert SQUARE[0] <= y < SQUARE[0] + SQUARE[2] and SQUARE[1] <= x < SQUARE[1] + SQUARE[3]
    assert attention.sum() == pytest.approx(1.0, abs=1e-5)


def test_predictions_table_and_files(scene: Scene, predicted) -> None:
    out, report = predicted
    table = pq.read_table(out / "predictions.parquet")
    assert table.column_names == ["image_id", "source", "predicted", "prob_bright", "prob_dark", "label", "mode",
                                  "model"]
    (row,) = table.to_pylist()
    assert row["prob_bright"] + row["prob_dark"] == pytest.approx(1.0)
    assert row["predicted"] == ("bright" if row["prob_bright"] >= row["prob_dark"] else "dark")
    assert (row["image_id"], row["label"], row["mode"], row["model"]) == ("bright", "bright", "topk", scene.ckpt)
    assert json.loads(table.schema.metadata[b"classes"]) == ["bright", "dark"]
    assert (out / "heatmaps" / "bright.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.rglob(".*")]  # no temporary names left anywhere
    assert report.predictions[0].seconds < 10


def test_images_are_ingested_on_the_fly_and_failures_named(scene: Scene, predicted, tmp_path: Path) -> None:
    out = tmp_path / "run"
    report = predict(scene.ckpt, out, images=[scene.npy, str(tmp_path / "missing.npy")])
    assert not report.ok and [p.image_id for p in report.predictions] == ["bright"]
    (failure,) = report.failures
    assert failure.image_id == "missing" and "not ingested" in failure.reason and "missing" in report.summary()
    assert (out / "pyramids" / "manifest.parquet").is_file() and (out / "pyramids" / "images" / "bright.zarr").is_dir()
    (row,) = pq.read_table(out / "predictions.parquet").to_pylist()
    assert row["label"] is None  # no label known for a bare file
    (from_data,) = pq.read_table(predicted[0] / "predictions.parquet").to_pylist()
    assert row["prob_bright"] == pytest.approx(from_data["prob_bright"])  # same pixels, same deterministic answer


def test_bad_inputs_are_typed_and_write_nothing(scene: Scene, tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(OutputFolderError, match="--force"):
        predict(scene.ckpt, busy, data=scene.root)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    out = tmp_path / "new"
    with pytest.raises(SplitNotFoundError, match="splits there: test, train"):
        predict(scene.ckpt, out, data=scene.root, options=PredictOptions(split="val"))
    with pytest.raises(checkpoint.CheckpointError, match="not a complete checkpoint"):
        predict(str(busy), out, data=scene.root)
    with pytest.raises(OutputFolderError, match="not a writable folder"):
        predict(scene.ckpt, busy / "keep.txt" / "out", data=scene.root)
    with pytest.raises(PredictInputError, match="not both"):
        predict(scene.ckpt, out, data=scene.root, images=[scene.npy])
    with pytest.raises(PredictInputError, match="mode"):
        PredictOptions(mode="greedy")
    assert not out.exists()


@pytest.mark.parametrize("name", ["deepmil", "cnn"])
def test_baselines_predict_and_export_only_what_they_have(scene: Scene, tmp_path: Path, name: str) -> None:
    cfg, module = bright_model(name)
    report = predict(save_checkpoint(tmp_path / "ckpt", cfg, module), tmp_path / "out", data=scene.root,
                     options=PredictOptions(split="all", top_k=3))
    assert report.ok and len(report.predictions) == 2
    geojson = tmp_path / "out" / "geojson" / "bright.geojson"
    if name == "cnn":
        assert not geojson.exists() and "no attention" in report.summary()
        return
    boxes = [f["properties"]["box_yxhw"] for f in json.loads(geojson.read_text())["features"][:3]]
    assert all(y % 32 == 0 and x % 32 == 0 and (h, w) == (32, 32) for y, x, h, w in boxes)  # Deep MIL's grid
    ome = zarr.open_group(str(tmp_path / "out" / "heatmaps" / "bright.zarr"), mode="r").attrs["ome"]
    assert ome["multiscales"][0]["datasets"][0]["coordinateTransformations"] == [
        {"type": "scale", "scale": [32.0, 32.0]}, {"type": "translation", "translation": [15.5, 15.5]}]


def test_an_mlflow_run_id_is_a_model_and_an_unknown_one_is_refused(scene: Scene, tmp_path: Path,
                                                                  local_tracking: str) -> None:
    from training.tracking import MlflowTracker

    run = MlflowTracker.create(local_tracking, "predict", "bright")
    run.log_checkpoint(scene.ckpt)
    run.finish()
    report = predict(run.run_id, tmp_path / "out", data=scene.root, tracking_uri=local_tracking)
    assert report.ok and pq.read_table(tmp_path / "out" / "predictions.parquet").column("model").to_pylist() == [
        run.run_id]
    with pytest.raises(ModelNotFoundError, match="neither a checkpoint folder nor a run"):
        predict("0" * 32, tmp_path / "other", data=scene.root, tracking_uri=local_tracking)
    assert not (tmp_path / "other").exists()


def test_a_masked_model_needs_masks_for_files_and_reads_only_foreground_patches(scene: Scene, tmp_path: Path) -> None:
    """A model whose attention prefers dark pixels: unmasked, its top boxes are on the black background; trained with
    data.min_tissue 0.5 and given a nodata mask at ingest, they are on the bright square, the only foreground."""
    cfg, module = bright_model()
    with torch.no_grad():
        module.core.attention_net.net[4].weight.neg_()  # logits = -20 tanh(tanh(pixel)): dark first
    dark_first = save_checkpoint(tmp_path / "dark", cfg, module)
    unmasked = predict(dark_first, tmp_path / "unmasked", images=[scene.npy])
    cfg = cfg.replace(data={"min_tissue": 0.5})
    ckpt = save_checkpoint(tmp_path / "ckpt", cfg, module)
    with pytest.raises(PredictInputError, match="--mask tissue"):
        predict(ckpt, tmp_path / "nomask", images=[scene.npy])
    assert not (tmp_path / "nomask").exists()
    out = tmp_path / "run"
    report = predict(ckpt, out, images=[scene.npy], options=PredictOptions(mask="nodata", nodata=0))
    assert report.ok, report.summary()
    bright = np.load(scene.npy)

    def shares(folder: Path) -> list[float]:
        features = json.loads((folder / "geojson" / "bright.geojson").read_text())["features"]
        boxes = [f["properties"]["box_yxhw"] for f in features if f["properties"].get("kind") == "top_k_box"]
        return [float((bright[max(y, 0):y + h, max(x, 0):x + w] > 0).mean()) for y, x, h, w in boxes]

    assert unmasked.ok and max(shares(tmp_path / "unmasked")) == 0  # all on the background
    # masked: on the square (the decision is made on the 1/8 view's grid, so "half foreground" is measured there)
    assert len(shares(out)) == 4 and min(shares(out)) > 0.25
