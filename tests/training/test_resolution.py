"""Training at one physical resolution (data.view_um_per_px, data.patch_um_per_px): a real H&E region at 20x and
the same region at 40x (upsampled 2x) give the model the same views and the same patches, the boxes it reports stay
level-0 boxes of each image, an off-grid scanner is resampled to the exact patch size, and both train together."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.ingest import WriteOptions, ingest_sources
from pipeline.reader import PatchReader
from tests.training.test_loop import TINY_MODEL, tiny_config
from training import config as C
from pipeline.resolution import Requested
from training.data import DirectFetcher, LowResViews, load_split, patch_read_args, read_all
from training.loop import train_loop
from training.models import _plan, build_model
from training.session import LocalSession

HALF_UM = Requested(0.5, "data.patch_um_per_px")


@pytest.fixture(scope="module")
def mixed(samples, tmp_path_factory) -> str:
    """One 256 x 320 crop of the real CMU-1 region stored as 0.5 um/px (20x), the same crop upsampled 2x by pixel
    repetition as 0.25 um/px (40x), and a 1.2x enlargement as 0.4167 um/px (an off-grid scanner); resolutions from
    the CSV's mpp column (the .npy files record none). Two copies of each, so every split has both kinds."""
    from pipeline.sources import open_source

    tmp = tmp_path_factory.mktemp("mixed")
    with open_source(str(samples["cmu_small_region.svs"])) as src:
        crop = np.asarray(src.array[:3, 1344:1600, 1472:1792])  # (3, 256, 320) uint8, stained tissue
    x40 = crop.repeat(2, axis=1).repeat(2, axis=2)  # (3, 512, 640)
    rows = np.clip(np.round((np.arange(307) + 0.5) / 1.2 - 0.5), 0, 255).astype(int)
    cols = np.clip(np.round((np.arange(384) + 0.5) / 1.2 - 0.5), 0, 319).astype(int)
    off = crop[:, rows][:, :, cols]  # (3, 307, 384): nearest enlargement 1.2x
    lines = ["path,label,split,mpp"]
    for copy, split in ((0, "train"), (1, "test")):
        kinds = (("x20", crop, 0.5, "a"), ("x40", x40, 0.25, "b"), ("off", off, 0.5 / 1.2, "a"))
        for name, pixels, mpp, label in kinds:
            np.save(tmp / f"{name}{copy}.npy", pixels)
            lines.append(f"{name}{copy}.npy,{label},{split},{mpp}")
    (tmp / "list.csv").write_text("\n".join(lines) + "\n")
    root = str(tmp / "data")
    report = ingest_sources(root, [str(tmp / "list.csv")], options=WriteOptions(chunk=64, min_size=32))
    assert report.complete, report.summary()
    return root


def test_20x_and_40x_show_the_model_the_same_views_and_patches(mixed):
    reader = PatchReader(mixed)
    assert reader.info("x200").mpp == 0.5 and reader.info("x400").mpp == 0.25
    examples = [e for e in load_split(mixed, "train")[0] if e.image_id in ("x200", "x400")]
    views = LowResViews(reader, 0.2, view=Requested(4.0, "data.view_um_per_px"), patch=HALF_UM)
    batch = views.batch(examples)
    assert views.view("x200")[1] == (8.0, 8.0) and views.view("x400")[1] == (16.0, 16.0)  # both 4 um/px
    torch.testing.assert_close(batch.low[0], batch.low[1], rtol=0, atol=0)  # the same 32 x 40 view, bit for bit
    assert batch.patch_scale.tolist() == [1.0, 2.0] and batch.patch_level == (0, 1)
    torch.testing.assert_close(batch.frame_scale[0], batch.frame_scale[1])  # 8 patch px per view px, both

    cfg = C.from_dict({"model": {**TINY_MODEL, "patch_hw": 24, "n_patches": 6, "mil_stride": 0}})
    model = build_model(cfg.model, 3, 2).core
    plan = _plan(model, batch, "topk", None)  # deterministic: the same cells of the same view
    assert torch.equal(plan.indices[0], plan.indices[1])
    torch.testing.assert_close(plan.boxes[1], plan.boxes[0] * 2, rtol=0, atol=0)  # level-0 boxes of each image
    assert (plan.boxes[0, :, 2:] == 24).all() and (plan.boxes[1, :, 2:] == 48).all()

    fetcher = DirectFetcher(reader)
    pixels = read_all(fetcher, batch.image_ids, plan.boxes, **patch_read_args(batch, (24, 24)))  # (2, 6, 3, 24, 24)
    assert pixels.shape == (2, 6, 3, 24, 24)
    torch.testing.assert_close(pixels[0], pixels[1], rtol=0, atol=0)  # the same tissue at the same scale
    fetcher.close()


