"""PatchReader: equals numpy slicing with fill padding for any box, converts level-0 boxes with the stored factors,
fetches each touched chunk exactly once, and refuses incomplete images."""
from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import ImageNotFoundError, IncompleteImageError
from pipeline.pyramid import write_pyramid
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
    assert info.downsamples[2] == (150 / 38, 110 / 28)
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
    with pytest.raises(ValueError, match="scale"):
        reader.level_for_scale("img", 2.0)


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
