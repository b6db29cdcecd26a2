"""Small file helpers for the source and ingest tests: random pixels, PNGs, tiled (pyramidal) TIFFs, truncation,
open file descriptors.

Plain functions, imported by name (`from tests.pipeline.files import rgb, write_png`); the fixtures that fetch real
files live in conftest.py (`samples` in tests/conftest.py, `mnist_train`/`mnist_test` in tests/pipeline/conftest.py).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image


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


def open_fds(path: Path) -> int:
    """How many of this process's file descriptors point at `path` (Linux /proc)."""
    target, n = str(Path(path).resolve()), 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == target
        except OSError:  # closed between listdir and readlink (e.g. the listdir's own descriptor)
            pass
    return n
