"""Write and open OME-NGFF 0.5 (Zarr v3) multiscale pyramids, marked complete last.

`write_pyramid` streams a lazy dask array (C, H, W) into ROOT/images/<image_id>.zarr: level "0" is the source
rechunked to the zarr write grid (dask chunks == zarr chunks, or shards, enforced), and each level l >= 1 is built
from the stored level l-1 by a factor x factor mean over the pixels present (odd edges average what exists; integers
round half up), so level l has shape ceil(prev / factor). Nothing is ever materialised whole: each dask block is one
zarr chunk (or shard) of output.

Geometry (DESIGN "Storage layout"): level-l pixel j covers level-0 pixels [j d^l, (j+1) d^l) for downsample d, so the
factor between level 0 and level l is exactly d^l on every axis, whatever the image size (1500 -> 188 is a factor 8,
not 1500/188 = 7.98). Each level's OME-NGFF dataset stores `scale = [1, base d^l, base d^l]` (base = mpp, or 1 without
one) then `translation = [0, (d^l - 1)/2 base, (d^l - 1)/2 base]`, so pixel centres line up across levels. Readers
take the factor from the stored scale (`open_pyramid`), never assume d = 2.

Crash safety (DESIGN "Storage layout"): the root group attribute `"gats": {"complete": true, ...}` is written after
every array. On a local folder the pyramid is built under `images/.<image_id>.zarr.tmp-<hex>` and renamed into
place after the marker; on S3 it is written in place (an old copy is deleted first) and the marker alone decides.

Integrity (docs/reliability.md): every chunk is stored with zarr v3's `crc32c` codec after Blosc/zstd, so any
damaged byte fails the read instead of decoding into wrong pixels, and every chunk is written, empty or not
(`write_empty_chunks`; `gats.all_chunks` says so), so an absent chunk key is damage, not "all fill": `open_pyramid`
opens such pyramids strict (pipeline.storage.CountingStore), and the reader names image, level and chunk in a
CorruptChunkError.

Band statistics: `gats.band_stats = {"level": l, "mean": [...], "std": [...]}`, the per-band mean and standard
deviation of the finest level of at most STATS_MAX_PX pixels (the coarsest when none is that small), in the nets'
pixel convention (integers over their dtype's maximum, floats as stored), computed after the levels are written
(`band_statistics`). Models can scale their input by them (ats_model.nets.BandScaled). The mean is about level 0's;
the std is below level 0's, since the mean pool smooths texture (3-10% below at 1/8 on the slides of
benchmarks/nested_learning.py; more at coarser levels): a feature net reading level-0 patches sees inputs of std
somewhat above 1.

Checksum: `"blake2b-128:<hex>"`, the 128-bit BLAKE2b of a header (shape, dtype, write block size) followed by the
BLAKE2b-128 digests of the level-0 write blocks (C-order bytes) in row-major block order. It is computed while level
0 is written (no second pass) and is deterministic for the same pixels and the same `chunk`/`shards`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from pipeline.errors import ImageNotFoundError, IncompleteImageError, MaskError, UnsupportedImageError, WriteCancelled
from pipeline.masks import (MASK_LABEL, MaskRule, check_given_shape, check_nodata, compute_mask, label_attrs,
                            unit_float)
from pipeline.storage import IMAGES_DIR, IOStats, Storage, image_key

STATS_MAX_PX = 1 << 20  # band statistics come from the finest level with at most this many pixels
GATS_FORMAT = 3  # 3: + crc32c on every chunk, every chunk written; 2: exact level geometry; 1: H0/H_l scales
EXACT_GEOMETRY_FORMAT = 2  # the first format whose stored scales are the exact factors d^l
OME_VERSION = "0.5"
_SAFE_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")


@dataclass(frozen=True, slots=True)
class PyramidInfo:
    """What was written (or is stored) for one image; downsamples are the exact factors (d^l, d^l) per level (as
    floats), taken from the stored scales when opened."""

    image_id: str
    uri: str
    height: int
    width: int
    channels: int
    dtype: str
    levels: int
    downsamples: tuple[tuple[float, float], ...]
    mpp: float | None
    checksum: str
    shapes: tuple[tuple[int, int], ...] = ()  # (H_l, W_l) per level
    fill_value: int | float = 0
    chunk: int = 256
    band_mean: tuple[float, ...] = ()  # per band, in the nets' [0, 1] convention ((): written before band statistics)
    band_std: tuple[float, ...] = ()
    tissue_fraction: float | None = None  # foreground share of the mask level (None: no mask stored)
    mask_factor: tuple[float, float] | None = None  # level-0 pixels per mask pixel (fy, fx)
    crs: str = ""  # a georeferenced raster's CRS ("EPSG:<code>"; "" none or the file's own definition)
    geotransform: tuple[float, ...] = ()  # GDAL order (x0, dx, rx, y0, ry, dy); (): not georeferenced
    objects: tuple[tuple[int, int, int, int, int], ...] = ()  # known objects, level-0 (y0, x0, h, w, class index):
    #                                                           a generated image's digits (gats.extra); () none


@dataclass(frozen=True, slots=True)
class Pyramid:
    """An opened complete pyramid: metadata plus one zarr array (C, H_l, W_l) per level, and its foreground mask
    (1, h, w) uint8 (`labels/tissue`, pipeline.masks) when one was stored."""

    info: PyramidInfo
    arrays: tuple[zarr.Array, ...] = field(repr=False)
    mask: zarr.Array | None = field(default=None, repr=False)


def parse_image_id(image_id: str) -> str:
    if not isinstance(image_id, str) or not _SAFE_ID.match(image_id):
        raise ValueError(
            f"Expected an image id of [A-Za-z0-9._-] not starting with '.'. Got {image_id!r}: "
            "make one with pipeline.manifest.safe_image_id."
        )
    return image_id


def level_shapes(
    height: int, width: int, *, downsample: int = 2, min_size: int = 256, max_levels: int | None = None
) -> list[tuple[int, int]]:
    """(H_l, W_l) per level: ceil(prev / downsample) until both sides <= min_size or max_levels levels exist."""
    shapes = [(int(height), int(width))]
    while True:
        h, w = shapes[-1]
        if max_levels is not None and len(shapes) >= max_levels:
            break
        if h <= min_size and w <= min_size:
            break
        nxt = (-(-h // downsample), -(-w // downsample))
        if nxt == (h, w):
            break
        shapes.append(nxt)
    return shapes


def downsample_block(block: np.ndarray, factor: int) -> np.ndarray:
    """Mean over factor x factor cells of the pixels present; integers round half up, dtype kept."""
    c, h, w = block.shape
    ho, wo = -(-h // factor), -(-w // factor)
    kind = block.dtype.kind
    acc = np.uint64 if kind == "u" else (np.int64 if kind == "i" else np.float64)
    padded = np.zeros((c, ho * factor, wo * factor), dtype=acc)
    padded[:, :h, :w] = block
    sums = padded.reshape(c, ho, factor, wo, factor).sum(axis=(2, 4), dtype=acc)  # (C, ho, wo)
    cy = np.full(ho, factor, dtype=acc)
    cy[-1] = h - (ho - 1) * factor
    cx = np.full(wo, factor, dtype=acc)
    cx[-1] = w - (wo - 1) * factor
    counts = cy[:, None] * cx[None, :]  # (ho, wo) pixels present per cell
    if kind in "ui":
        out = (2 * sums + counts) // (2 * counts)  # floor(mean + 1/2), exact in integers
    else:
        out = sums / counts
    return out.astype(block.dtype, copy=False)


def block_digest(block: np.ndarray) -> bytes:
    """BLAKE2b-128 of one level-0 write block's C-order bytes (a term of the checksum, module docstring)."""
    return hashlib.blake2b(np.ascontiguousarray(block).tobytes(), digest_size=16).digest()


