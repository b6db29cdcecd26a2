"""Physical resolution: which pyramid levels serve a requested micrometres per pixel, and patch resampling.

    asked = Requested(0.5, "data.patch_um_per_px")    a resolution, and the setting it came from (named in errors)
    scale = patch_scale(mpp, asked, image_id)         level-0 px per patch px (2.0: a 40x slide read at 20x)
    level = patch_level(downsamples, scale)           the coarsest level no coarser than that (within 2%)
    level = view_level(downsamples, mpp, asked, image_id)   the level nearest the view's resolution (log space)
    pixels = resample(patches, (h, w))                (n, C, h_l, w_l) -> (n, C, h, w), linear, same dtype

One mechanism for every unit: each image records its level-0 pixel size in micrometres (the manifest and pyramid
`mpp`; a georeferenced raster in metres records metres x 1e6, see pipeline.sources.GeoInfo), and training asks for
micrometres per pixel (`data.*_um_per_px`, or `data.*_m_per_px`, converted once in training.config; errors speak
the unit of the setting the user wrote).

Patches: the model works in a "patch frame", the image as if it were stored at the requested resolution (one patch
pixel = `scale` level-0 pixels). Its boxes become level-0 boxes (ats_model.geometry.scale_boxes) and are read at
`patch_level`, the coarsest level whose factor is at most `scale` (1 + RESAMPLE_TOLERANCE): reading a finer level
and shrinking keeps the detail the model is asked for, where the nearest coarser level would have to be enlarged.
When the read size differs from the patch size (a 0.2525 um/px scanner asked for 1.0 um/px), `resample` makes it
exact; within the tolerance that can enlarge by up to 2% (a 127-px read made 128). Asking for finer pixels than the
image has, by more than that, is a ResolutionError, never an upsampling.

The view only steers attention: it is the level nearest the requested resolution (ties to the finer), as
`data.low_scale` picks it, and its exact factor still maps cells to boxes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pipeline.errors import ResolutionError

RESAMPLE_TOLERANCE = 0.02  # a level up to 2% coarser than asked still serves patches (scanners differ by ~1%)


@dataclass(frozen=True, slots=True)
class Requested:
    """A requested resolution in micrometres per pixel, and the setting it came from: errors name that setting and
    speak its unit (a `..._m_per_px` setting in metres)."""

    mpp: float  # micrometres per pixel
    knob: str  # e.g. "data.patch_um_per_px" or "data.patch_m_per_px"

    @property
    def in_metres(self) -> bool:
        return self.knob.endswith("_m_per_px")

    def show(self, mpp: float) -> str:
        """A resolution in micrometres per pixel, written in the setting's unit."""
        return f"{mpp / 1e6:g} m/px" if self.in_metres else f"{mpp:g} um/px"

    def setting(self, mpp: float) -> str:
        """`knob=value` in the setting's unit: what to write to ask for `mpp`."""
        return f"{self.knob}={mpp / 1e6 if self.in_metres else mpp:g}"


def require_mpp(mpp: float | None, image_id: str, knob: str) -> float:
    """The image's micrometres per level-0 pixel; ResolutionError naming the fixes when it has none."""
    if mpp is None or not (math.isfinite(mpp) and mpp > 0):
        raise ResolutionError(
            f"Image {image_id!r} has no resolution (micrometres per pixel) recorded, and {knob} needs one. Re-run "
            "jobs/ingest.py on it with --mpp UM_PER_PX (for files that record none; 1e7 for 10 m rasters) or an mpp "
            f"column in its CSV: the rerun records it; or set {knob}=0 and choose levels by data.low_scale.")
    return float(mpp)


