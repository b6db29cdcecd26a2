"""Foreground masks: the tissue rule on generated and real H&E, nodata and alpha rasters, the user's own masks; the
OME-NGFF label image they are stored as, the reader's view of them, and every bad input as a typed error with
nothing half-written."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr
from PIL import Image
from scipy import ndimage

from pipeline.errors import MaskError
from pipeline.ingest import WriteOptions, ingest_sources
from pipeline.manifest import read_manifest
from pipeline.masks import MaskRule, otsu_threshold, resample_nearest, tissue_mask
from pipeline.pyramid import open_pyramid, stats_level, write_pyramid
from pipeline.reader import PatchReader, mask_to_level

PROJECT = Path(__file__).resolve().parents[2]


def he_like(h: int = 600, w: int = 800, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A generated H&E-like slide (3, h, w) uint8: pink and purple blobs (with a white lumen inside one) on slightly
    noisy grey-white glass, and a few dust specks; returns (pixels, the blobs' true extent (h, w) bool)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    truth = np.zeros((h, w), bool)
    for cy, cx, ry, rx in ((150, 200, 110, 150), (420, 560, 140, 180), (470, 150, 80, 90)):
        truth |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    lumen = ((yy - 420) / 40) ** 2 + ((xx - 560) / 50) ** 2 <= 1  # glass-coloured hole inside tissue: still tissue
    glass = np.array([238, 236, 240], float)[:, None, None] + rng.normal(0, 3, (3, h, w))
    stain = np.where(rng.random((h, w)) < 0.5, 0, 1)  # eosin (pink) or haematoxylin (purple) per pixel
    pink, purple = np.array([225, 140, 190], float), np.array([150, 90, 170], float)
    tissue_rgb = np.where(stain[None] == 0, pink[:, None, None], purple[:, None, None]) + rng.normal(0, 12, (3, h, w))
    pixels = np.where((truth & ~lumen)[None], tissue_rgb, glass)
    for y, x in rng.integers(20, min(h, w) - 20, (5, 2)):  # dust: a few dark 2x2 specks on glass
        if not truth[y, x]:
            pixels[:, y:y + 2, x:x + 2] = 60
    return np.clip(pixels, 0, 255).astype(np.uint8), truth


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_otsu_splits_two_modes_between_them():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.1, 0.02, 5000), rng.normal(0.6, 0.05, 3000)])
    assert 0.2 < otsu_threshold(values) < 0.5
    assert otsu_threshold(np.full(10, 0.3)) == 0.3


def test_the_tissue_rule_finds_the_blobs_fills_the_lumen_and_drops_the_dust():
    pixels, truth = he_like()
    mask = tissue_mask(pixels)
    assert iou(mask, truth) > 0.97
    assert mask[420, 560]  # the lumen is filled
    glass = np.array([238, 236, 240], np.uint8)[:, None, None] * np.ones((1, 200, 300), np.uint8)
    with pytest.raises(MaskError, match="no foreground"):
        from pipeline.masks import compute_mask
        compute_mask(MaskRule("tissue"), glass, "blank")  # glass alone is not split in two along its noise


def test_tissue_needs_rgb_and_nodata_must_fit_the_dtype():
    with pytest.raises(MaskError, match="--mask nodata"):
        tissue_mask(np.zeros((1, 8, 8), np.uint8))
    with pytest.raises(MaskError, match="--nodata VALUE"):
        MaskRule("nodata")
    x = da.from_array(np.ones((1, 64, 64), np.uint8))
    with pytest.raises(MaskError, match=r"\[0, 255\]"):
        write_pyramid("/nonexistent-never-created", "n", x, mask=MaskRule("nodata", nodata=-9999))
    assert not Path("/nonexistent-never-created").exists()  # refused before anything is written


def test_the_mask_is_an_ome_ngff_label_image_on_the_stats_level(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader
    from ome_zarr_models.v05.image_label import ImageLabel

    pixels, truth = he_like(1200, 1600)  # 1.9 Mpx: the mask sits on level 1
    info = write_pyramid(str(tmp_path), "he", da.from_array(pixels), chunk=256, mpp=0.5, mask=MaskRule("tissue"))
    at = stats_level(info.shapes)
    assert at == 1 and info.mask_factor == (2.0, 2.0)
    path = tmp_path / "images" / "he.zarr"
    label = zarr.open_group(str(path / "labels" / "tissue"), mode="r")
    ImageLabel.from_zarr(label)  # the pydantic schema of an OME-NGFF 0.5 label image
    assert zarr.open_group(str(path / "labels"), mode="r").attrs["ome"]["labels"] == ["tissue"]
    transforms = label.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    image_transforms = zarr.open_group(str(path), mode="r").attrs["ome"]["multiscales"][0]["datasets"][at]
    assert transforms == image_transforms["coordinateTransformations"]  # the label overlays level 1 exactly
    nodes = list(Reader(parse_url(str(path / "labels" / "tissue")))())
    assert any(Label.matches(n.zarr) for n in nodes)  # what napari's OME-Zarr reader opens as a label layer
    stored = np.asarray(label["0"])[0]
    assert stored.dtype == np.uint8 and set(np.unique(stored)) == {0, 1} and stored.shape == info.shapes[1]
    assert iou(stored.astype(bool), truth[::2, ::2]) > 0.95
    assert info.tissue_fraction == pytest.approx(stored.mean())
    reopened = open_pyramid(str(tmp_path), "he").info
    assert reopened.tissue_fraction == info.tissue_fraction and reopened.mask_factor == (2.0, 2.0)


def test_the_reader_puts_the_mask_on_any_levels_grid(tmp_path):
    pixels, _ = he_like(1200, 1600)
    write_pyramid(str(tmp_path), "he", da.from_array(pixels), chunk=256, min_size=100, mask=MaskRule("tissue"))
    reader = PatchReader(str(tmp_path))
    info = reader.info("he")
    stored = reader.mask("he", 1)  # the level it was made on: itself
    np.testing.assert_array_equal(stored, np.asarray(zarr.open_array(
        str(tmp_path / "images" / "he.zarr" / "labels" / "tissue" / "0"), mode="r"))[0] == 1)
    for level in range(info.levels):
        m = reader.mask("he", level)
        assert m.shape == info.shapes[level] and m.dtype == bool
    np.testing.assert_array_equal(reader.mask("he", 0)[1::2, 1::2], stored)  # each level-0 pixel takes its parent
    np.testing.assert_array_equal(reader.mask("he", 3), stored[2::4, 2::4][:info.shapes[3][0], :info.shapes[3][1]])
    plain = tmp_path / "plain"
    write_pyramid(str(plain), "p", da.from_array(pixels[:, :100, :100]))
    with pytest.raises(MaskError, match="--mask tissue"):
        PatchReader(str(plain)).mask("p", 0)


def test_mask_to_level_takes_the_mask_pixel_holding_each_centre():
    mask = np.arange(12).reshape(3, 4)
    np.testing.assert_array_equal(mask_to_level(mask, (4.0, 4.0), (2.0, 2.0), (6, 8)),
                                  np.repeat(np.repeat(mask, 2, 0), 2, 1))
    np.testing.assert_array_equal(mask_to_level(mask, (4.0, 4.0), (8.0, 8.0), (2, 2)), mask[[1, 2]][:, [1, 3]])
    np.testing.assert_array_equal(resample_nearest(mask, (3, 4)), mask)


def test_nodata_and_alpha_rasters(tmp_path):
    x = np.random.default_rng(1).integers(1, 4000, (4, 300, 400), dtype=np.uint16)  # 4-band 12-bit in uint16
    x[:, :, :100] = 0  # a nodata border
    info = write_pyramid(str(tmp_path), "r", da.from_array(x), chunk=128, mask=MaskRule("nodata", nodata=0))
    mask = PatchReader(str(tmp_path)).mask("r", 0)
    assert not mask[:, :100].any() and mask[:, 100:].all()
    assert info.tissue_fraction == pytest.approx(0.75)
    rgba = np.full((4, 200, 200), 255, np.uint8)
    rgba[3, :50] = 0  # transparent top quarter
    info = write_pyramid(str(tmp_path), "a", da.from_array(rgba), chunk=128, mask=MaskRule("alpha"))
    assert info.tissue_fraction == pytest.approx(0.75)
    with pytest.raises(MaskError, match="no foreground"):
        write_pyramid(str(tmp_path), "empty", da.from_array(np.zeros((1, 100, 100), np.uint8)),
                      mask=MaskRule("nodata", nodata=0))
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["a.zarr", "r.zarr"]  # nothing left of it


def test_ingest_with_masks_from_the_cli_and_from_a_folder(tmp_path):
    pixels, truth = he_like()
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(pixels.transpose(1, 2, 0)).save(src / "slide_a.png")
    Image.fromarray(pixels[:, ::-1].transpose(1, 2, 0)).save(src / "slide_b.png")
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "jobs/ingest.py", str(src), "--out", str(out), "--mask", "tissue",
                          "--no-progress", "--workers", "1"], cwd=PROJECT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    rows, _ = read_manifest(str(out))
    fractions = {r.image_id: r.tissue_fraction for r in rows}
    assert fractions["slide_a"] == pytest.approx(truth.mean(), abs=0.02)
    assert fractions["slide_b"] == pytest.approx(fractions["slide_a"], abs=1e-3)

    masks = tmp_path / "masks"
    masks.mkdir()
    given = np.zeros((150, 200), np.uint8)  # a quarter-size mask: the left half is foreground
    given[:, :100] = 255
    Image.fromarray(given).save(masks / "slide_a.png")
    report = ingest_sources(str(out), [str(src)], options=WriteOptions(mask_dir=str(masks)))
    by_id = {o.row.image_id: o.row for o in report.outcomes}
    assert by_id["slide_a"].tissue_fraction == pytest.approx(0.5)  # rewritten: the stored mask was another kind
    assert by_id["slide_b"].status == "failed" and "slide_b.png" in by_id["slide_b"].error  # names the file it wants
    reader = PatchReader(str(out))
    assert reader.mask("slide_a", 0)[:, :400].all() and not reader.mask("slide_a", 0)[:, 400:].any()

    Image.fromarray(np.zeros((150, 150), np.uint8)).save(masks / "slide_b.png")  # not the image's shape
    report = ingest_sources(str(out), [str(src / "slide_b.png")], options=WriteOptions(mask_dir=str(masks)))
    (outcome,) = report.outcomes
    assert outcome.row.status == "failed" and "MaskError" in outcome.row.error and "600x800" in outcome.row.error


def test_write_options_refuse_contradictory_mask_flags():
    with pytest.raises(ValueError, match="--mask nodata"):
        WriteOptions(nodata=0)
    assert WriteOptions(mask="nodata").nodata is None  # each GeoTIFF's own GDAL_NODATA, then
    with pytest.raises(ValueError, match="either --mask or --mask-dir"):
        WriteOptions(mask="tissue", mask_dir="/m")
    with pytest.raises(ValueError, match="one of"):
        WriteOptions(mask="otsu")


def test_real_he_slides_mask_their_tissue(samples):
    """The real sample slides (CMU-1 region, and the JP2K/TIFF slide): the mask covers the stained pixels and not the
    glass around the tissue; the picture is docs/img/tissue_masks.png (benchmarks/tissue_masks.py)."""
    from pipeline.sources import open_source

    for name in ("cmu_small_region.svs", "slide.tiff"):
        with open_source(str(samples[name])) as src:
            level = np.asarray(src.array[:3, ::8, ::8])  # (3, h, w) a thumbnail
        mask = tissue_mask(level)
        rgb = level[:3].astype(float)
        saturation = (rgb.max(0) - rgb.min(0)) / np.maximum(rgb.max(0), 1)
        stained = saturation > 0.2
        labels, _ = ndimage.label(saturation < 0.03)  # glass; lumens inside tissue are glass too, and tissue
        edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        background = np.isin(labels, edge[edge > 0])  # so only the glass reaching the slide's edge is background
        assert mask[stained].mean() > 0.9, name
        assert background.mean() > 0.05 and mask[background].mean() < 0.05, name