def level0_checksum(shape: tuple[int, int, int], dtype: str, block: int, digests: list[bytes | None]) -> str:
    """The pyramid checksum (module docstring) from level 0's (C, H, W), dtype name, write block size and the
    block digests in row-major block order; what ingest records and gats-verify recomputes."""
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(json.dumps([*shape, dtype, block]).encode())
    for d in digests:
        hasher.update(d or b"")
    return f"blake2b-128:{hasher.hexdigest()}"


class _BlockWriter:
    """Writes one dask block into its zarr region; returns the block's digest (level 0) or None. Raises
    WriteCancelled before a block when `cancel` is set."""

    def __init__(self, array: zarr.Array, block_size: int, digest: bool, cancel: threading.Event | None) -> None:
        self.array = array
        self.block_size = block_size
        self.digest = digest
        self.cancel = cancel

    def __call__(self, block: np.ndarray, i: int, j: int) -> bytes | None:
        if self.cancel is not None and self.cancel.is_set():
            raise WriteCancelled("the write was cancelled (a stop was requested); the pyramid is left unmarked")
        y0, x0 = i * self.block_size, j * self.block_size
        self.array[:, y0:y0 + block.shape[1], x0:x0 + block.shape[2]] = block
        if not self.digest:
            return None
        return block_digest(block)


