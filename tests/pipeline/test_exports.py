"""pipeline/exports.py: GeoJSON in level-0 pixels (valid, closed, counter-clockwise), the attention OME-Zarr placed
exactly over the image (validated against the OME-NGFF 0.5 schema), atomic tables."""
from __future__ import annotations

import json
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr

from pipeline.exports import (AttentionGrid, geojson_features, mass_region, region_polygons, write_attention_zarr,
                              write_geojson, write_table)
from pipeline.pyramid import open_pyramid, write_pyramid


def _signed_area(ring: list[list[float]]) -> float:
    r = np.asarray(ring, dtype=np.float64)
    return 0.5 * float(np.sum(r[:-1, 0] * r[1:, 1] - r[1:, 0] * r[:-1, 1]))


def _polygons(feature: dict) -> list[list[list[list[float]]]]:
    geometry = feature["geometry"]
    return [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]


def _check_rings(feature: dict) -> None:
    for polygon in _polygons(feature):
        for i, ring in enumerate(polygon):
            assert ring[0] == ring[-1] and len(ring) >= 4  # closed
            assert (_signed_area(ring) > 0) == (i == 0)  # exterior counter-clockwise, holes clockwise


def _hot_grid() -> AttentionGrid:
    """A 6x8 grid on a view of factor 8 (stride 1): cell (2, 5) holds 0.6, cell (4, 1) 0.3, the rest share 0.1."""
    values = np.full((6, 8), 0.1 / 46)
    values[2, 5], values[4, 1] = 0.6, 0.3
    return AttentionGrid.from_view(values, (8.0, 8.0))


def test_geojson_boxes_and_contours_in_level0_pixels(tmp_path: Path) -> None:
    grid = _hot_grid()
    boxes = np.array([[4, 28, 32, 32], [20, -4, 32, 32]])  # (y0, x0, h, w): the cells' 32-px patches
    path = write_geojson(tmp_path / "g" / "a.geojson", grid, boxes, np.array([0.6, 0.3]))
    collection = json.loads(path.read_text())
    assert collection["type"] == "FeatureCollection" and [p.name for p in path.parent.iterdir()] == ["a.geojson"]
    tops, contours = collection["features"][:2], collection["features"][2:]
    for feature in collection["features"]:
        _check_rings(feature)
        assert feature["properties"]["objectType"] == "annotation" and feature["properties"]["classification"]["name"]
    assert [f["properties"]["rank"] for f in tops] == [1, 2] and tops[0]["properties"]["attention"] == 0.6
    # x right, y down: box (y0=4, x0=28, h=32, w=32) is x in [28, 60], y in [4, 36]
    assert tops[0]["geometry"]["coordinates"] == [[[28, 4], [60, 4], [60, 36], [28, 36], [28, 4]]]
    assert [c["properties"]["mass"] for c in contours] == [0.5, 0.9]
    half, most = (c["properties"] for c in contours)
    assert half["threshold"] == 0.6 and half["mass_inside"] == pytest.approx(0.6) and half["cells"] == 1
    assert most["threshold"] == 0.3 and most["mass_inside"] == pytest.approx(0.9) and most["cells"] == 2
    # the 50% region is cell (2, 5): level-0 x in [40, 48), y in [16, 24); its outline runs along those edges
    (polygon,) = contours[0]["geometry"]["coordinates"]
    xs, ys = zip(*polygon[0])
    assert (min(xs), max(xs), min(ys), max(ys)) == (40, 48, 16, 24)
    assert len(contours[1]["geometry"]["coordinates"]) == 2  # two separate cells


def test_geojson_is_valid_for_shapely_and_top1_is_the_box() -> None:
    shapely = pytest.importorskip("shapely")
    from shapely.geometry import Point, box, shape

    grid = _hot_grid()
    collection = geojson_features(grid, np.array([[4, 28, 32, 32], [20, -4, 32, 32]]), np.array([0.6, 0.3]))
    geometries = [shape(f["geometry"]) for f in collection["features"]]
    assert all(g.is_valid for g in geometries), [shapely.validation.explain_validity(g) for g in geometries]
    assert geometries[0].equals(box(28, 4, 60, 36))  # (minx, miny, maxx, maxy)
    half, most = geometries[2:]
    assert half.contains(Point(44, 20)) and not half.contains(Point(12, 36))  # cell centres (offset 0.5 * 8 = 4)
    assert most.contains(Point(44, 20)) and most.contains(Point(12, 36)) and not most.contains(Point(28, 20))
    assert 0.75 * 64 < half.area <= 64  # one 8x8 cell, corners cut by a quarter cell


