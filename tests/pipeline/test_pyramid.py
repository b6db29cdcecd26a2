"""Pyramid writer: round trip, level shapes, chunking, mean downsampling of odd edges, exact level geometry (scale
d^l and translation (d^l - 1)/2 whatever the image size), OME-NGFF 0.5 validity in independent readers."""
from __future__ import annotations

import json
import os

import dask.array as da
import numpy as np
import pytest
import zarr

from pipeline.errors import UnsupportedImageError
from pipeline import pyramid
from pipeline.pyramid import (GATS_FORMAT, band_statistics, downsample_block, level_shapes, open_pyramid,
                              stats_level, write_pyramid)


def _reference_mean(x: np.ndarray, f: int) -> np.ndarray:
    """Cell-by-cell mean of the pixels present, half up for integers (slow, obviously right)."""
    c, h, w = x.shape
    ho, wo = -(-h // f), -(-w // f)
    out = np.zeros((c, ho, wo), dtype=x.dtype)
    for i in range(ho):
        for j in range(wo):
            cell = x[:, i * f:(i + 1) * f, j * f:(j + 1) * f].astype(np.float64)
            mean = cell.reshape(c, -1).mean(axis=1)
            out[:, i, j] = np.floor(mean + 0.5) if x.dtype.kind in "ui" else mean
    return out


def test_level_shapes_ceil_and_stop() -> None:
    assert level_shapes(1001, 777, min_size=100) == [(1001, 777), (501, 389), (251, 195), (126, 98), (63, 49)]
    assert level_shapes(300, 40, min_size=256) == [(300, 40), (150, 20)]
    assert level_shapes(5000, 5000, min_size=1, max_levels=3) == [(5000, 5000), (2500, 2500), (1250, 1250)]
    assert level_shapes(100, 100, min_size=256) == [(100, 100)]
    assert level_shapes(81, 10, downsample=3, min_size=3) == [(81, 10), (27, 4), (9, 2), (3, 1)]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
@pytest.mark.parametrize("shape", [(1, 5, 7), (3, 4, 4), (2, 1, 3)])
def test_downsample_block_matches_reference(dtype: type, shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(0)
    x = (rng.integers(-300, 3000, shape) if np.dtype(dtype).kind == "i" else rng.integers(0, 255, shape)).astype(dtype)
    if np.dtype(dtype).kind == "f":
        x = x + rng.random(shape).astype(dtype)
    np.testing.assert_allclose(downsample_block(x, 2), _reference_mean(x, 2), rtol=1e-6)
    np.testing.assert_allclose(downsample_block(x, 3), _reference_mean(x, 3), rtol=1e-6)


def test_rounding_half_up_and_odd_edges() -> None:
    x = np.array([[[0, 1, 7], [1, 1, 8], [5, 5, 9]]], dtype=np.uint8)  # (1, 3, 3)
    # cells: [0,1,1,1] -> 0.75 -> 1; [7,8] -> 7.5 -> 8 (odd column edge); [5,5] -> 5; [9] -> 9 (corner alone)
    np.testing.assert_array_equal(downsample_block(x, 2), [[[1, 8], [5, 9]]])
    assert downsample_block(np.array([[[1, 2]]], dtype=np.int16), 2)[0, 0, 0] == 2  # 1.5 -> 2
    assert downsample_block(np.array([[[-1, -2]]], dtype=np.int16), 2)[0, 0, 0] == -1  # -1.5 -> -1 (half up)


def test_round_trip_levels_chunks(tmp_path: os.PathLike) -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 65535, (2, 333, 517), dtype=np.uint16)
    info = write_pyramid(str(tmp_path), "im", da.from_array(x, chunks=(1, 100, 77)), chunk=64, min_size=32)
    pyr = open_pyramid(str(tmp_path), "im")
    np.testing.assert_array_equal(pyr.arrays[0][:], x)
    prev = x
    for level, arr in enumerate(pyr.arrays):
        assert arr.chunks == (2, 64, 64) and arr.dtype == np.uint16
        if level:
            assert arr.shape[1:] == (-(-prev.shape[1] // 2), -(-prev.shape[2] // 2))
            np.testing.assert_array_equal(arr[:], _reference_mean(prev, 2))
            prev = arr[:]
    assert max(pyr.arrays[-1].shape[1:]) <= 32 < max(pyr.arrays[-2].shape[1:])
    assert info.downsamples == tuple((2.0**lv, 2.0**lv) for lv in range(info.levels))  # not 333/167, 517/259
    assert pyr.info.downsamples == info.downsamples
    assert info.dtype == "uint16" and info.channels == 2 and info.levels == len(pyr.arrays)
    meta = json.loads((tmp_path / "images" / "im.zarr" / "0" / "zarr.json").read_text())
    codecs = json.dumps(meta["codecs"])
    assert '"blosc"' in codecs and '"zstd"' in codecs
    assert meta["dimension_names"] == ["c", "y", "x"]


def test_sharding_and_factor_three(tmp_path: os.PathLike) -> None:
    x = np.random.default_rng(2).integers(0, 255, (3, 200, 130), dtype=np.uint8)
    write_pyramid(str(tmp_path), "sh", da.from_array(x), chunk=32, shards=64, downsample=3, min_size=20)
    pyr = open_pyramid(str(tmp_path), "sh")
    assert pyr.arrays[0].chunks == (3, 32, 32) and pyr.arrays[0].shards == (3, 64, 64)
    np.testing.assert_array_equal(pyr.arrays[0][:], x)
    np.testing.assert_array_equal(pyr.arrays[1][:], _reference_mean(x, 3))
    assert [a.shape[1:] for a in pyr.arrays] == [(200, 130), (67, 44), (23, 15), (8, 5)]


def _lazy_pattern(h: int, w: int) -> da.Array:
    """(1, h, w) uint8 (7 y + x) mod 256, computed block by block (never whole)."""
    y = da.arange(h, chunks=256, dtype=np.int64)[:, None]  # (h, 1)
    x = da.arange(w, chunks=256, dtype=np.int64)[None, :]  # (1, w)
    return ((7 * y + x) % 256).astype(np.uint8)[None]  # (1, h, w)


@pytest.mark.parametrize("h, w", [(1500, 1500), (2967, 1500), (20769, 300)])
@pytest.mark.parametrize("downsample, mpp", [(2, None), (2, 0.3), (3, 0.3)])
def test_exact_level_geometry(tmp_path: os.PathLike, h: int, w: int, downsample: int, mpp: float | None) -> None:
    """Level l's stored scale is level 0's x d^l exactly and its translation (d^l - 1)/2 x base, whatever the size
    (1500 -> 188 at level 3 is a factor 8, not 7.98); written and reopened downsamples are (d^l, d^l) exactly."""
    info = write_pyramid(str(tmp_path), "g", _lazy_pattern(h, w), chunk=256, downsample=downsample, min_size=16,
                         mpp=mpp)
    assert info.levels >= 5
    base = 1.0 if mpp is None else mpp
    attrs = json.loads((tmp_path / "images" / "g.zarr" / "zarr.json").read_text())["attributes"]
    assert attrs["gats"]["format"] == GATS_FORMAT >= 2
    datasets = attrs["ome"]["multiscales"][0]["datasets"]
    assert [d["path"] for d in datasets] == [str(lv) for lv in range(info.levels)]
    scale0 = datasets[0]["coordinateTransformations"][0]["scale"]
    assert scale0 == [1.0, base, base]
    for level, d in enumerate(datasets):
        factor = downsample**level
        scale, translation = d["coordinateTransformations"]  # exactly one scale, then one translation
        assert scale == {"type": "scale", "scale": [1.0, scale0[1] * factor, scale0[2] * factor]}
        shift = (factor - 1) / 2 * base
        assert translation == {"type": "translation", "translation": [0.0, shift, shift]}
        assert info.shapes[level] == (-(-h // factor), -(-w // factor))  # level l spans [0, H_l d^l) >= [0, H0)
    exact = tuple((float(downsample**lv), float(downsample**lv)) for lv in range(info.levels))
    assert info.downsamples == exact
    assert open_pyramid(str(tmp_path), "g").info.downsamples == exact  # even where 0.3 * 3**5 / 0.3 != 243
    if h == 1500 and downsample == 2:
        assert info.shapes[3][0] == 188 and info.downsamples[3] == (8.0, 8.0)


def test_ome_ngff_validates_and_opens_in_ome_zarr(tmp_path: os.PathLike) -> None:
    from ome_zarr.format import FormatV05
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader
    from ome_zarr_models.v05.image import Image

    x = np.random.default_rng(3).integers(0, 255, (3, 150, 90), dtype=np.uint8)
    write_pyramid(str(tmp_path), "ome", da.from_array(x), chunk=32, min_size=40, mpp=0.25)
    path = str(tmp_path / "images" / "ome.zarr")
    model = Image.from_zarr(zarr.open_group(path, mode="r"))  # pydantic schema of OME-NGFF 0.5
    ms = model.attributes.ome.multiscales[0]
    assert [a.name for a in ms.axes] == ["c", "y", "x"] and [a.type for a in ms.axes] == ["channel", "space", "space"]
    assert ms.axes[1].unit == "micrometer"
    scales = [list(d.coordinateTransformations[0].scale) for d in ms.datasets]
    shifts = [list(d.coordinateTransformations[1].translation) for d in ms.datasets]
    # 150 -> 75 -> 38: level 2 is a factor 4 (not 150/38), centred 1.5 level-0 pixels in
    assert scales == [[1.0, 0.25, 0.25], [1.0, 0.5, 0.5], [1.0, 1.0, 1.0]]
    assert shifts == [[0.0, 0.0, 0.0], [0.0, 0.125, 0.125], [0.0, 0.375, 0.375]]
    nodes = list(Reader(parse_url(path))())
    assert Multiscales.matches(nodes[0].zarr)
    transforms = nodes[0].metadata["coordinateTransformations"]  # as ome-zarr-py reports them
    assert transforms == [[{"type": "scale", "scale": sc}, {"type": "translation", "translation": sh}]
                          for sc, sh in zip(scales, shifts)]
    FormatV05().validate_coordinate_transformations(3, 3, transforms)  # raises on a bad scale/translation
    np.testing.assert_array_equal(np.asarray(nodes[0].data[0]), x)
    assert [tuple(d.shape) for d in nodes[0].data] == [(3, 150, 90), (3, 75, 45), (3, 38, 23)]


def test_gats_marker_and_checksum(tmp_path: os.PathLike) -> None:
    x = np.random.default_rng(4).integers(0, 255, (1, 70, 70), dtype=np.uint8)
    a = write_pyramid(str(tmp_path), "a", da.from_array(x), chunk=32, fill_value=255, extra_attrs={"source": "s.png"})
    b = write_pyramid(str(tmp_path), "b", da.from_array(x, chunks=(1, 10, 13)), chunk=32)
    y = x.copy()
    y[0, 69, 69] ^= 1
    c = write_pyramid(str(tmp_path), "c", da.from_array(y), chunk=32)
    assert a.checksum == b.checksum != c.checksum and a.checksum.startswith("blake2b-128:")
    gats = json.loads((tmp_path / "images" / "a.zarr" / "zarr.json").read_text())["attributes"]["gats"]
    assert gats["complete"] is True and gats["fill_value"] == 255 and gats["extra"] == {"source": "s.png"}
    assert open_pyramid(str(tmp_path), "a").info.fill_value == 255


def test_lazy_source_blocks_computed_once(tmp_path: os.PathLike) -> None:
    calls: list[tuple[int, ...]] = []

    def make(block_info: dict | None = None) -> np.ndarray:
        loc = block_info[None]["chunk-location"]
        calls.append(loc)
        return np.full(block_info[None]["chunk-shape"], loc[1] * 10 + loc[2], dtype=np.uint8)

    lazy = da.map_blocks(make, chunks=((1,), (64, 64, 20), (64, 30)), dtype=np.uint8)  # (1, 148, 94), never whole
    write_pyramid(str(tmp_path), "lazy", lazy, chunk=64, min_size=16)
    assert sorted(calls) == sorted(set(calls)) and len(calls) == 6


@pytest.mark.parametrize("bad, err", [
    (da.zeros((4, 4), dtype=np.uint8), UnsupportedImageError),
    (da.zeros((1, 4, 4), dtype=bool), UnsupportedImageError),
    (da.zeros((1, 0, 4), dtype=np.uint8), UnsupportedImageError),
])
def test_bad_images_are_typed(tmp_path: os.PathLike, bad: da.Array, err: type) -> None:
    with pytest.raises(err):
        write_pyramid(str(tmp_path), "bad", bad)


def test_bad_arguments(tmp_path: os.PathLike) -> None:
    img = da.zeros((1, 8, 8), dtype=np.uint8)
    with pytest.raises(ValueError, match="image id"):
        write_pyramid(str(tmp_path), "../x", img)
    with pytest.raises(ValueError, match="shards"):
        write_pyramid(str(tmp_path), "x", img, chunk=32, shards=48)
    with pytest.raises(ValueError, match="fill_value"):
        write_pyramid(str(tmp_path), "x", img, fill_value=256)


# -----------------------------------------------------------------------------
# band statistics

def test_band_statistics_are_recorded_from_the_stats_level_in_the_nets_convention(tmp_path: os.PathLike,
                                                                                 monkeypatch) -> None:
    rng = np.random.default_rng(0)
    img = (rng.integers(0, 4096, size=(4, 300, 500)) * np.array([1, 2, 4, 16])[:, None, None]).astype(np.uint16)
    monkeypatch.setattr(pyramid, "STATS_MAX_PX", 150 * 250)  # level 1 (150 x 250) is the finest that fits
    info = write_pyramid(str(tmp_path), "multi", da.from_array(img, chunks=(4, 128, 128)), chunk=64, min_size=32)
    level1 = np.asarray(zarr.open_group(str(tmp_path / "images" / "multi.zarr"), mode="r")["1"][...], np.float64)
    unit = level1.reshape(4, -1) / 65535  # integers over their dtype's maximum, as the nets see them
    np.testing.assert_allclose(info.band_mean, unit.mean(1), rtol=1e-12)
    np.testing.assert_allclose(info.band_std, unit.std(1), rtol=1e-12)
    attrs = json.loads((tmp_path / "images" / "multi.zarr" / "zarr.json").read_text())["attributes"]["gats"]
    assert attrs["band_stats"]["level"] == 1 and attrs["band_stats"]["mean"] == list(info.band_mean)
    opened = open_pyramid(str(tmp_path), "multi").info
    assert (opened.band_mean, opened.band_std) == (info.band_mean, info.band_std)
    assert info.band_mean[3] > 10 * info.band_mean[0]  # 12-bit data in uint16: a band's own scale, not 65535's


def test_band_statistics_of_floats_skip_non_finite_pixels_and_levels_fall_back_to_the_coarsest() -> None:
    x = np.array([[[0.5, np.nan], [1.5, np.inf]], [[np.nan, np.nan], [np.nan, np.nan]]], np.float32)  # (2, 2, 2)
    mean, std = band_statistics(x)
    assert mean == (1.0, 0.0) and std == (0.5, 0.0)  # band 1 has no finite pixel: 0, 0 (BandScaled refuses std 0)
    assert stats_level([(4096, 4096), (2048, 2048), (1024, 1024), (512, 512)]) == 2
    assert stats_level([(4096, 4096), (2048, 2048)]) == 1  # none small enough: the coarsest


def test_a_pyramid_written_before_band_statistics_gets_them_computed_on_open(tmp_path: os.PathLike) -> None:
    img = np.arange(3 * 64 * 96, dtype=np.uint8).reshape(3, 64, 96)
    info = write_pyramid(str(tmp_path), "old", da.from_array(img), chunk=32, min_size=16)
    meta_path = tmp_path / "images" / "old.zarr" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    del meta["attributes"]["gats"]["band_stats"]  # as written before band statistics existed
    meta_path.write_text(json.dumps(meta))
    old = open_pyramid(str(tmp_path), "old")
    assert old.info.band_mean == ()
    assert pyramid.info_with_band_stats(old).band_mean == info.band_mean


def test_band_statistics_of_a_level_too_large_read_a_lattice_not_the_whole_level(tmp_path: os.PathLike,
                                                                                 monkeypatch) -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 255, size=(2, 40, 40), dtype=np.uint8)
    stored = zarr.create_array(str(tmp_path / "a.zarr"), shape=x.shape, chunks=(2, 8, 8), dtype=np.uint8)
    stored[...] = x
    monkeypatch.setattr(pyramid, "STATS_MAX_PX", 100)  # 1600 px: a lattice of every 4th row and column
    lattice = x[:, ::4, ::4].reshape(2, -1) / 255
    for level in (x, stored):
        mean, std = band_statistics(level)
        np.testing.assert_allclose(mean, lattice.mean(1), rtol=1e-12)
        np.testing.assert_allclose(std, lattice.std(1), rtol=1e-12)
