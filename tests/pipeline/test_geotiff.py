"""Multiband 16-bit GeoTIFFs: a generated 13-band uint16 raster with a CRS round-trips bit-identical, its CRS and
geotransform reach the pyramid and the manifest, its GDAL nodata value feeds `--mask nodata`, and its per-band
statistics are what the nets get scaled by (not the dtype's maximum, which would crush 12-bit data)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from pipeline.ingest import WriteOptions, ingest_sources
from pipeline.manifest import read_manifest
from pipeline.reader import PatchReader
from pipeline.sources import open_source

EPSG = 32633  # WGS 84 / UTM zone 33N


def write_geotiff(path: Path, pixels: np.ndarray, *, x0: float = 500_000.0, y0: float = 5_200_000.0,
                  gsd: float = 10.0, epsg: int = EPSG, nodata: int | None = None) -> Path:
    """(C, H, W) pixels as a tiled GeoTIFF: ModelTiepoint + ModelPixelScale + a GeoKeyDirectory naming the EPSG
    code (projected, pixel is area), and GDAL_NODATA when given; what GDAL and rasterio write for such a raster."""
    keys = [1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, epsg]
    extratags = [(33550, "d", 3, (gsd, gsd, 0.0), True), (33922, "d", 6, (0.0, 0.0, 0.0, x0, y0, 0.0), True),
                 (34735, "H", len(keys), keys, True)]
    if nodata is not None:
        extratags.append((42113, "s", 0, f"{nodata}", True))
    tifffile.imwrite(path, pixels, photometric="minisblack", planarconfig="separate", tile=(64, 64),
                     extratags=extratags)
    return path


def sentinel_like(seed: int, h: int = 200, w: int = 240) -> np.ndarray:
    """13 bands of 12-bit reflectance-like values stored as uint16 (the way Sentinel-2 L1C ships them)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(200, 3500, (13, 1, 1))
    return np.clip(base + rng.normal(0, 300, (13, h, w)), 0, 4095).astype(np.uint16)


def test_a_13_band_uint16_geotiff_round_trips_with_its_crs_and_transform(tmp_path):
    pixels = sentinel_like(0)
    pixels[:, :, :40] = 0  # a nodata strip
    path = write_geotiff(tmp_path / "scene.tif", pixels, nodata=0)
    with open_source(path) as src:
        assert src.geo is not None and src.geo.crs == f"EPSG:{EPSG}"
        assert src.geo.transform == (500_000.0, 10.0, 0.0, 5_200_000.0, 0.0, -10.0) and src.geo.nodata == 0.0
        assert src.geo.linear_unit == "metre"
        assert src.mpp == pytest.approx(10e6)  # 10 m ground sample distance, in the one unit: micrometres
    out = tmp_path / "out"
    report = ingest_sources(str(out), [str(path)], options=WriteOptions(chunk=64, mask="nodata", nodata=0))
    assert report.complete, report.summary()
    reader = PatchReader(str(out))
    stored = reader.low_res("scene", 0)
    assert stored.dtype == np.uint16 and stored.shape == (13, 200, 240)
    np.testing.assert_array_equal(stored, pixels)  # bit-identical
    (row,), _ = read_manifest(str(out))
    assert row.channels == 13 and row.dtype == "uint16"
    assert row.crs == f"EPSG:{EPSG}" and row.geotransform == (500_000.0, 10.0, 0.0, 5_200_000.0, 0.0, -10.0)
    assert row.tissue_fraction == pytest.approx(200 / 240)  # the nodata strip is masked
    gats = zarr.open_group(str(out / "images" / "scene.zarr"), mode="r").attrs["gats"]
    assert gats["extra"]["geo"] == {"crs": f"EPSG:{EPSG}", "transform": [500_000.0, 10.0, 0.0, 5_200_000.0, 0.0,
                                                                           -10.0], "nodata": 0.0,
                                     "linear_unit": "metre"}
    assert row.mpp == pytest.approx(10e6)
    # per-band statistics in the nets' convention: 12-bit values over 65535 sit near 0.01-0.05, so scaling by them
    # (model.band_scaled) is what gives the nets unit-variance input; dividing by the dtype's maximum does not
    mean, std = np.array(row.band_mean), np.array(row.band_std)
    assert mean.shape == (13,) and (mean < 0.07).all() and (std > 0).all()


