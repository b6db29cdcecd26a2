"""Foreground masks: where attention may sample. Tissue on H&E slides, valid pixels on rasters, or the user's own.

A mask is computed (or resampled) on the pyramid's statistics level (`pipeline.pyramid.stats_level`: the finest of
at most 1 Mpx), so its cost is that of a thumbnail whatever the slide, and stored inside the image's pyramid as an
OME-NGFF 0.5 label image, `labels/tissue` (uint8, 1 = foreground, 0 = background; axes c, y, x with one channel;
the same scale and translation as that level of the image), which napari's OME-Zarr reader and QuPath show over the
image. The pyramid's `gats.mask` records `{"label", "level", "method", "fraction"}`; the fraction (foreground pixels
over all pixels of that level) goes to the manifest as `tissue_fraction`.

Rules (`MaskRule.method`):
- "tissue": H&E on glass. Saturation (max - min) / max of the RGB bands, a 3x3 median, Otsu's threshold on it (never
  below MIN_SATURATION, so a slide of glass alone is not split in two along its noise), closed, holes filled, and
  components under MIN_OBJECT_FRACTION of the level removed. Needs 3 or 4 bands (a 4th, alpha, must be > 0 too).
- "nodata": pixels where any band differs from `nodata` (and is finite) are foreground. The level is a mean of
  level 0, so a pixel mixing nodata and data counts as data: the mask errs on the side of sampling.
- "alpha": the last band > 0 (RGBA scans, rasters with an alpha band).
- "given": the user's mask (any size with the image's aspect ratio; non-zero = foreground), resampled to the level
  by nearest pixel centre.
An image with no foreground at all is a MaskError naming the fix: there is nothing to sample on it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from pipeline.errors import MaskError

MASK_LABEL = "tissue"
METHODS = ("tissue", "nodata", "alpha", "given")
COMPUTED_METHODS = METHODS[:3]  # what --mask names; "given" comes from --mask-dir
MIN_SATURATION = 0.05  # glass and white balance noise sit below it; eosin-stained tissue well above
MIN_OBJECT_FRACTION = 1e-4  # foreground components smaller than this share of the level are specks, not tissue
MASK_SUFFIXES = (".png", ".tif", ".tiff")


@dataclass(frozen=True, slots=True, eq=False)
class MaskRule:
    """How one image's mask is made: a METHODS entry, the nodata value for "nodata", the array for "given"."""

    method: str
    nodata: float | None = None
    given: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise MaskError(f"Expected a mask method in {METHODS}. Got {self.method!r}.")
        if self.method == "nodata" and (self.nodata is None or math.isnan(self.nodata)):
            raise MaskError("The 'nodata' mask needs a nodata value: pass --nodata VALUE (e.g. 0).")
        if self.method == "given" and (self.given is None or self.given.ndim != 2):
            raise MaskError("A given mask must be a 2-D array (height, width); non-zero marks foreground.")


def unit_float(pixels: np.ndarray) -> np.ndarray:
    """(C, h, w) pixels as float64 in the nets' convention: integers over their dtype's maximum, floats as stored."""
    x = np.asarray(pixels, dtype=np.float64)
    if pixels.dtype.kind in "ui":
        x /= float(np.iinfo(pixels.dtype).max)
    return x


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of 1-D finite values: the bin edge that maximises the between-class variance."""
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return hi
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    p = counts / counts.sum()  # (bins,)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)  # weight of the class at or below each bin
    m0 = np.cumsum(p * centres)  # its unnormalised mean
    total = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total * w0 - m0) ** 2 / (w0 * (1 - w0))
    between[~np.isfinite(between)] = -1.0
    # Two separated modes leave a plateau of equal splits across the gap between them: take its middle.
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float(edges[int(best[len(best) // 2]) + 1])


def tissue_mask(level: np.ndarray) -> np.ndarray:
    """(C, h, w) RGB or RGBA pixels -> (h, w) bool tissue (see the module docstring)."""
    c = level.shape[0]
    if c not in (3, 4):
        raise MaskError(
            f"The 'tissue' mask reads RGB (3 or 4 bands). Got {c} band(s): use --mask nodata --nodata VALUE, "
            "--mask alpha, or give masks with --mask-dir.")
    x = unit_float(level)
    rgb = np.nan_to_num(x[:3])  # (3, h, w)
    top, bottom = rgb.max(0), rgb.min(0)
    saturation = np.where(top > 0, (top - bottom) / np.where(top > 0, top, 1.0), 0.0)  # (h, w)
    saturation = ndimage.median_filter(saturation, size=3)
    threshold = max(otsu_threshold(saturation.ravel()), MIN_SATURATION)
    mask = saturation > threshold
    if c == 4:
        mask &= x[3] > 0
    mask = ndimage.binary_closing(mask, structure=np.ones((3, 3), bool), iterations=2, border_value=0)
    mask = ndimage.binary_fill_holes(mask)
    return remove_specks(mask)


def remove_specks(mask: np.ndarray) -> np.ndarray:
    """Drop 8-connected foreground components smaller than MIN_OBJECT_FRACTION of the mask (at least 4 px)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())  # (n + 1,), [0] is background
    keep = sizes >= max(4, MIN_OBJECT_FRACTION * mask.size)
    keep[0] = False
    return keep[labels]