def patch_scale(mpp: float | None, asked: Requested, image_id: str) -> float:
    """Level-0 pixels per patch pixel: asked.mpp / mpp; ResolutionError when that would enlarge the image's pixels
    by more than the tolerance."""
    scale = asked.mpp / require_mpp(mpp, image_id, asked.knob)
    if scale * (1 + RESAMPLE_TOLERANCE) < 1:
        raise ResolutionError(
            f"Image {image_id!r} has {asked.show(mpp)} (level 0), coarser than {asked.setting(asked.mpp)}: its "
            f"patches would be enlarged {1 / scale:.2f}x, inventing detail. Set {asked.setting(mpp)} or more, or "
            "leave this image out.")
    return max(scale, 1.0)  # a scale just under 1 (within the tolerance) reads level 0 as it is


def nearest_level(downsamples: Sequence[tuple[float, float]], scale: float) -> int:
    """The level whose size relative to level 0 (1 / factor, geometric mean over y and x) is nearest `scale` in log
    space; ties go to the finer level. `downsamples`: each level's factor (fy, fx), as PyramidInfo and the manifest
    hold them."""
    if not (0 < scale <= 1):
        raise ValueError(f"Expected scale in (0, 1] (fraction of level-0 size). Got {scale}.")
    dist = [abs(math.log(scale) + 0.5 * math.log(fy * fx)) for fy, fx in downsamples]
    return int(min(range(len(dist)), key=lambda l: (round(dist[l], 12), l)))


def patch_level(downsamples: Sequence[tuple[float, float]], scale: float) -> int:
    """The coarsest level whose exact factor (both axes) is at most `scale` x (1 + RESAMPLE_TOLERANCE); level 0
    otherwise. `downsamples`: each level's (fy, fx), as PyramidInfo and the manifest hold them."""
    limit = scale * (1 + RESAMPLE_TOLERANCE)
    fitting = [level for level, (fy, fx) in enumerate(downsamples) if max(fy, fx) <= limit]
    return max(fitting, key=lambda level: max(downsamples[level])) if fitting else 0


def view_level(downsamples: Sequence[tuple[float, float]], mpp: float | None, asked: Requested,
               image_id: str) -> int:
    """The level nearest `asked` in log space (ties to the finer); level 0 when that is finer than level 0."""
    return nearest_level(downsamples, min(1.0, require_mpp(mpp, image_id, asked.knob) / asked.mpp))


def _weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) rows of a tent (linear) filter, each summing to 1: output pixel j is centred at
    (j + 1/2) n_in / n_out in input coordinates, and the tent's half-width is the shrink factor (1 when enlarging),
    so a shrink by r weighs the 2r input pixels nearest the centre. At the borders the tent is cut and renormalised,
    which pulls the first and last outputs slightly inward (by up to a quarter of the shrink factor)."""
    ratio = n_in / n_out
    support = max(1.0, ratio)
    centres = (np.arange(n_out) + 0.5) * ratio  # (n_out,) in input coordinates
    inputs = np.arange(n_in) + 0.5  # (n_in,) input pixel centres
    # every row has weight: the input centre nearest an output centre is within 1/2 < support of it
    w = np.clip(1 - np.abs(inputs[None, :] - centres[:, None]) / support, 0, None)  # (n_out, n_in)
    return w / w.sum(1, keepdims=True)


def resample(patches: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """(n, C, h, w) -> (n, C, out_h, out_w) in the same dtype: separable linear filtering (`_weights`: a tent
    widened by the shrink factor, so shrinking is antialiased); integers rounded and clipped to the dtype. Returns
    `patches` itself when the size already matches."""
    n, c, h, w = patches.shape
    oh, ow = int(out_hw[0]), int(out_hw[1])
    if (h, w) == (oh, ow):
        return patches
    if h == 0 or w == 0:
        raise ValueError(f"Cannot resample empty patches of size {h}x{w} to {oh}x{ow}.")
    wy, wx = _weights(h, oh), _weights(w, ow)  # (oh, h), (ow, w)
    out = np.einsum("yh,nchw,xw->ncyx", wy, patches.astype(np.float64), wx, optimize=True)  # (n, C, oh, ow)
    if np.issubdtype(patches.dtype, np.integer):
        info = np.iinfo(patches.dtype)
        out = np.clip(np.floor(out + 0.5), info.min, info.max)
    return out.astype(patches.dtype)