def _store_blocks(image: da.Array, array: zarr.Array, block_size: int, digest: bool,
                  cancel: threading.Event | None = None) -> list[bytes | None]:
    """Write every block of `image` (chunks must equal the write grid) into `array`; digests in row-major order."""
    for axis in (1, 2):
        sizes = image.chunks[axis]
        if any(s != block_size for s in sizes[:-1]) or sizes[-1] > block_size:
            raise AssertionError(f"dask chunks {image.chunks} are not aligned to the zarr write grid {block_size}")
    writer = _BlockWriter(array, block_size, digest, cancel)
    blocks = image.to_delayed()  # (1, nby, nbx) of Delayed
    tasks = [
        dask.delayed(writer, pure=False)(blocks[0, i, j], i, j)
        for i in range(blocks.shape[1])
        for j in range(blocks.shape[2])
    ]
    return list(dask.compute(*tasks))


def _ome_attrs(image_id: str, n_levels: int, downsample: int, mpp: float | None) -> dict[str, Any]:
    """OME-NGFF 0.5 multiscales: level l has scale base * d^l and translation (d^l - 1) / 2 * base on y and x."""
    unit = {"unit": "micrometer"} if mpp is not None else {}
    base = float(mpp) if mpp is not None else 1.0
    datasets = []
    for level in range(n_levels):
        factor = float(downsample**level)  # exact: level-l pixel j covers level-0 pixels [j d^l, (j+1) d^l)
        shift = (factor - 1.0) / 2.0 * base  # centre of that level-0 span, in level-0 physical units
        datasets.append({
            "path": str(level),
            "coordinateTransformations": [
                {"type": "scale", "scale": [1.0, base * factor, base * factor]},
                {"type": "translation", "translation": [0.0, shift, shift]},
            ],
        })
    return {
        "version": OME_VERSION,
        "multiscales": [
            {
                "name": image_id,
                "axes": [
                    {"name": "c", "type": "channel"},
                    {"name": "y", "type": "space", **unit},
                    {"name": "x", "type": "space", **unit},
                ],
                "datasets": datasets,
                "type": "mean",
                "metadata": {"description": "mean over the pixels present, integers rounded half up"},
            }
        ],
    }


def lattice(level: np.ndarray | zarr.Array) -> tuple[np.ndarray, int]:
    """The pixels (C, h', w') of a level (C, h, w) that statistics and masks are computed on, and the lattice step:
    the whole level when it has at most STATS_MAX_PX pixels (step 1), else every step-th row and column, about
    STATS_MAX_PX of them (a pyramid cut short by max_levels or min_size), never the whole level."""
    _, h, w = (int(v) for v in level.shape)
    step = max(1, math.ceil(math.sqrt(h * w / STATS_MAX_PX)))
    if step == 1:
        return np.asarray(level[...]), step
    if isinstance(level, np.ndarray):
        return level[:, ::step, ::step], step
    # only the chunks the lattice's rows and columns cross are read
    return np.asarray(level.get_orthogonal_selection((slice(None), np.arange(0, h, step), np.arange(0, w, step)))), step


def band_statistics(level: np.ndarray | zarr.Array) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-band mean and standard deviation (C,) of a level (C, h, w) in the nets' pixel convention: integers over
    their dtype's maximum (ats_model.contracts.to_unit_float), floats as stored; accumulated in float64 over the
    finite pixels (a band without one gets mean 0 and std 0), on the level's `lattice`."""
    return _moments(lattice(level)[0])


