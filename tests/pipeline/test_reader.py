"""PatchReader: equals numpy slicing with fill padding for any box, converts level-0 boxes with the stored exact
factors (d^l) so a box at the far edge of a large odd-sized image lands on the level-l pixels covering the same
level-0 region, still opens old pyramids with their stored (inexact) factors, fetches each touched chunk exactly once,
and refuses incomplete images."""
from __future__ import annotations

import json
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import ImageNotFoundError, IncompleteImageError
from pipeline.pyramid import open_pyramid, write_pyramid
from pipeline.reader import PatchReader, boxes_to_level, parse_boxes
from pipeline.storage import Storage, image_key

H, W, CHUNK = 150, 110, 32


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, np.ndarray]:
    root = str(tmp_path_factory.mktemp("reader"))
    x = np.random.default_rng(0).integers(1, 256, (3, H, W), dtype=np.uint8)  # no zeros: padding is visible
    write_pyramid(root, "img", da.from_array(x), chunk=CHUNK, min_size=20)
    write_pyramid(root, "white", da.from_array(x[:1]), chunk=CHUNK, fill_value=255, max_levels=1)
    return root, x


def _reference(x: np.ndarray, box: np.ndarray, fill: int = 0) -> np.ndarray:
    """numpy slicing of a padded copy."""
    y0, x0, h, w = (int(v) for v in box)
    pad = max(h, w, abs(y0), abs(x0)) + 1
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad)), constant_values=fill)
    return padded[:, y0 + pad:y0 + pad + h, x0 + pad:x0 + pad + w]


