"""Whole-slide vendor formats (.svs, .ndpi, .mrxs, .scn, ... and vendor TIFFs) through OpenSlide, as lazy arrays.

Level 0 is read region by region (`read_region`, one per dask chunk, aligned to the slide's own tiles), composited
from RGBA onto the fill value (the slide's background colour unless given); mpp comes from `openslide.mpp-x`. The
file is opened on the first read and closed by `SourceImage.close()`; opening reads metadata only and leaves no
handle open. `pipeline.sources.open_source` dispatches here.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import CorruptImageError, UnsupportedImageError
from pipeline.sources import (SOURCE_CHUNK_PX, LazyLevel0, SourceImage, composite, corrupt_error, image_stem,
                              lazy_array, probe_corners, source_chunks)


def openslide_vendor(p: Path) -> str | None:
    """OpenSlide's vendor name for a file it reads natively, None for plain TIFFs and everything else."""
    import openslide

    try:
        vendor = openslide.OpenSlide.detect_format(str(p))
    except (openslide.OpenSlideError, OSError, ValueError):  # "not a slide": the specific opener reports the problem
        return None
    return None if vendor in (None, "generic-tiff") else vendor



class _OpenSlideLevel0(LazyLevel0):
    """Level 0 as (3, H, W) uint8: each read is one `read_region`, composited to RGB."""

    def __init__(self, path: Path, width: int, height: int, fill: int) -> None:
        super().__init__(path, (3, height, width), np.dtype(np.uint8))
        self.fill = fill

    def _open(self) -> tuple[Any, Any]:
        import openslide

        slide = openslide.OpenSlide(str(self.path))
        return slide, slide

    def __getitem__(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        cs, ys, xs = key
        y0, y1, _ = ys.indices(self.shape[1])
        x0, x1, _ = xs.indices(self.shape[2])
        if y1 <= y0 or x1 <= x0:
            return np.zeros((3, max(0, y1 - y0), max(0, x1 - x0)), np.uint8)[cs]
        region = self._reader().read_region((x0, y0), 0, (x1 - x0, y1 - y0))  # (x, y) and (w, h): OpenSlide's order
        rgb = composite(np.asarray(region), self.fill)  # (h, w, 4) -> (h, w, 3)
        return np.ascontiguousarray(rgb.transpose(2, 0, 1))[cs]  # (h, w, 3) -> (3, h, w)


def open_openslide(p: Path, fill: int | None) -> SourceImage:
    import openslide

    try:
        slide = openslide.OpenSlide(str(p))
    except openslide.OpenSlideUnsupportedFormatError as exc:
        raise UnsupportedImageError(f"{str(p)!r} is not a slide format OpenSlide supports ({exc}). Convert it to a "
                                    "tiled TIFF.") from exc
    except (openslide.OpenSlideError, OSError) as exc:
        raise CorruptImageError(f"{str(p)!r} could not be opened by OpenSlide ({type(exc).__name__}: {exc}); it is "
                                "truncated or damaged. Re-export or re-download it.") from exc
    with slide:  # metadata only; pixels are read through _OpenSlideLevel0
        props = dict(slide.properties)
        width, height = slide.dimensions
    if fill is None:
        fill = _background_fill(props.get("openslide.background-color"))
    mpp = _float_or_none(props.get("openslide.mpp-x"))
    level0 = _OpenSlideLevel0(p, width, height, fill)
    tile = int(props.get("openslide.level[0].tile-width", 0) or 0)
    edge = tile * max(1, SOURCE_CHUNK_PX // tile) if tile else SOURCE_CHUNK_PX
    array = lazy_array(level0, source_chunks(*level0.shape, edge=edge), p, f"openslide-{fill}")
    try:
        probe_corners(array, p)
    except (openslide.OpenSlideError, OSError, ValueError) as exc:
        raise corrupt_error(p, exc) from exc
    finally:
        level0.close()  # the probe's handle; writing the array opens one, which SourceImage.close() closes
    return SourceImage(str(p), image_stem(p), array, mpp, fill, "openslide", level0)


def _background_fill(colour: str | None) -> int:
    """OpenSlide's hex background colour (e.g. 'FFFFFF') -> one grey level; 0 when the slide names none."""
    if not colour or len(colour) != 6:
        return 0
    try:
        rgb = [int(colour[i:i + 2], 16) for i in (0, 2, 4)]
    except ValueError:
        return 0
    return round(sum(rgb) / 3)


def _float_or_none(value: str | None) -> float | None:
    try:
        out = float(value) if value is not None else None
    except ValueError:
        return None
    return out if out is not None and math.isfinite(out) and out > 0 else None
