"""Prediction exports, written atomically: GeoJSON for QuPath, the attention as an OME-Zarr, the predictions table.

    grid = AttentionGrid.from_view(attention, factor_yx=(8.0, 8.0), stride_yx=(1, 1), offset_yx=(0.5, 0.5))
    write_geojson(path, grid, boxes, box_attention, masses=(0.5, 0.9))    top-K boxes + attention-mass contours
    write_attention_zarr(path, grid, mpp=0.25, name="slide")               float32 OME-NGFF 0.5 over the image
    write_predictions(path, records, classes, mode=..., model=...)          predictions.parquet
    check_output_folder(out, force)                                         a new or empty local folder, not made yet

Numpy arrays and numbers in, files out (no torch: the model side hands over plain arrays). Every file is written
under a hidden temporary name beside its destination and renamed into place when complete, so an output folder never
holds a half-written file under its final name.

Coordinates. GeoJSON is in LEVEL-0 PIXEL coordinates, x right and y down, pixel j covering [j, j + 1) (what QuPath
imports): a box (y0, x0, h, w) is the rectangle [x0, x0 + w] x [y0, y0 + h]. An attention grid cell i is centred at
`origin + i * step` level-0 pixels per axis and spans half a step either side (for an attention net with GridSpec
(stride, offset) on a view of exact factor f: origin = offset f, step = stride f). Rings are closed and exteriors
counter-clockwise (positive shoelace area in (x, y)), holes clockwise. The OME-Zarr puts cell i at physical
coordinate `scale i + translation` with scale = step and translation = origin - 1/2 (times mpp when known): the same
convention as the image pyramid, whose level-0 pixel k sits at k, so a stride-1 cell of f x f pixels gets
translation (f - 1) / 2.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.errors import PipelineError
from pipeline.storage import replace_folder

OME_VERSION = "0.5"
DEFAULT_MASSES = (0.5, 0.9)  # the attention-mass levels drawn as contours
TOP_K_CLASS = {"name": "Attention top-K", "color": [0, 200, 255]}
CONTOUR_COLOURS = ([255, 64, 0], [255, 200, 0], [160, 255, 0], [0, 255, 120])


class OutputFolderError(PipelineError, ValueError):
    """An output folder exists and is not an empty folder (without force), or cannot be created."""


@dataclass(frozen=True, slots=True)
class AttentionGrid:
    """An attention map (Ha, Wa) and where its cells sit: cell i centred at origin + i * step level-0 px per axis."""

    values: np.ndarray
    origin_yx: tuple[float, float]
    step_yx: tuple[float, float]

    def __post_init__(self) -> None:
        values = np.asarray(self.values, dtype=np.float64)
        if values.ndim != 2 or values.size == 0 or not np.all(np.isfinite(values)) or values.min() < 0:
            raise ValueError(f"Expected attention (Ha, Wa) of finite non-negative numbers. Got shape {values.shape}.")
        if min(self.step_yx) <= 0:
            raise ValueError(f"Expected positive grid steps in level-0 pixels. Got {self.step_yx}.")
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "origin_yx", tuple(float(v) for v in self.origin_yx))
        object.__setattr__(self, "step_yx", tuple(float(v) for v in self.step_yx))

    @classmethod
    def from_view(cls, values: np.ndarray, factor_yx: Sequence[float], stride_yx: Sequence[float] = (1.0, 1.0),
                  offset_yx: Sequence[float] = (0.5, 0.5)) -> AttentionGrid:
        """A grid on a low-res view of exact factor f (level-0 px per view px) whose cells follow a GridSpec (cell
        i centred at offset + i * stride view pixels), as ats_model.geometry maps them."""
        return cls(values, tuple(o * f for o, f in zip(offset_yx, factor_yx)),  # type: ignore[arg-type]
                   tuple(s * f for s, f in zip(stride_yx, factor_yx)))  # type: ignore[arg-type]

    def extent_xy(self) -> tuple[float, float, float, float]:
        """(left, right, bottom, top) of the cells' edges in level-0 px, as matplotlib's imshow extent (y down)."""
        (oy, ox), (sy, sx), (h, w) = self.origin_yx, self.step_yx, self.values.shape
        return ox - sx / 2, ox + (w - 0.5) * sx, oy + (h - 0.5) * sy, oy - sy / 2


# --- the output folder and atomic writes ------------------------------------------------------------------------------

def check_output_folder(out: str | os.PathLike[str], force: bool = False) -> Path:
    """`out` as an absolute path, checked but not created: a folder that can be made, or an empty one (any folder
    with `force`); OutputFolderError naming the fix otherwise."""
    if "://" in str(out):
        raise OutputFolderError("--out must be a local folder. Got a URI: pass a path.")
    path = Path(out).expanduser().absolute()
    if path.exists():
        if not path.is_dir():
            raise OutputFolderError(f"--out {str(path)!r} exists and is not a folder: choose a new folder.")
        if any(path.iterdir()) and not force:
            raise OutputFolderError(f"--out {str(path)!r} is not empty: choose a new or empty folder, or pass "
                                    "--force to write over the outputs there.")
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputFolderError(f"--out {str(path)!r} is not writable: choose a folder you can write to.")
        return path
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputFolderError(f"Cannot create --out {str(path)!r}: {str(parent)!r} is not a writable folder. "
                                "Choose a path under a folder you can write to.")
    return path


def _tmp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")


def write_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write a file under a hidden temporary name beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --- GeoJSON ---------------------------------------------------------------------------------------------------------

def _ring_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))  # shoelace; > 0 counter-clockwise in (x, y)


def _clean_ring(ring: np.ndarray, exterior: bool) -> list[list[float]]:
    """A closed ring without collinear points, oriented (exterior counter-clockwise, hole clockwise)."""
    pts = ring[:-1] if np.array_equal(ring[0], ring[-1]) else ring  # (n, 2) open
    prev, nxt = np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0)
    cross = (pts[:, 0] - prev[:, 0]) * (nxt[:, 1] - pts[:, 1]) - (pts[:, 1] - prev[:, 1]) * (nxt[:, 0] - pts[:, 0])
    pts = pts[np.abs(cross) > 1e-9]
    closed = np.concatenate([pts, pts[:1]])  # (n + 1, 2)
    if (_ring_area(closed) > 0) != exterior:
        closed = closed[::-1]
    return [[round(float(x), 4), round(float(y), 4)] for x, y in closed]


def mass_region(values: np.ndarray, mass: float) -> tuple[float, np.ndarray, float]:
    """The smallest set of cells holding at least `mass` of the attention: (threshold, mask (Ha, Wa), mass inside).
    The region is every cell with attention >= threshold (ties at the threshold included)."""
    if not 0 < mass < 1:
        raise ValueError(f"Expected an attention mass in (0, 1). Got {mass}: e.g. 0.5 or 0.9.")
    total = float(values.sum())
    if total <= 0:
        raise ValueError("The attention map sums to 0: there is no attention mass to contour.")
    ordered = np.sort(values.ravel())[::-1]
    index = min(int(np.searchsorted(np.cumsum(ordered), mass * total * (1 - 1e-12))), ordered.size - 1)
    threshold = float(ordered[index])
    mask = values >= threshold
    return threshold, mask, float(values[mask].sum() / total)


def region_polygons(grid: AttentionGrid, mask: np.ndarray, upsample: int = 2) -> list[list[list[list[float]]]]:
    """Polygons (GeoJSON MultiPolygon coordinates, level-0 px) around the cells of `mask` (Ha, Wa).

    The mask is upsampled `upsample` x per axis and contoured at 1/2 with contourpy: edges run along the cells' edges
    and convex corners are cut by a quarter cell (upsample 2), so every cell centre in the mask lies inside and every
    other cell centre outside."""
    import contourpy

    z = np.pad(np.kron(mask.astype(np.float64), np.ones((upsample, upsample))), 1)  # zeros around: closed rings
    (oy, ox), (sy, sx) = grid.origin_yx, grid.step_yx
    ys = oy - sy / 2 + (np.arange(z.shape[0]) - 0.5) * sy / upsample  # sub-cell centres, level-0 px
    xs = ox - sx / 2 + (np.arange(z.shape[1]) - 0.5) * sx / upsample
    generator = contourpy.contour_generator(xs, ys, z, fill_type=contourpy.FillType.OuterOffset)
    points, offsets = generator.filled(0.5, 2.0)
    polygons = []
    for pts, off in zip(points, offsets):  # one outer ring and its holes each
        rings = [pts[off[i]:off[i + 1]] for i in range(len(off) - 1)]
        polygons.append([_clean_ring(r, exterior=i == 0) for i, r in enumerate(rings)])
    return polygons


def _box_feature(box: Sequence[int], rank: int, attention: float) -> dict[str, Any]:
    y0, x0, h, w = (int(v) for v in box)
    ring = [[x0, y0], [x0 + w, y0], [x0 + w, y0 + h], [x0, y0 + h], [x0, y0]]  # counter-clockwise in (x, y)
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": "annotation", "name": f"top {rank}", "classification": dict(TOP_K_CLASS),
                           "kind": "top_k_box", "rank": rank, "attention": float(attention),
                           "box_yxhw": [y0, x0, h, w],
                           "measurements": {"rank": rank, "attention": float(attention)}}}


def geojson_features(grid: AttentionGrid, boxes: np.ndarray, box_attention: np.ndarray,
                     masses: Sequence[float] = DEFAULT_MASSES) -> dict[str, Any]:
    """A FeatureCollection: the top-K boxes (n, 4) = (y0, x0, h, w) level-0 px, rank 1 first, as rectangles with
    their attention; then one MultiPolygon per attention mass, around the smallest region holding it."""
    boxes = np.asarray(boxes).reshape(-1, 4)
    box_attention = np.asarray(box_attention, dtype=np.float64).reshape(-1)
    if len(boxes) != len(box_attention):
        raise ValueError(f"Got {len(boxes)} boxes but {len(box_attention)} attention values; pass one per box.")
    features = [_box_feature(b, rank, a) for rank, (b, a) in enumerate(zip(boxes, box_attention), start=1)]
    for i, mass in enumerate(masses):
        threshold, mask, inside = mass_region(grid.values, mass)
        label = f"Attention {round(100 * mass)}%"
        features.append({
            "type": "Feature",
            "geometry": {"type": "MultiPolygon", "coordinates": region_polygons(grid, mask)},
            "properties": {"objectType": "annotation", "name": label,
                           "classification": {"name": label, "color": CONTOUR_COLOURS[i % len(CONTOUR_COLOURS)]},
                           "kind": "attention_contour", "mass": float(mass), "threshold": threshold,
                           "mass_inside": inside, "cells": int(mask.sum()),
                           "measurements": {"threshold": threshold, "mass_inside": inside}}})
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | os.PathLike[str], grid: AttentionGrid, boxes: np.ndarray, box_attention: np.ndarray,
                  masses: Sequence[float] = DEFAULT_MASSES) -> Path:
    """`geojson_features` written atomically to `path` (level-0 pixel coordinates; QuPath: File > Import objects)."""
    collection = geojson_features(grid, boxes, box_attention, masses)
    return write_atomic(path, json.dumps(collection, separators=(",", ":")).encode())


# --- OME-Zarr --------------------------------------------------------------------------------------------------------

def attention_ome_attrs(grid: AttentionGrid, name: str, mpp: float | None = None) -> dict[str, Any]:
    """OME-NGFF 0.5 multiscales for the attention (axes y, x): scale = step, translation = origin - 1/2, x mpp."""
    base = 1.0 if mpp is None else float(mpp)
    unit = {"unit": "micrometer"} if mpp is not None else {}
    scale = [s * base for s in grid.step_yx]
    translation = [(o - 0.5) * base for o in grid.origin_yx]
    return {"version": OME_VERSION, "multiscales": [{
        "name": name,
        "axes": [{"name": "y", "type": "space", **unit}, {"name": "x", "type": "space", **unit}],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": scale}, {"type": "translation", "translation": translation}]}],
        "metadata": {"description": "attention probabilities over the image (sum 1), one value per attention cell"},
    }]}


def write_attention_zarr(path: str | os.PathLike[str], grid: AttentionGrid, *, name: str, mpp: float | None = None,
                         extra_attrs: Mapping[str, Any] | None = None) -> Path:
    """The attention as a float32 OME-NGFF 0.5 image (Zarr v3, one level "0", axes y, x) placed exactly over the image
    (see the module docstring); built under a temporary name, renamed into place when complete."""
    import zarr

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(path)
    try:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        values = grid.values.astype(np.float32)
        array = group.create_array("0", shape=values.shape, dtype=np.float32,
                                   chunks=tuple(min(s, 1024) for s in values.shape), dimension_names=("y", "x"))
        array[...] = values
        group.update_attributes({"ome": attention_ome_attrs(grid, name, mpp), "gats": {
            "kind": "attention", "origin_yx_level0": list(grid.origin_yx), "step_yx_level0": list(grid.step_yx),
            **dict(extra_attrs or {})}})
        replace_folder(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


# --- tables ----------------------------------------------------------------------------------------------------------

def write_table(path: str | os.PathLike[str], columns: Mapping[str, Sequence[Any]],
                metadata: Mapping[str, str] | None = None, types: Mapping[str, Any] | None = None) -> Path:
    """A Parquet file of `columns` (name -> values; `types` name -> pyarrow type where inference is not enough, e.g.
    an all-null column), with key-value `metadata`, written atomically."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {k: pa.array(list(v), type=(types or {}).get(k)) for k, v in columns.items()}
    table = pa.table(arrays).replace_schema_metadata(dict(metadata or {}))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return write_atomic(path, buf.getvalue())


def write_predictions(path: str | os.PathLike[str], records: Sequence[Mapping[str, Any]], classes: Sequence[str], *,
                      mode: str, model: str) -> Path:
    """predictions.parquet, one row per record {image_id, source, predicted, probabilities (class order), label}:
    columns image_id, source, predicted, prob_<class> per class (float64), label (null when unknown), mode, model;
    the class order in the key-value metadata `classes` (a JSON list, as the manifest keeps it)."""
    import pyarrow as pa

    columns: dict[str, list[Any]] = {k: [r[k] for r in records] for k in ("image_id", "source", "predicted")}
    for i, name in enumerate(classes):
        columns[f"prob_{name}"] = [float(r["probabilities"][i]) for r in records]
    columns |= {"label": [r["label"] for r in records], "mode": [mode] * len(records), "model": [model] * len(records)}
    types = {name: pa.float64() if name.startswith("prob_") else pa.string() for name in columns}
    return write_table(path, columns, {"classes": json.dumps(list(classes)), "mode": mode, "model": model}, types)