def test_mask_nodata_without_a_value_takes_each_files_gdal_nodata(tmp_path):
    pixels = sentinel_like(1, 64, 80)
    pixels[:, :, :20] = 7  # this file's nodata is 7
    declared = write_geotiff(tmp_path / "declared.tif", pixels, nodata=7)
    silent = write_geotiff(tmp_path / "silent.tif", pixels)  # no GDAL_NODATA tag
    report = ingest_sources(str(tmp_path / "out"), [str(declared), str(silent)],
                            options=WriteOptions(chunk=64, min_size=16, mask="nodata"))
    rows = {o.row.image_id: o.row for o in report.outcomes}
    assert rows["declared"].tissue_fraction == pytest.approx(60 / 80)
    assert rows["silent"].status == "failed" and "MaskError" in rows["silent"].error
    assert "--nodata VALUE" in rows["silent"].error


def test_a_plain_tiff_has_no_geo_and_keeps_its_microscopy_resolution(tmp_path):
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, np.zeros((64, 64), np.uint16), resolution=(40000, 40000), resolutionunit="CENTIMETER")
    with open_source(path) as src:
        assert src.geo is None and src.mpp == pytest.approx(0.25)


@pytest.mark.parametrize(("epsg", "linear_unit", "mpp"), [
    (4326, None, None),  # geographic: degrees are not a length
    (32767, None, None),  # user-defined projected CRS, no unit key: unknown
    (32767, 9001, 10e6),  # user-defined projected CRS in metres (ProjLinearUnitsGeoKey)
    (3857, 9001, None),  # Web Mercator: metres on the map, not on the ground
    (25832, None, 10e6),  # ETRS89 / UTM 32N, known to be in metres
])
def test_only_a_crs_in_ground_metres_gives_a_resolution(tmp_path, epsg, linear_unit, mpp):
    """Without a resolution, a physical one asked of the image is a ResolutionError naming --mpp, never a guess."""
    geographic = epsg == 4326
    keys = [1, 1, 0, 3, 1024, 0, 1, 2 if geographic else 1, 1025, 0, 1, 1, 2048 if geographic else 3072, 0, 1, epsg]
    if linear_unit:
        keys[3] += 1
        keys += [3076, 0, 1, linear_unit]
    path = tmp_path / f"crs{epsg}.tif"
    tifffile.imwrite(path, sentinel_like(3, 64, 64), photometric="minisblack", planarconfig="separate", extratags=[
        (33550, "d", 3, (10.0, 10.0, 0.0), True), (33922, "d", 6, (0.0, 0.0, 0.0, 10.0, 50.0, 0.0), True),
        (34735, "H", len(keys), keys, True)])
    with open_source(path) as src:
        assert src.geo is not None and src.geo.linear_unit == ("metre" if mpp else "")
        assert src.mpp == (pytest.approx(mpp) if mpp else None)


def test_mpp_does_not_replace_a_files_own_resolution(tmp_path):
    """--mpp is for files that record none: a GeoTIFF in metres keeps its 10 m (1e7 um) on a rerun with --mpp."""
    path = write_geotiff(tmp_path / "scene.tif", sentinel_like(4, 64, 64))
    out = str(tmp_path / "out")
    assert ingest_sources(out, [str(path)], options=WriteOptions(chunk=64)).complete
    again = ingest_sources(out, [str(path)], options=WriteOptions(chunk=64, mpp=0.5))
    assert [o.skipped for o in again.outcomes] == [True]
    (row,), _ = read_manifest(out)
    assert row.mpp == pytest.approx(10e6)