def _touched(boxes: np.ndarray, shape: tuple[int, int], chunk: int) -> set[tuple[int, int]]:
    out = set()
    for y0, x0, h, w in boxes:
        for y in range(max(y0, 0), min(y0 + h, shape[0])):
            for x in range(max(x0, 0), min(x0 + w, shape[1])):
                out.add((y // chunk, x // chunk))
    return out


coord = st.integers(-60, max(H, W) + 20)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(boxes=st.lists(st.tuples(coord, coord), min_size=1, max_size=6), size=st.tuples(
    st.integers(1, 70), st.integers(1, 70)))
def test_read_equals_padded_slicing(stored: tuple[str, np.ndarray], boxes: list, size: tuple[int, int]) -> None:
    root, x = stored
    arr = np.array([[y, xx, *size] for y, xx in boxes])
    reader = PatchReader(root)
    got = reader.read("img", arr)
    assert got.shape == (len(arr), 3, *size) and got.dtype == np.uint8
    for box, patch in zip(arr, got):
        np.testing.assert_array_equal(patch, _reference(x, box))
    touched = _touched(arr, (H, W), CHUNK)
    st_ = Storage(root)
    assert reader.stats.chunks_read == len(touched)
    assert reader.stats.bytes_read == sum(st_.size(f"{image_key('img')}/0/c/0/{cy}/{cx}") for cy, cx in touched)


@pytest.mark.parametrize("box", [
    (0, 0, 16, 16), (H - 16, W - 16, 16, 16), (-8, -8, 16, 16), (H - 8, W - 8, 16, 16),  # corners
    (-8, 40, 16, 16), (H - 8, 40, 16, 16), (40, -8, 16, 16), (40, W - 8, 16, 16),  # every edge
    (-16, -16, 16, 16), (H, W, 16, 16), (-100, 500, 16, 16), (0, 0, H, W), (-5, -5, H + 10, W + 10),
])
def test_edges_and_outside(stored: tuple[str, np.ndarray], box: tuple[int, int, int, int]) -> None:
    root, x = stored
    reader = PatchReader(root)
    np.testing.assert_array_equal(reader.read("img", [box])[0], _reference(x, np.array(box)))
    np.testing.assert_array_equal(reader.read("white", [box])[0], _reference(x[:1], np.array(box), fill=255))


def test_overlapping_boxes_fetch_each_chunk_once(stored: tuple[str, np.ndarray]) -> None:
    root, _ = stored
    reader = PatchReader(root)
    reader.read("img", [[0, 0, 8, 8]])  # warm: opens the image
    before = reader.stats
    reader.read("img", [[1, 1, 8, 8], [2, 2, 8, 8], [20, 20, 8, 8], [5, 5, 8, 8]])  # all in chunk (0, 0)
    after = reader.stats
    size = Storage(root).size(f"{image_key('img')}/0/c/0/0/0")
    assert (after.chunks_read - before.chunks_read, after.bytes_read - before.bytes_read) == (1, size)
    assert after.requests == before.requests + 1


def test_levels_use_stored_factors(stored: tuple[str, np.ndarray]) -> None:
    root, _ = stored
    reader = PatchReader(root)
    info = reader.info("img")
    assert info.shapes == ((150, 110), (75, 55), (38, 28), (19, 14))
    assert info.downsamples == ((1.0, 1.0), (2.0, 2.0), (4.0, 4.0), (8.0, 8.0))  # exact: not 150 / 38, 110 / 28
    box = np.array([[40, 60, 32, 24]])
    for level in range(info.levels):
        fy, fx = info.downsamples[level]
        lb = boxes_to_level(box, (fy, fx))[0]
        assert tuple(lb) == tuple(int(np.floor(v + 0.5)) for v in (40 / fy, 60 / fx, 32 / fy, 24 / fx))
        whole = reader.low_res("img", level)
        assert whole.shape == (3, *info.shapes[level])
        np.testing.assert_array_equal(reader.read("img", box, level=level)[0], _reference(whole, lb))
    assert reader.read("img", box, level=1).shape == (1, 3, 16, 12)  # h / 2**l when the factor is exactly 2


def test_level_for_scale(stored: tuple[str, np.ndarray]) -> None:
    reader = PatchReader(stored[0])
    assert [reader.level_for_scale("img", s) for s in (1.0, 0.6, 0.5, 0.3, 0.2, 0.01)] == [0, 1, 1, 2, 2, 3]
    assert [reader.level_for_scale("img", s) for s in (0.25, 0.125, 2**-1.5, 2**-2.5)] == [2, 3, 1, 2]  # ties: finer
    with pytest.raises(ValueError, match="scale"):
        reader.level_for_scale("img", 2.0)


def _coords_image(h: int, w: int) -> da.Array:
    """(2, h, w) float32, lazy: channel 0 is the row y, channel 1 the column x, so means over cells are exact."""
    yy, xx = da.meshgrid(da.arange(h, dtype=np.float32, chunks=256), da.arange(w, dtype=np.float32, chunks=256),
                         indexing="ij")  # (h, w) each
    return da.stack([yy, xx])  # (2, h, w)


def _cascade(n: int, levels: int, d: int = 2) -> list[np.ndarray]:
    """A coordinate axis 0..n-1 after l repeated d-means over the values present (float32 per level, as stored)."""
    out = [np.arange(n, dtype=np.float32)]
    for _ in range(1, levels):
        prev = out[-1].astype(np.float64)
        starts = np.arange(0, len(prev), d)
        counts = np.diff(np.append(starts, len(prev)))
        out.append((np.add.reduceat(prev, starts) / counts).astype(np.float32))
    return out


def _stored_slice(array: object, y: int, x: int, h: int, w: int, fill: float) -> np.ndarray:
    """array[:, y:y+h, x:x+w] read straight from zarr, padded with `fill` where it leaves the level."""
    c, hl, wl = array.shape
    out = np.full((c, h, w), fill, dtype=array.dtype)
    ya, yb, xa, xb = max(y, 0), min(y + h, hl), max(x, 0), min(x + w, wl)
    if yb > ya and xb > xa:
        out[:, ya - y:yb - y, xa - x:xb - x] = array[:, ya:yb, xa:xb]
    return out


@pytest.fixture(scope="module")
def coords_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("coords"))
    write_pyramid(root, "wide", _coords_image(2967, 1500), chunk=256, min_size=64)  # 7 levels
    write_pyramid(root, "tall", _coords_image(20769, 300), chunk=256, min_size=64)  # 10 levels
    return root


@pytest.mark.parametrize("image_id, box", [
    ("wide", (2967 - 64, 1500 - 64, 64, 64)),  # the last 64 x 64 level-0 pixels
    ("wide", (2967 - 40, 1500 - 24, 64, 64)),  # overhanging the far corner
    ("wide", (1001, 777, 64, 64)),
    ("tall", (20769 - 64, 300 - 64, 64, 64)),  # the far corner of a 20769-row image
    ("tall", (20769 - 30, 300 - 50, 64, 64)),
])
def test_far_edge_boxes_cover_the_same_level0_region(coords_root: str, image_id: str, box: tuple) -> None:
    """At every level, a box equals the stored level sliced at round_half_up(y0 / 2**l), max(1, round_half_up(h /
    2**l)) (fill outside), and each returned level-l pixel holds the mean of the level-0 coordinates it covers,
    [j 2**l, (j+1) 2**l) clipped to the image: exactly for whole cells; for the image's last, partial cell the stored
    value is the mean of means of the levels above (the 2x2 mean over the pixels present, applied level by level),
    which lies inside the covered span."""
    pyramid = open_pyramid(coords_root, image_id)
    height, width = pyramid.info.height, pyramid.info.width
    cy, cx = _cascade(height, pyramid.info.levels), _cascade(width, pyramid.info.levels)
    reader = PatchReader(coords_root)
    y0, x0, h, w = box
    for level, array in enumerate(pyramid.arrays):
        f = 2**level
        assert pyramid.info.downsamples[level] == (float(f), float(f))
        ly, lx = int(np.floor(y0 / f + 0.5)), int(np.floor(x0 / f + 0.5))
        lh, lw = max(1, int(np.floor(h / f + 0.5))), max(1, int(np.floor(w / f + 0.5)))
        got = reader.read(image_id, [box], level=level)[0]  # (2, lh, lw)
        np.testing.assert_array_equal(got, _stored_slice(array, ly, lx, lh, lw, 0.0))

        for channel, start, n, size0, size_l, casc in ((0, ly, lh, height, array.shape[1], cy[level]),
                                                         (1, lx, lw, width, array.shape[2], cx[level])):
            j = start + np.arange(n)  # level-l indices along this axis
            inside = (j >= 0) & (j < size_l)
            lo, hi = j * f, np.minimum((j + 1) * f, size0)  # level-0 span [lo, hi) of each level-l pixel
            assert np.all(lo[inside] < size0)  # size_l = ceil(size0 / f): every stored pixel covers image pixels
            whole = inside & (hi - lo == f)
            expected = np.where(whole, (lo + hi - 1) / 2, casc[np.clip(j, 0, size_l - 1)])  # exact mean if whole
            values = got[channel] if channel == 0 else got[channel].T  # (n, other)
            other = (lx, lw, array.shape[2]) if channel == 0 else (ly, lh, array.shape[1])
            k = other[0] + np.arange(other[1])
            cols = (k >= 0) & (k < other[2])  # the other axis's pixels inside the level
            sub = values[:, cols]  # (n, m)
            np.testing.assert_array_equal(sub[inside], np.broadcast_to(expected[inside, None], sub[inside].shape))
            assert np.all(sub[~inside] == 0)  # outside: the fill value
            assert np.all((sub[inside] >= lo[inside, None]) & (sub[inside] <= hi[inside, None] - 1))
    if image_id == "tall" and box[0] == 20769 - 64:
        # coarsest level (factor 512, 41 rows): the corner box reads row 40; the old factor 20769/41 = 506.6 read
        # row round(20705 / 506.6) = 41, entirely outside the image
        assert tuple(got.shape) == (2, 1, 1) and got[0, 0, 0] == cy[-1][40]


def test_old_pyramid_opens_with_its_stored_factors(tmp_path: Path) -> None:
    """A pyramid written before exact geometry (scale H0/H_l, no translation) opens and reads with those factors."""
    root = str(tmp_path)
    x = np.random.default_rng(5).integers(1, 256, (2, 333, 517), dtype=np.uint8)
    write_pyramid(root, "old", da.from_array(x), chunk=32, min_size=40)
    zarr_json = tmp_path / "images" / "old.zarr" / "zarr.json"
    meta = json.loads(zarr_json.read_text())
    datasets = meta["attributes"]["ome"]["multiscales"][0]["datasets"]
    shapes = [json.loads((tmp_path / "images" / "old.zarr" / d["path"] / "zarr.json").read_text())["shape"][1:]
              for d in datasets]
    for d, (hl, wl) in zip(datasets, shapes):
        d["coordinateTransformations"] = [{"type": "scale", "scale": [1.0, 333 / hl, 517 / wl]}]
    meta["attributes"]["gats"]["format"] = 1
    zarr_json.write_text(json.dumps(meta))

    reader = PatchReader(root)
    info = reader.info("old")
    assert info.downsamples == tuple((333 / hl, 517 / wl) for hl, wl in shapes)
    assert info.downsamples[1] == (333 / 167, 517 / 259) != (2.0, 2.0)
    box = np.array([[300, 480, 32, 36]])
    for level in range(info.levels):
        lb = boxes_to_level(box, info.downsamples[level])[0]
        whole = reader.low_res("old", level)
        np.testing.assert_array_equal(reader.read("old", box, level=level)[0], _reference(whole, lb))


def test_cache_and_bad_requests(stored: tuple[str, np.ndarray], tmp_path: Path) -> None:
    root, _ = stored
    reader = PatchReader(root, max_open=1)
    reader.read("img", [[0, 0, 4, 4]])
    reader.read("white", [[0, 0, 4, 4]])  # evicts "img"; its bytes stay counted
    assert reader.stats.chunks_read == 2 and reader.stats.bytes_read > 0
    assert reader.read("img", np.zeros((0, 4), int)).shape == (0, 3, 0, 0)
    with pytest.raises(ValueError, match="same positive"):
        reader.read("img", [[0, 0, 4, 4], [0, 0, 5, 4]])
    with pytest.raises(ValueError, match="shape \\(n, 4\\)"):
        parse_boxes([[0, 0, 4]])
    with pytest.raises(ValueError, match="level in \\[0, 3\\]"):
        reader.read("img", [[0, 0, 4, 4]], level=4)
    with pytest.raises(ImageNotFoundError, match="ingest"):
        reader.read("nope", [[0, 0, 4, 4]])


def test_refuses_incomplete(tmp_path: Path) -> None:
    root = str(tmp_path)
    write_pyramid(root, "img", da.zeros((1, 40, 40), dtype=np.uint8, chunks=(1, 40, 40)), chunk=16)
    zarr_json = tmp_path / "images" / "img.zarr" / "zarr.json"
    zarr_json.write_text(zarr_json.read_text().replace('"complete": true', '"complete": false'))
    with pytest.raises(IncompleteImageError):
        PatchReader(root).read("img", [[0, 0, 4, 4]])
    with pytest.raises(IncompleteImageError):
        PatchReader(root).low_res("img", 0)
