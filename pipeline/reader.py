"""PatchReader: read boxes out of stored pyramids, fetching only the chunks they touch (plain class, no Ray).

Coordinates (DESIGN "Coordinates"): boxes are (y0, x0, h, w) in LEVEL-0 pixels, always. This module is the one
place they become level-l pixels, with the level's stored exact factor (fy, fx) = (d^l, d^l) for downsample d
(level-l pixel j covers level-0 pixels [j d^l, (j+1) d^l)):
`y0_l = round_half_up(y0 / fy)`, `h_l = max(1, round_half_up(h / fy))` (same for x). At level 0 this is exact.
Pyramids written before exact geometry store H0/H_l and are read with that factor until re-ingested.

One `read` call gathers the zarr chunks touched by all its boxes, fetches each touched chunk exactly once
(concurrently, on zarr's event loop), then copies each box's pieces out of them; pixels outside the image are the
image's fill value. A chunk that is missing, truncated or fails its crc32c raises CorruptChunkError naming the image,
level and chunk (never substituted data); a storage outage raises StorageError. Opened pyramids are cached (LRU);
`stats` counts chunk bytes fetched from the store (metadata excluded), chunks touched and requests.
"""
from __future__ import annotations

import asyncio
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import zarr
from zarr.core.sync import sync

from pipeline.errors import CorruptChunkError, MaskError, StorageError
from pipeline.masks import nearest_index
from pipeline.pyramid import PyramidInfo, open_pyramid
from pipeline.resolution import nearest_level, resample
from pipeline.storage import IOStats


@dataclass(frozen=True, slots=True)
class ReadStats:
    """Totals since the reader was made: chunk bytes fetched, chunks fetched, read/low_res calls."""

    bytes_read: int = 0
    chunks_read: int = 0
    requests: int = 0


@dataclass(slots=True)
class _Opened:
    info: PyramidInfo
    arrays: tuple[zarr.Array, ...]
    io: IOStats
    metadata_bytes: int  # bytes the open itself fetched (zarr.json files), excluded from ReadStats
    mask: zarr.Array | None = None  # (1, h, w) uint8 labels/tissue, when stored


def _round_half_up(x: np.ndarray) -> np.ndarray:
    return np.floor(x + 0.5).astype(np.int64)


def parse_boxes(boxes: object) -> np.ndarray:
    """Boxes as an int64 array (n, 4) of (y0, x0, h, w) with one shared positive (h, w)."""
    arr = np.asarray(boxes)
    if arr.ndim == 1 and arr.size == 4:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"Expected boxes of shape (n, 4) as (y0, x0, h, w). Got shape {arr.shape}.")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError("Expected integer boxes in level-0 pixels. Got fractional values: round them first.")
    arr = arr.astype(np.int64)
    if len(arr) and (np.any(arr[:, 2:] < 1) or np.any(arr[:, 2] != arr[0, 2]) or np.any(arr[:, 3] != arr[0, 3])):
        raise ValueError(
            "Expected every box to have the same positive (h, w). "
            f"Got sizes {np.unique(arr[:, 2:], axis=0)[:4].tolist()}: "
            "read boxes of different sizes in separate calls."
        )
    return arr


def boxes_to_level(boxes: np.ndarray, factor: tuple[float, float]) -> np.ndarray:
    """Level-0 boxes (n, 4) -> level-l boxes (n, 4) with the level's stored exact factor (fy, fx) = (d^l, d^l)."""
    f = np.array([factor[0], factor[1], factor[0], factor[1]], dtype=np.float64)
    out = _round_half_up(boxes.astype(np.float64) / f)  # (n, 4)
    out[:, 2:] = np.maximum(out[:, 2:], 1)
    return out


def mask_to_level(mask: np.ndarray, mask_factor: tuple[float, float], level_factor: tuple[float, float],
                  level_hw: tuple[int, int]) -> np.ndarray:
    """A mask (h_m, w_m) stored at level-0 pixels per mask pixel `mask_factor` -> (H_l, W_l) on a level's grid:
    level pixel j (level-0 centre (j + 1/2) f_l) takes the mask pixel that holds that centre (nearest), edges
    clamped."""
    rows, cols = (nearest_index(level_hw[a], level_factor[a], mask_factor[a], mask.shape[a]) for a in (0, 1))
    return mask[rows[:, None], cols[None, :]]


def level_for_factor(downsamples: Sequence[tuple[float, float]], factor: int, image_id: str = "") -> int:
    """The level whose stored exact factor is (factor, factor), where the nested model reads its regions;
    ValueError naming the factors there are. `downsamples`: each level's factor (fy, fx), as PyramidInfo and the
    manifest hold them."""
    for level, (fy, fx) in enumerate(downsamples):
        if abs(fy - factor) < 1e-9 and abs(fx - factor) < 1e-9:
            return level
    there = ", ".join(f"{fy:g}" if fy == fx else f"{fy:g}x{fx:g}" for fy, fx in downsamples)
    raise ValueError(f"No pyramid level{f' of {image_id}' if image_id else ''} has the exact factor {factor} (its "
                     f"levels' factors: {there}). Set model.nested.fine_downsample to one of those.")