def check_nodata(nodata: float, dtype: np.dtype) -> float:
    """The nodata value, refused when the image's dtype cannot hold it (it would then match no pixel)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        if not (float(nodata).is_integer() and info.min <= nodata <= info.max):
            raise MaskError(
                f"nodata {nodata} cannot occur in {dtype} pixels (integers in [{info.min}, {info.max}]): "
                "pass the value the raster really uses (gdalinfo shows it as 'NoData Value').")
    elif not (math.isnan(nodata) or np.isfinite(np.array(nodata, dtype=dtype))):
        raise MaskError(f"nodata {nodata} overflows {dtype}: pass the value the raster really uses.")
    return float(nodata)


def nodata_mask(level: np.ndarray, nodata: float) -> np.ndarray:
    """(C, h, w) -> (h, w) bool: some band holds a finite value other than `nodata`."""
    check_nodata(nodata, level.dtype)
    x = np.asarray(level)
    valid = x != nodata
    if x.dtype.kind == "f":
        valid &= np.isfinite(x)
    return valid.any(0)


def nearest_index(n_out: int, num: float, den: float, n_in: int) -> np.ndarray:
    """(n_out,) input pixel of each output pixel j by nearest centre: floor((j + 1/2) num / den), at most n_in - 1,
    where num / den is input pixels per output pixel."""
    return np.minimum(np.floor((np.arange(n_out) + 0.5) * num / den).astype(np.int64), n_in - 1)


def resample_nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(hm, wm) -> `shape` by nearest pixel centre: out pixel j samples mask pixel floor((j + 1/2) hm / h)."""
    rows, cols = (nearest_index(n, m, n, m) for n, m in zip(shape, mask.shape))
    return mask[rows[:, None], cols[None, :]]


def check_given_shape(mask_hw: tuple[int, int], image_hw: tuple[int, int], image_id: str) -> None:
    """A user's mask must cover the image at one scale: its sides in the image's ratio, to within one mask pixel."""
    (hm, wm), (h, w) = mask_hw, image_hw
    if min(hm, wm) < 1:
        raise MaskError(f"The mask of {image_id!r} is empty (shape {mask_hw}): write a (height, width) image.")
    if abs(wm - hm * w / h) > 1.0 and abs(hm - wm * h / w) > 1.0:
        raise MaskError(
            f"The mask of {image_id!r} is {hm}x{wm} px, not the shape of the image ({h}x{w} px) at any scale: "
            f"write it at the image's size or a downsample of it "
            f"(e.g. {max(1, round(h / 32))}x{max(1, round(w / 32))}).")
    if hm > h or wm > w:
        raise MaskError(
            f"The mask of {image_id!r} ({hm}x{wm} px) is larger than the image ({h}x{w} px): write it at the "
            "image's size or smaller.")


def load_mask_file(path: str | Path) -> np.ndarray:
    """A mask image (PNG or TIFF; 1-band, or several equal bands) -> (h, w) bool, non-zero = foreground."""
    import tifffile
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        array = np.asarray(tifffile.imread(path))
    else:
        with Image.open(path) as im:
            array = np.asarray(im)
    if array.ndim == 3:
        if not (array == array[..., :1]).all():
            raise MaskError(
                f"Mask {str(path)!r} has {array.shape[-1]} different bands: save it as a one-band image "
                "(0 = background, non-zero = foreground).")
        array = array[..., 0]
    if array.ndim != 2:
        raise MaskError(f"Mask {str(path)!r} has shape {array.shape}: save it as a one-band (height, width) image.")
    return array != 0


def find_mask_file(mask_dir: str | Path, image_id: str, stem: str) -> Path:
    """`<mask_dir>/<image_id or source stem>.{png,tif,tiff}`; a MaskError naming the expected names when absent."""
    folder = Path(mask_dir)
    for name in dict.fromkeys((image_id, stem)):
        for suffix in MASK_SUFFIXES:
            candidate = folder / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    raise MaskError(
        f"No mask for {image_id!r} in {str(folder)!r}: expected {stem}.png (or .tif/.tiff, or named by the image "
        "id), non-zero on foreground.")


def compute_mask(rule: MaskRule, level: np.ndarray, image_id: str) -> np.ndarray:
    """(C, h, w) pixels of the mask level -> (h, w) bool foreground by `rule`; MaskError when there is none."""
    _, h, w = level.shape
    if rule.method == "tissue":
        mask = tissue_mask(level)
    elif rule.method == "nodata":
        mask = nodata_mask(level, rule.nodata)  # type: ignore[arg-type]
    elif rule.method == "alpha":
        if level.shape[0] < 2:
            raise MaskError(f"The 'alpha' mask needs an alpha band; {image_id!r} has one band: use --mask nodata.")
        mask = level[-1] > 0
    else:
        mask = resample_nearest(rule.given, (h, w))  # type: ignore[arg-type]
    if not mask.any():
        raise MaskError(
            f"The {rule.method!r} mask of {image_id!r} has no foreground: there is nothing to sample on it. Leave "
            "the image out, check --nodata, or give its mask with --mask-dir.")
    return mask


def label_attrs(image_id: str, scale: list[float], translation: list[float], unit: dict[str, str]) -> dict[str, Any]:
    """OME-NGFF 0.5 attributes of the label image `labels/tissue`: one level at the given scale and translation."""
    return {
        "version": "0.5",
        "multiscales": [{
            "name": f"{image_id}/{MASK_LABEL}",
            "axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", **unit},
                     {"name": "x", "type": "space", **unit}],
            "datasets": [{"path": "0", "coordinateTransformations": [
                {"type": "scale", "scale": scale}, {"type": "translation", "translation": translation}]}],
        }],
        "image-label": {
            "version": "0.5",
            "colors": [{"label-value": 0, "rgba": [0, 0, 0, 0]}, {"label-value": 1, "rgba": [0, 200, 80, 110]}],
            "properties": [{"label-value": 0, "class": "background"}, {"label-value": 1, "class": "foreground"}],
            "source": {"image": "../../"},
        },
    }