def test_contours_of_random_regions_are_valid_and_separate_cell_centres() -> None:
    pytest.importorskip("shapely")
    from shapely.geometry import MultiPoint, MultiPolygon, Polygon

    rng = np.random.default_rng(0)
    for trial in range(40):
        mask = rng.random((7, 9)) < 0.45
        if not mask.any():
            continue
        grid = AttentionGrid.from_view(mask.astype(float), (4.0, 2.0), stride_yx=(4.0, 4.0), offset_yx=(2.0, 2.0))
        polygons = region_polygons(grid, mask)
        region = MultiPolygon([Polygon(p[0], p[1:]) for p in polygons])
        assert region.is_valid, (trial, mask.astype(int))
        rows, cols = np.mgrid[:7, :9]
        centres = np.stack([2.0 * (2 + 4 * cols), 4.0 * (2 + 4 * rows)], axis=-1)  # (x, y) level-0
        assert region.contains(MultiPoint(centres[mask].tolist()))
        assert not region.intersects(MultiPoint(centres[~mask].tolist()))


def test_a_ring_of_attention_gives_a_polygon_with_a_hole() -> None:
    values = np.zeros((5, 5))
    values[1:4, 1:4] = 1.0
    values[2, 2] = 0.0  # a ring of 8 cells around an empty one
    grid = AttentionGrid(values / 8, origin_yx=(0.5, 0.5), step_yx=(1.0, 1.0))
    (polygon,) = geojson_features(grid, np.zeros((0, 4)), np.zeros(0), masses=(0.9,))["features"][0][
        "geometry"]["coordinates"]
    assert len(polygon) == 2 and _signed_area(polygon[0]) > 0 > _signed_area(polygon[1])
    pytest.importorskip("shapely")
    from shapely.geometry import Point, Polygon

    shp = Polygon(polygon[0], polygon[1:])
    assert shp.is_valid and not shp.contains(Point(2.5, 2.5)) and shp.contains(Point(1.5, 2.5))


def test_mass_region_and_bad_inputs() -> None:
    values = np.array([[0.5, 0.2], [0.2, 0.1]])
    assert mass_region(values, 0.5)[1].sum() == 1
    threshold, mask, inside = mass_region(values, 0.6)  # the tie at 0.2 takes both cells
    assert threshold == 0.2 and mask.sum() == 3 and inside == pytest.approx(0.9)
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        mass_region(values, 1.0)
    with pytest.raises(ValueError, match="non-negative"):
        AttentionGrid(-values, (0.5, 0.5), (1.0, 1.0))
    with pytest.raises(ValueError, match="one per box"):
        geojson_features(AttentionGrid(values, (0.5, 0.5), (1.0, 1.0)), np.zeros((2, 4)), np.zeros(1))


@pytest.mark.parametrize("mpp", [None, 0.25])
def test_attention_zarr_validates_and_sits_over_an_odd_sized_image(tmp_path: Path, mpp: float | None) -> None:
    from ome_zarr_models.v05.image import Image

    image = np.random.default_rng(1).integers(0, 255, (1, 201, 147), dtype=np.uint8)
    write_pyramid(str(tmp_path / "data"), "odd", da.from_array(image), chunk=64, min_size=20, mpp=mpp)
    info = open_pyramid(str(tmp_path / "data"), "odd").info
    assert info.shapes[3] == (26, 19) and info.downsamples[3] == (8.0, 8.0)  # 201 / 26 = 7.7, yet the factor is 8
    attention = np.random.default_rng(2).random(info.shapes[3])
    grid = AttentionGrid.from_view(attention / attention.sum(), info.downsamples[3])
    path = write_attention_zarr(tmp_path / "out" / "odd.zarr", grid, name="odd", mpp=mpp, extra_attrs={"mode": "topk"})
    write_attention_zarr(path, grid, name="odd", mpp=mpp)  # a rewrite replaces it whole
    assert [p.name for p in path.parent.iterdir()] == ["odd.zarr"]  # no temporary or old copies left

    group = zarr.open_group(str(path), mode="r")
    ms = Image.from_zarr(group).attributes.ome.multiscales[0]  # pydantic schema of OME-NGFF 0.5
    assert [a.name for a in ms.axes] == ["y", "x"] and [a.type for a in ms.axes] == ["space", "space"]
    scale, translation = ms.datasets[0].coordinateTransformations
    base = 1.0 if mpp is None else mpp
    # the same convention as the image pyramid's level 3: scale 8, translation (8 - 1) / 2, times mpp
    assert list(scale.scale) == [8 * base] * 2 and list(translation.translation) == [3.5 * base] * 2
    image_attrs = json.loads((tmp_path / "data/images/odd.zarr/zarr.json").read_text())["attributes"]["ome"]
    stored = image_attrs["multiscales"][0]["datasets"][3]["coordinateTransformations"]
    assert stored[0]["scale"][1:] == list(scale.scale) and stored[1]["translation"][1:] == list(translation.translation)
    assert (ms.axes[0].unit == "micrometer") == (mpp is not None)
    data = group["0"][:]
    assert data.dtype == np.float32 and np.allclose(data, attention / attention.sum())


def test_write_table_is_atomic_and_keeps_metadata(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = write_table(tmp_path / "t.parquet", {"image_id": ["a", "b"], "label": [None, None]}, {"classes": "[]"},
                       {"label": pa.string()})
    table = pq.read_table(path)
    assert table.column_names == ["image_id", "label"] and table.schema.field("label").type == pa.string()
    assert table.schema.metadata[b"classes"] == b"[]" and [p.name for p in tmp_path.iterdir()] == ["t.parquet"]