class PatchReader:
    """Reads patches and low-res views of complete pyramids under ROOT (a folder or s3://bucket/prefix)."""

    def __init__(self, root: str, *, max_open: int = 256) -> None:
        if max_open < 1:
            raise ValueError(f"Expected max_open >= 1. Got {max_open}.")
        self.root = root
        self.max_open = max_open
        self._open: OrderedDict[str, _Opened] = OrderedDict()
        self._lock = threading.Lock()
        self._retired_bytes = 0
        self._chunks_read = 0
        self._requests = 0

    def __getstate__(self) -> dict:
        return {"root": self.root, "max_open": self.max_open}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"], max_open=state["max_open"])  # type: ignore[misc]

    @property
    def stats(self) -> ReadStats:
        with self._lock:
            live = sum(o.io.bytes_read - o.metadata_bytes for o in self._open.values())
            return ReadStats(self._retired_bytes + live, self._chunks_read, self._requests)

    def _get(self, image_id: str) -> _Opened:
        with self._lock:
            opened = self._open.get(image_id)
            if opened is not None:
                self._open.move_to_end(image_id)
                return opened
        io = IOStats()
        pyramid = open_pyramid(self.root, image_id, stats=io)  # raises IncompleteImageError / ImageNotFoundError
        opened = _Opened(pyramid.info, pyramid.arrays, io, io.bytes_read, pyramid.mask)
        with self._lock:
            current = self._open.setdefault(image_id, opened)
            self._open.move_to_end(image_id)
            while len(self._open) > self.max_open:
                _, old = self._open.popitem(last=False)
                self._retired_bytes += old.io.bytes_read - old.metadata_bytes
            return current

    def info(self, image_id: str) -> PyramidInfo:
        """Shapes per level, stored exact downsample factors (d^l), dtype and fill value of a complete image."""
        return self._get(image_id).info

    def _level(self, opened: _Opened, level: int) -> zarr.Array:
        if not 0 <= level < len(opened.arrays):
            raise ValueError(
                f"Expected level in [0, {len(opened.arrays) - 1}] for {opened.info.image_id!r}. Got {level}."
            )
        return opened.arrays[level]

    def read(self, image_id: str, boxes: object, level: int = 0,
             out_hw: tuple[int, int] | None = None) -> np.ndarray:
        """Patches (n, C, h_l, w_l) in the stored dtype for level-0 boxes (n, 4) = (y0, x0, h, w), read at `level`;
        with `out_hw`, resampled to that size where the level's size differs (pipeline.resolution.resample)."""
        out = self._read(image_id, boxes, level)
        return out if out_hw is None or len(out) == 0 else resample(out, out_hw)

    def _read(self, image_id: str, boxes: object, level: int) -> np.ndarray:
        opened = self._get(image_id)
        array = self._level(opened, level)
        boxes0 = parse_boxes(boxes)
        c, height, width = array.shape
        fill = np.asarray(opened.info.fill_value).astype(array.dtype)
        if len(boxes0) == 0:
            with self._lock:
                self._requests += 1
            return np.empty((0, c, 0, 0), dtype=array.dtype)
        lb = boxes_to_level(boxes0, opened.info.downsamples[level])  # (n, 4) in level-l pixels
        h, w = int(lb[0, 2]), int(lb[0, 3])
        out = np.full((len(lb), c, h, w), fill, dtype=array.dtype)  # (n, C, h, w)
        ch, cw = int(array.chunks[1]), int(array.chunks[2])

        # Clip each box to the image, then list the chunks it touches: chunk -> [box index, ...].
        y0 = np.clip(lb[:, 0], 0, height)
        y1 = np.clip(lb[:, 0] + h, 0, height)
        x0 = np.clip(lb[:, 1], 0, width)
        x1 = np.clip(lb[:, 1] + w, 0, width)
        touched: dict[tuple[int, int], list[int]] = {}
        for i in np.flatnonzero((y1 > y0) & (x1 > x0)):
            for cy in range(y0[i] // ch, (y1[i] - 1) // ch + 1):
                for cx in range(x0[i] // cw, (x1[i] - 1) // cw + 1):
                    touched.setdefault((cy, cx), []).append(int(i))
        keys = sorted(touched)
        chunks = self._fetch(opened, level, keys)  # one (C, <=ch, <=cw) array per touched chunk

        for (cy, cx), data in zip(keys, chunks):
            gy, gx = cy * ch, cx * cw  # chunk origin in level-l pixels
            for i in touched[(cy, cx)]:
                sy0, sy1 = max(y0[i], gy), min(y1[i], gy + data.shape[1])
                sx0, sx1 = max(x0[i], gx), min(x1[i], gx + data.shape[2])
                oy, ox = sy0 - lb[i, 0], sx0 - lb[i, 1]
                out[i, :, oy:oy + sy1 - sy0, ox:ox + sx1 - sx0] = data[:, sy0 - gy:sy1 - gy, sx0 - gx:sx1 - gx]
        with self._lock:
            self._chunks_read += len(keys)
            self._requests += 1
        return out

    def _fetch(self, opened: _Opened, level: int, keys: list[tuple[int, int]]) -> list[np.ndarray]:
        """Fetch whole chunks (all channels) concurrently; each key once, in the order given. The first chunk that
        cannot be decoded raises CorruptChunkError naming it."""
        return fetch_chunks(opened.arrays[level], keys, image_id=opened.info.image_id, level=level,
                            uri=opened.info.uri)

    def low_res(self, image_id: str, level: int) -> np.ndarray:
        """A whole level (C, H_l, W_l) in the stored dtype; meant for the small low-resolution levels."""
        opened = self._get(image_id)
        array = self._level(opened, level)
        _, height, width = array.shape
        ch, cw = int(array.chunks[1]), int(array.chunks[2])
        keys = [(cy, cx) for cy in range(math.ceil(height / ch)) for cx in range(math.ceil(width / cw))]
        data = np.empty(array.shape, dtype=array.dtype)  # (C, H_l, W_l)
        for (cy, cx), chunk in zip(keys, self._fetch(opened, level, keys)):
            data[:, cy * ch:cy * ch + chunk.shape[1], cx * cw:cx * cw + chunk.shape[2]] = chunk
        with self._lock:
            self._chunks_read += len(keys)
            self._requests += 1
        return data

    def mask(self, image_id: str, level: int) -> np.ndarray:
        """The image's foreground mask (pipeline.masks) on level `level`'s grid: (H_l, W_l) bool, nearest pixel.
        MaskError naming the fix when the pyramid has none."""
        opened = self._get(image_id)
        if opened.mask is None or opened.info.mask_factor is None:
            raise MaskError(
                f"{image_id!r} has no stored foreground mask: re-ingest with jobs/ingest.py --mask tissue (slides), "
                "--mask nodata --nodata VALUE (rasters) or --mask-dir DIR, and --force; or set data.min_tissue 0.")
        stored = np.asarray(opened.mask[0]) != 0  # (h_m, w_m), a thumbnail
        array = self._level(opened, level)
        return mask_to_level(stored, opened.info.mask_factor, opened.info.downsamples[level],
                             (int(array.shape[1]), int(array.shape[2])))

    def level_for_scale(self, image_id: str, scale: float) -> int:
        """The level whose size relative to level 0 (1 / factor, geometric mean over y and x) is nearest `scale`
        in log space; ties go to the finer level. `scale` in (0, 1], e.g. 0.2 for a 5x smaller view."""
        return nearest_level(self.info(image_id).downsamples, scale)


def chunk_key(array: zarr.Array, cy: int, cx: int) -> str:
    """The store key (relative to the image) holding chunk (cy, cx) of a (C, H, W) level: the chunk's own key, or
    its shard's when the level is sharded."""
    if array.shards is not None:
        per_y, per_x = array.shards[1] // array.chunks[1], array.shards[2] // array.chunks[2]
        cy, cx = cy // per_y, cx // per_x
    return f"{array.path}/" + array.metadata.encode_chunk_key((0, cy, cx))


def fetch_chunks(array: zarr.Array, keys: Sequence[tuple[int, int]], *, image_id: str, level: int,
                 uri: str = "") -> list[np.ndarray]:
    """Chunks (cy, cx) of a (C, H, W) level as arrays (C, <=ch, <=cw), fetched concurrently on zarr's event loop.

    A chunk whose bytes fail to decode (crc32c mismatch, truncated, empty, undecodable) raises CorruptChunkError
    naming the image, level, chunk and key; an absent chunk of a strict pyramid already raises it from the store; a
    storage outage stays a StorageError. Nothing is ever substituted for a chunk that failed.
    """
    if not keys:
        return []
    _, height, width = array.shape
    ch, cw = int(array.chunks[1]), int(array.chunks[2])
    aa = array.async_array

    async def gather() -> list[Any]:
        sel = [(slice(None), slice(cy * ch, min((cy + 1) * ch, height)), slice(cx * cw, min((cx + 1) * cw, width)))
               for cy, cx in keys]
        return list(await asyncio.gather(*(aa.getitem(s) for s in sel), return_exceptions=True))

    out = []
    for (cy, cx), got in zip(keys, sync(gather())):
        if isinstance(got, (CorruptChunkError, StorageError)) or not isinstance(got, Exception):
            if isinstance(got, BaseException):
                raise got
            out.append(np.asarray(got))
            continue
        # Broad on purpose: the codecs raise ValueError (crc32c mismatch), RuntimeError (blosc), SystemError or
        # TypeError for damaged bytes; whichever it is, this chunk's stored bytes are not what was written.
        key = chunk_key(array, cy, cx)
        raise CorruptChunkError(
            f"Chunk {key!r} of image {image_id!r} ({uri}) is damaged: level {level}, chunk (y={cy}, x={cx}) "
            f"failed to decode ({type(got).__name__}: {got}). Re-ingest the image: `gats-verify ROOT --repair` "
            "removes damaged pyramids, then re-run jobs/ingest.py with the same sources (only those are rewritten)."
        ) from got
    return out