def _moments(pixels: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """band_statistics of pixels (C, h, w) already read."""
    x = unit_float(pixels).reshape(pixels.shape[0], -1)  # (C, n)
    finite = np.isfinite(x)  # (C, n)
    n = finite.sum(1)  # (C,)
    x = np.where(finite, x, 0.0)
    mean = x.sum(1) / np.maximum(n, 1)
    var = np.where(finite, (x - mean[:, None]) ** 2, 0.0).sum(1) / np.maximum(n, 1)
    return tuple(float(v) for v in mean), tuple(float(v) for v in np.sqrt(var))


def stats_level(shapes: list[tuple[int, int]] | tuple[tuple[int, int], ...]) -> int:
    """The level band statistics are computed on: the finest with at most STATS_MAX_PX pixels, else the coarsest."""
    return next((lv for lv, (h, w) in enumerate(shapes) if h * w <= STATS_MAX_PX), len(shapes) - 1)


def info_with_band_stats(p: Pyramid) -> PyramidInfo:
    """`p.info`, with band statistics computed from its stats level when the pyramid was written before they were
    recorded (nothing is written back: the manifest row carries them)."""
    if p.info.band_mean:
        return p.info
    mean, std = band_statistics(p.arrays[stats_level(p.info.shapes)])
    return dataclasses.replace(p.info, band_mean=mean, band_std=std)


def _check_fill(fill_value: int | float, dtype: np.dtype) -> int | float:
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        if not float(fill_value).is_integer() or not info.min <= fill_value <= info.max:
            raise ValueError(
                f"Expected fill_value an integer in [{info.min}, {info.max}] for {dtype}. Got {fill_value}.")
        return int(fill_value)
    return float(fill_value)


def write_pyramid(
    root: str,
    image_id: str,
    image: da.Array,
    *,
    chunk: int = 256,
    downsample: int = 2,
    min_size: int = 256,
    max_levels: int | None = None,
    fill_value: int | float = 0,
    mpp: float | None = None,
    extra_attrs: dict[str, Any] | None = None,
    shards: int | None = None,
    cancel: threading.Event | None = None,
    mask: MaskRule | None = None,
) -> PyramidInfo:
    """Write `image` (C, H, W) as ROOT/images/<image_id>.zarr and mark it complete last; returns what was written.

    `shards`, when given, is the shard side in pixels (a multiple of `chunk`); dask blocks then follow shards.
    `mask`, when given, makes the foreground mask and stores it as the label image `labels/tissue` (pipeline.masks);
    a MaskError (no foreground, bad bands) leaves nothing behind.
    Overwrites any previous copy (callers skip complete images with `is_complete` first). When `cancel` is set
    the write stops before its next block with WriteCancelled, leaving no complete marker (SIGTERM, Ctrl-C).
    """
    parse_image_id(image_id)
    if not isinstance(image, da.Array):
        image = da.asarray(image)
    if image.ndim != 3:
        raise UnsupportedImageError(
            f"Expected an image of shape (C, H, W). Got shape {image.shape}: add a channel axis.")
    dtype = np.dtype(image.dtype)
    if dtype.kind not in "uif":
        raise UnsupportedImageError(
            f"Expected an integer or float image. Got dtype {dtype}: convert it to uint8/uint16/float32.")
    if chunk < 1 or downsample < 2 or min_size < 1 or (max_levels is not None and max_levels < 1):
        raise ValueError(
            f"Expected chunk >= 1, downsample >= 2, min_size >= 1, max_levels >= 1. "
            f"Got chunk={chunk}, downsample={downsample}, min_size={min_size}, max_levels={max_levels}."
        )
    if shards is not None and (shards < chunk or shards % chunk):
        raise ValueError(f"Expected shards a multiple of chunk={chunk}. Got {shards}.")
    _check_mpp(mpp)
    fill = _check_fill(fill_value, dtype)
    c, h, w = (int(s) for s in image.shape)
    if min(c, h, w) < 1:
        raise UnsupportedImageError(f"Expected a non-empty image. Got shape {image.shape}.")
    shapes = level_shapes(h, w, downsample=downsample, min_size=min_size, max_levels=max_levels)
    block = shards or chunk
    if mask is not None and mask.given is not None:
        check_given_shape(mask.given.shape, (h, w), image_id)  # before anything is written
    if mask is not None and mask.method == "nodata":
        check_nodata(mask.nodata, dtype)  # type: ignore[arg-type]

    storage = Storage(root)
    final_key = image_key(image_id)
    if storage.is_s3:
        storage.delete(final_key)  # removes an old marker first: a partial rewrite never looks complete
        write_key = final_key
    else:
        for name in storage.listdir(IMAGES_DIR):
            if name.startswith(f".{image_id}.zarr.tmp-"):
                storage.delete(f"{IMAGES_DIR}/{name}")  # leftovers of an interrupted run
        write_key = f"{IMAGES_DIR}/.{image_id}.zarr.tmp-{uuid.uuid4().hex[:12]}"

    group = zarr.open_group(storage.zarr_store(write_key), mode="w", zarr_format=3)
    codecs = (BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"), Crc32cCodec())  # checksum of the stored bytes
    level_src = image.rechunk((c, block, block))  # (C, H, W), dask chunks == zarr write grid
    digests: list[bytes | None] = []
    for level, (lh, lw) in enumerate(shapes):
        array = group.create_array(
            str(level),
            shape=(c, lh, lw),
            dtype=dtype,
            chunks=(c, chunk, chunk),
            shards=(c, shards, shards) if shards else None,
            compressors=codecs,
            fill_value=fill,
            dimension_names=("c", "y", "x"),
            config={"write_empty_chunks": True},  # every chunk exists, so a missing one is detectable damage
        )
        if level > 0:
            prev = group[str(level - 1)]
            src = da.from_array(prev, chunks=(c, block * downsample, block * downsample),
                                name=f"gats-{uuid.uuid4().hex}", asarray=True)
            out_chunks = (src.chunks[0],) + tuple(
                tuple(-(-s // downsample) for s in src.chunks[ax]) for ax in (1, 2))
            level_src = src.map_blocks(downsample_block, downsample, chunks=out_chunks, dtype=dtype)  # (C, lh, lw)
        result = _store_blocks(level_src, array, block, digest=level == 0, cancel=cancel)
        if level == 0:
            digests = result

    checksum = level0_checksum((c, h, w), dtype.name, block, digests)
    at = stats_level(shapes)
    pixels, step = lattice(group[str(at)])  # read once, for the statistics and the mask
    band_mean, band_std = _moments(pixels)
    mask_meta: dict[str, Any] | None = None
    if mask is not None:
        try:
            mask_meta = _write_mask(group, mask, pixels, at, step, downsample, mpp, image_id)
        except MaskError:
            storage.delete(write_key)  # nothing half-written: no pyramid without the mask that was asked for
            raise
    gats: dict[str, Any] = {
        "complete": True,
        "format": GATS_FORMAT,
        "all_chunks": True,
        "fill_value": fill,
        "checksum": checksum,
        "chunk": chunk,
        "shards": shards,
        "downsample": downsample,
        "mpp": mpp,
        "band_stats": {"level": at, "mean": list(band_mean), "std": list(band_std)},
        "extra": dict(extra_attrs or {}),
    }
    if mask_meta is not None:
        gats["mask"] = mask_meta
    ome = _ome_attrs(image_id, len(shapes), downsample, mpp)
    group.update_attributes({"ome": ome, "gats": gats})  # LAST: the complete marker

    if not storage.is_s3:
        storage.replace_local(write_key, final_key)  # an older copy is moved aside first, deleted after

    return PyramidInfo(
        image_id=image_id, uri=storage.uri(final_key), height=h, width=w, channels=c, dtype=dtype.name,
        levels=len(shapes), downsamples=tuple((float(downsample**lv),) * 2 for lv in range(len(shapes))), mpp=mpp,
        checksum=checksum, shapes=tuple(shapes), fill_value=fill, chunk=chunk, band_mean=band_mean, band_std=band_std,
        tissue_fraction=mask_meta["fraction"] if mask_meta else None,
        mask_factor=tuple(mask_meta["factor"]) if mask_meta else None,  # type: ignore[arg-type]
        **_geo_fields(gats["extra"]),
    )


def set_resolution(root: str, image_id: str, mpp: float, source: str) -> None:
    """Record a new level-0 resolution on a complete pyramid without touching its pixels: `gats.mpp`,
    `gats.extra.mpp_source`, and the micrometre scales and translations of the image's and its mask label's OME-NGFF
    metadata. The label's metadata is written first and the root's last, in one write that keeps the complete
    marker, so an interruption leaves at worst the old resolution recorded (a rerun writes it again)."""
    _check_mpp(float(mpp))  # a number here: the resolution being recorded
    group = zarr.open_group(Storage(root).zarr_store(image_key(image_id)), mode="r+")
    gats = dict(group.attrs["gats"])
    mask = gats.get("mask")
    if mask:
        label = group["labels"][mask["label"]]
        label.update_attributes({"ome": _mask_label_ome(image_id, float(mask["factor"][0]), mpp)})
    levels = len(group.attrs["ome"]["multiscales"][0]["datasets"])
    gats.update(mpp=float(mpp), extra={**(gats.get("extra") or {}), "mpp_source": source})
    group.update_attributes({"ome": _ome_attrs(image_id, levels, int(gats["downsample"]), mpp), "gats": gats})


def _check_mpp(mpp: float | None) -> None:
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"Expected mpp a positive number of micrometres per pixel or None. Got {mpp}.")


def _mask_label_ome(image_id: str, factor: float, mpp: float | None) -> dict[str, Any]:
    """The mask label's OME-NGFF attributes: `factor` level-0 pixels per mask pixel, in micrometres when `mpp` is
    known (level-0 pixels otherwise), translated by (factor - 1) / 2 so its pixel centres sit on the image's."""
    base = float(mpp) if mpp is not None else 1.0
    unit = {"unit": "micrometer"} if mpp is not None else {}
    shift = (factor - 1.0) / 2.0 * base
    return label_attrs(image_id, [1.0, base * factor, base * factor], [0.0, shift, shift], unit)


def _geo_fields(extra: dict[str, Any]) -> dict[str, Any]:
    """PyramidInfo's crs and geotransform from the `gats.extra.geo` record the ingest stores for GeoTIFFs, and its
    objects from the digit boxes Megapixel MNIST's generator records."""
    geo = extra.get("geo") or {}
    return {"crs": str(geo.get("crs", "")), "geotransform": tuple(float(v) for v in geo.get("transform", ())),
            "objects": tuple(tuple(int(v) for v in box) for box in extra.get("digits_yxhw_digit") or ())}


def _write_mask(group: zarr.Group, rule: MaskRule, pixels: np.ndarray, at: int, step: int, downsample: int,
                mpp: float | None, image_id: str) -> dict[str, Any]:
    """Compute the mask on `pixels` (C, h, w), the `lattice` of level `at` with its step, and store it as the
    OME-NGFF label image labels/tissue; returns the `gats.mask` record."""
    fg = compute_mask(rule, pixels, image_id)  # (h, w) bool
    factor = float(downsample**at * step)  # level-0 pixels per mask pixel
    labels = group.create_group("labels", attributes={"ome": {"version": OME_VERSION, "labels": [MASK_LABEL]}})
    label = labels.create_group(MASK_LABEL, attributes={"ome": _mask_label_ome(image_id, factor, mpp)})
    h, w = fg.shape
    array = label.create_array(
        "0", shape=(1, h, w), dtype=np.uint8, chunks=(1, min(h, 1024), min(w, 1024)), fill_value=0,
        compressors=(BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle"), Crc32cCodec()),
        dimension_names=("c", "y", "x"), config={"write_empty_chunks": True})
    array[...] = fg[None].astype(np.uint8)
    return {"label": MASK_LABEL, "level": at, "factor": [factor, factor], "method": rule.method,
            "fraction": float(fg.mean())}


def _root_attrs(storage: Storage, image_id: str) -> dict[str, Any] | None:
    """Root group attributes of a stored pyramid, or None when there is none."""
    try:
        meta = json.loads(storage.read_bytes(f"{image_key(image_id)}/zarr.json"))
    except ImageNotFoundError:
        return None
    return meta.get("attributes", {}) or {}


def is_complete(root: str, image_id: str) -> bool:
    """True only when ROOT/images/<image_id>.zarr exists and carries the `gats.complete` marker."""
    attrs = _root_attrs(Storage(root), parse_image_id(image_id))
    return bool(attrs and isinstance(attrs.get("gats"), dict) and attrs["gats"].get("complete") is True)


def _stored_factors(datasets: list[dict[str, Any]]) -> tuple[tuple[float, float], ...]:
    """Per-level (fy, fx) = scale_l / scale_0 from each dataset's "scale" transformation (a "translation" after it is
    allowed and ignored here). A ratio within float noise (1e-9 relative) of an integer is that integer, so
    `base * d^l / base` is exactly d^l even when base * d^l was rounded (mpp 0.3, d = 3)."""
    def scale(d: dict[str, Any]) -> list[float]:
        found = [t["scale"] for t in d.get("coordinateTransformations", []) if t.get("type") == "scale"]
        if len(found) != 1:
            raise UnsupportedImageError(
                f"Expected exactly one 'scale' coordinate transformation for dataset {d.get('path')!r}. "
                f"Got {len(found)}: re-ingest the image with jobs/ingest.py.")
        return [float(v) for v in found[0]]

    def exact(ratio: float) -> float:
        k = round(ratio)
        return float(k) if k >= 1 and abs(ratio - k) <= 1e-9 * k else ratio

    scales = [scale(d) for d in datasets]
    return tuple((exact(s[1] / scales[0][1]), exact(s[2] / scales[0][2])) for s in scales)


def open_pyramid(root: str, image_id: str, *, stats: IOStats | None = None) -> Pyramid:
    """Open a complete pyramid read-only; IncompleteImageError for an interrupted write, ImageNotFoundError if absent.

    `info.downsamples` comes from the stored OME-NGFF scales (scale_l / scale_0 per axis), never from the shapes.
    Pyramids written since exact geometry store d^l; ones written before it stored H0/H_l (1500/188 = 7.98) and still
    open with that inexact factor, so their coarse levels map boxes slightly off: re-ingest them
    (`jobs/ingest.py --force`) to get exact factors. Their `gats.format` is 1; exact pyramids have 2 or more.
    Bytes fetched through the returned arrays are counted into `stats` (when given).
    """
    storage = Storage(root)
    parse_image_id(image_id)
    attrs = _root_attrs(storage, image_id)
    if attrs is None:
        raise ImageNotFoundError(
            f"No pyramid {storage.uri(image_key(image_id))!r}: check the image id against ROOT/manifest.parquet "
            "or run jobs/ingest.py."
        )
    gats = attrs.get("gats")
    if not (isinstance(gats, dict) and gats.get("complete") is True):
        raise IncompleteImageError(
            f"Pyramid {storage.uri(image_key(image_id))!r} is not marked complete (an interrupted ingest): "
            "re-run jobs/ingest.py to finish it."
        )
    strict = gats.get("all_chunks") is True  # every chunk was written: an absent one is damage (CorruptChunkError)
    store = storage.zarr_store(image_key(image_id), read_only=True, stats=stats, strict=strict, label=image_id)
    group = zarr.open_group(store, mode="r")
    datasets = attrs["ome"]["multiscales"][0]["datasets"]
    arrays = tuple(group[d["path"]] for d in datasets)
    downsamples = _stored_factors(datasets)
    band = gats.get("band_stats") or {}  # absent in pyramids written before band statistics
    mask_meta = gats.get("mask") or {}
    mask = group[f"labels/{mask_meta['label']}/0"] if mask_meta else None
    c, h, w = arrays[0].shape
    info = PyramidInfo(
        image_id=image_id, uri=storage.uri(image_key(image_id)), height=int(h), width=int(w), channels=int(c),
        dtype=np.dtype(arrays[0].dtype).name, levels=len(arrays), downsamples=downsamples, mpp=gats.get("mpp"),
        checksum=str(gats.get("checksum", "")), shapes=tuple((int(a.shape[1]), int(a.shape[2])) for a in arrays),
        fill_value=gats.get("fill_value", 0), chunk=int(arrays[0].chunks[1]),
        band_mean=tuple(band.get("mean", ())), band_std=tuple(band.get("std", ())),
        tissue_fraction=mask_meta.get("fraction"),
        mask_factor=tuple(float(f) for f in mask_meta["factor"]) if mask_meta else None,  # type: ignore[arg-type]
        **_geo_fields(gats.get("extra") or {}),
    )
    return Pyramid(info=info, arrays=arrays, mask=mask)