def test_an_off_grid_scanner_is_resampled_to_the_same_physical_patch(mixed):
    """0.4167 um/px asked for 0.5: no level has factor 1.2, so level 0 is read (29 px boxes) and shrunk to the patch
    size; the patch shows the same tissue as the 20x image's, up to the two resamplings' blur."""
    reader = PatchReader(mixed)
    examples = [e for e in load_split(mixed, "train")[0] if e.image_id in ("x200", "off0")]
    batch = LowResViews(reader, 0.2, patch=HALF_UM).batch(examples)
    assert batch.patch_scale.tolist() == pytest.approx([1.0, 1.2]) and batch.patch_level == (0, 0)
    frame = torch.tensor([[[96, 120, 24, 24], [40, 200, 24, 24]]]).expand(2, 2, 4)  # the same frame boxes
    from ats_model.geometry import scale_boxes

    boxes = scale_boxes(frame, batch.patch_scale)
    assert boxes[1, 0].tolist() == [115, 144, 29, 29]
    pixels = read_all(DirectFetcher(reader, overlap=False), batch.image_ids, boxes,
                      **patch_read_args(batch, (24, 24)))  # (2, 2, 3, 24, 24)
    assert pixels.shape == (2, 2, 3, 24, 24)
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3))  # away from the patch edges
    diff = (pixels[0][inner] - pixels[1][inner]).abs().mean()
    spread = (pixels[0][inner] - pixels[0][inner].mean()).abs().mean()
    assert diff < 0.25 * spread, (float(diff), float(spread))  # the same tissue (a shifted crop would not be)


def test_a_mixed_resolution_dataset_trains_and_predicts_at_one_um_per_px(mixed, tmp_path):
    """Train an epoch, then predict the test split (topk): the 40x image's exported boxes are the 20x image's, in
    its own level-0 pixels (twice the coordinates), so QuPath overlays land on each slide; a file without a
    resolution given to predict fails alone, naming --mpp, and passes with it."""
    import json

    from training.predict import PredictOptions, predict

    cfg = tiny_config(mixed, data={"view_um_per_px": 4.0, "patch_um_per_px": 0.5, "batch_size": 3,
                                   "n_attention_maps": 2}, model={"patch_hw": 24, "n_patches": 4, "mil_stride": 0})
    session = LocalSession(tmp_path / "ckpt")
    train_loop({"config": cfg.to_dict(), "run_id": ""}, session)
    assert len(session.reports) == 1 and np.isfinite(session.reports[0]["train_loss"])
    ckpt = str(tmp_path / "ckpt" / "epoch_0001")
    report = predict(ckpt, tmp_path / "pred", data=mixed, options=PredictOptions(mode="topk"))
    assert report.ok, report.summary()

    def boxes(image_id: str) -> list[list[int]]:
        features = json.loads((tmp_path / "pred" / "geojson" / f"{image_id}.geojson").read_text())["features"]
        return [f["properties"]["box_yxhw"] for f in features if f["properties"].get("kind") == "top_k_box"]

    x20, x40 = boxes("x201"), boxes("x401")
    assert len(x20) == 4 and x40 == [[2 * v for v in b] for b in x20]
    np.save(tmp_path / "bare.npy", PatchReader(mixed).low_res("x201", 0))  # (3, 256, 320), no resolution
    bare = predict(ckpt, tmp_path / "bare", images=[str(tmp_path / "bare.npy")])
    assert not bare.ok and "--mpp" in bare.summary()
    given = predict(ckpt, tmp_path / "given", images=[str(tmp_path / "bare.npy")], options=PredictOptions(mpp=0.5))
    assert given.ok, given.summary()


def test_physical_units_without_a_recorded_resolution_are_refused_before_training(tiny_data):
    """Generated Megapixel MNIST records no resolution: asking for um/px is a ConfigError naming --mpp, at preflight
    (before Ray or MLflow), never a guess."""
    from training.preflight import preflight

    for knob in ("patch_um_per_px", "view_um_per_px", "patch_m_per_px", "view_m_per_px"):
        cfg = tiny_config(tiny_data, data={knob: 0.5})
        with pytest.raises(C.ConfigError, match=rf"data.{knob} needs one.*--mpp"):
            preflight(cfg)
    with pytest.raises(C.ConfigError, match="model.name=deepmil reads level-0"):
        tiny_config(tiny_data, data={"patch_um_per_px": 0.5}, model={"name": "deepmil"})
    with pytest.raises(C.ConfigError, match="data.in_memory=false"):
        tiny_config(tiny_data, data={"patch_um_per_px": 0.5, "in_memory": True})


def test_preflight_checks_patches_and_cells_at_the_asked_resolution(mixed):
    """A patch finer than the scan is refused. A 130-px patch fits every image in level-0 pixels but not at 1 um/px
    (the 0.4167 um/px image: 2.4 level-0 px per patch px, 312 > 307), and is refused naming the resolution. Too few
    cells on a 32 um/px view names the view setting to lower, not data.low_scale."""
    from training.preflight import preflight

    tiny = {"patch_hw": 24, "mil_stride": 0}
    with pytest.raises(C.ConfigError, match="enlarged"):
        preflight(tiny_config(mixed, data={"patch_um_per_px": 0.3}, model=tiny))
    big = {"patch_hw": 130, "n_patches": 4, "mil_stride": 0}
    preflight(tiny_config(mixed, model=big))  # level-0 pixels: the smallest image is 256 px
    preflight(tiny_config(mixed, data={"patch_um_per_px": 1.0}, model={**big, "patch_hw": 100}))
    with pytest.raises(C.ConfigError, match=r"model.patch_hw=\[130, 130\] at data.patch_um_per_px \(2.4 level-0"):
        preflight(tiny_config(mixed, data={"patch_um_per_px": 1.0}, model=big))
    with pytest.raises(C.ConfigError, match=r"at data.view_um_per_px=32\) has .* lower data.view_um_per_px"):
        preflight(tiny_config(mixed, data={"view_um_per_px": 32.0}, model={**tiny, "n_patches": 1300}))  # 32 x 40 cells
