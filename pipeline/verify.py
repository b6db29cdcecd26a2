"""Verify stored pyramids against what ingest wrote: the typed library behind `gats-verify` (jobs/verify.py).

    report = verify_root(root, workers=2, on_image=print)
    report.damaged            -> the images that failed a check, each naming what and where
    repair(root, report)      -> remove the damaged pyramids and mark their manifest rows failed, so that the next
                                 `jobs/ingest.py` run with the same sources rewrites exactly those

For every manifest row marked complete, `verify_image` re-reads every stored chunk of every level (each chunk's
crc32c is checked by the codec, an absent chunk of a strict pyramid is an error, pipeline.reader.fetch_chunks),
recomputes the level-0 checksum (pipeline.pyramid: BLAKE2b-128 over the write blocks, in one pass with the reads)
and compares it with the one stored in the pyramid and the one in the manifest. Memory is one write block at a
time. Pyramids written before chunk checksums (`gats.format` < 3) are still checked against the level-0 checksum,
but damage to their coarser levels or a deleted chunk cannot be seen: the result says so (re-ingest with --force).
Nothing here draws progress or parses arguments (STYLE): `on_start(n)` and `on_image(result)` report progress.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from pipeline import manifest
from pipeline.errors import CorruptChunkError, ImageNotFoundError, IncompleteImageError, PipelineError
from pipeline.pyramid import GATS_FORMAT, block_digest, level0_checksum, open_pyramid
from pipeline.reader import fetch_chunks
from pipeline.storage import IOStats, Storage, image_key

STATUSES = ("ok", "damaged", "missing", "unchecked")  # unchecked: the manifest row was not complete


@dataclass(frozen=True, slots=True)
class ImageCheck:
    """What `verify_image` found for one manifest row. `problems` is empty when `status` is "ok"; `warnings` note
    what could not be checked (older formats)."""

    image_id: str
    status: str
    problems: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    chunks_read: int = 0
    bytes_read: int = 0

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "unchecked")


@dataclass(frozen=True, slots=True)
class VerifyReport:
    root: str
    checks: tuple[ImageCheck, ...]

    @property
    def damaged(self) -> tuple[ImageCheck, ...]:
        return tuple(c for c in self.checks if not c.ok)

    def summary(self) -> str:
        """A few lines for a person: counts, bytes read, and one line per damaged image naming what failed."""
        counts = {s: sum(c.status == s for c in self.checks) for s in STATUSES}
        read = sum(c.bytes_read for c in self.checks)
        lines = [f"{counts['ok']}/{counts['ok'] + counts['damaged'] + counts['missing']} complete images verified "
                 f"in {self.root} ({sum(c.chunks_read for c in self.checks)} chunks, {read / 2**20:.1f} MiB read); "
                 f"{counts['damaged']} damaged, {counts['missing']} missing, {counts['unchecked']} rows not complete "
                 "(not checked)"]
        for c in self.damaged:
            lines.append(f"  {c.image_id}: {c.status}: " + "; ".join(c.problems[:3])
                         + (f" (+{len(c.problems) - 3} more)" if len(c.problems) > 3 else ""))
        warned = [c for c in self.checks if c.warnings]
        if warned:
            lines.append(f"{len(warned)} images only partly checked: {warned[0].warnings[0]}")
        if self.damaged:
            lines.append("Fix: gats-verify ROOT --repair removes the damaged pyramids and marks them failed in the "
                         "manifest; then re-run jobs/ingest.py with the same sources to rewrite only those.")
        return "\n".join(lines)


def verify_image(root: str, row: manifest.ManifestRow) -> ImageCheck:
    """Re-read every chunk of one complete image and recompute its level-0 checksum (module docstring)."""
    if row.status != "complete":
        return ImageCheck(row.image_id, "unchecked")
    io = IOStats()
    try:
        pyr = open_pyramid(root, row.image_id, stats=io)
    except ImageNotFoundError:
        return ImageCheck(row.image_id, "missing", (f"no pyramid at {row.uri}",))
    except IncompleteImageError as exc:
        return ImageCheck(row.image_id, "damaged", (str(exc),))
    gats = _gats(root, row.image_id)
    info = pyr.info
    problems: list[str] = []
    warnings: list[str] = []
    if int(gats.get("format") or 1) < GATS_FORMAT or gats.get("all_chunks") is not True:
        warnings.append(f"gats.format {gats.get('format')} has no chunk checksums: only level 0 is checked against "
                        "its checksum and deleted chunks are not seen; re-ingest with --force for full checks")
    if row.checksum and info.checksum != row.checksum:
        problems.append(f"the pyramid's checksum {info.checksum} differs from the manifest's {row.checksum}")
    chunks = 0
    for level, array in enumerate(pyr.arrays):
        c, height, width = (int(s) for s in array.shape)
        ch, cw = int(array.chunks[1]), int(array.chunks[2])
        # level 0 is read in write blocks (shards or chunks) so its checksum is recomputed in the same pass
        block = int(gats.get("shards") or ch) if level == 0 else ch
        per = block // ch
        digests: list[bytes] = []
        for by in range(math.ceil(height / block)):
            for bx in range(math.ceil(width / block)):
                keys = [(by * per + i, bx * per + j) for i in range(per) for j in range(per)
                        if (by * per + i) * ch < height and (bx * per + j) * cw < width]
                try:
                    parts = fetch_chunks(array, keys, image_id=row.image_id, level=level, uri=info.uri)
                except CorruptChunkError as exc:
                    problems.append(str(exc).split(" Re-ingest")[0])
                    digests.append(b"")
                    chunks += len(keys)
                    continue
                chunks += len(keys)
                if level == 0:
                    y0, x0 = by * block, bx * block
                    out = np.empty((c, min(block, height - y0), min(block, width - x0)), dtype=array.dtype)
                    for (cy, cx), part in zip(keys, parts):
                        oy, ox = cy * ch - y0, cx * cw - x0
                        out[:, oy:oy + part.shape[1], ox:ox + part.shape[2]] = part
                    digests.append(block_digest(out))
        if level == 0 and all(digests):
            computed = level0_checksum((c, height, width), np.dtype(array.dtype).name, block, digests)
            if computed != info.checksum:
                problems.append(f"level 0 pixels do not match the stored checksum ({computed} != {info.checksum}): "
                                "a chunk decodes into different pixels than were written")
    return ImageCheck(row.image_id, "damaged" if problems else "ok", tuple(problems), tuple(warnings), chunks,
                      io.bytes_read)


def _gats(root: str, image_id: str) -> dict[str, Any]:
    meta = json.loads(Storage(root).read_bytes(f"{image_key(image_id)}/zarr.json"))
    return dict((meta.get("attributes") or {}).get("gats") or {})


def verify_root(root: str, *, image_ids: Sequence[str] | None = None, workers: int = 1,
                on_start: Callable[[int], None] | None = None,
                on_image: Callable[[ImageCheck], None] | None = None) -> VerifyReport:
    """Verify every manifest row of ROOT (or only `image_ids`), `workers` images at a time; checks in manifest
    order. Raises ImageNotFoundError when ROOT has no manifest, ValueError for unknown `image_ids`."""
    if workers < 1:
        raise ValueError(f"Expected workers >= 1. Got {workers}.")
    rows, _ = manifest.read_manifest(root)
    if image_ids is not None:
        known = {r.image_id for r in rows}
        unknown = [i for i in image_ids if i not in known]
        if unknown:
            raise ValueError(f"Image ids {unknown[:5]} are not in the manifest of {root}: check the spelling against "
                             "ROOT/manifest.parquet.")
        wanted = set(image_ids)
        rows = [r for r in rows if r.image_id in wanted]
    if on_start is not None:
        on_start(len(rows))
    checks: list[ImageCheck] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verify") as pool:
        for check in pool.map(lambda r: _safe_verify(root, r), rows):
            checks.append(check)
            if on_image is not None:
                on_image(check)
    return VerifyReport(root, tuple(checks))


def _safe_verify(root: str, row: manifest.ManifestRow) -> ImageCheck:
    try:
        return verify_image(root, row)
    except PipelineError as exc:  # StorageError and the like: this image could not be checked, say why
        return ImageCheck(row.image_id, "damaged", (f"{type(exc).__name__}: {exc}",))


def repair(root: str, report: VerifyReport) -> list[str]:
    """Delete the damaged and missing pyramids of `report` and rewrite the manifest with their rows marked failed
    ("damaged: ..."), so training never reads them and the next ingest rerun rewrites exactly those. Returns the
    image ids removed. The manifest is written once, atomically, after the deletions."""
    bad = {c.image_id: c for c in report.damaged}
    if not bad:
        return []
    storage = Storage(root)
    for image_id in bad:
        storage.delete(image_key(image_id))
    rows, classes = manifest.read_manifest(root)
    fixed = [replace(r, status="failed", error=f"damaged: {bad[r.image_id].problems[0][:300]} (removed by "
                     "gats-verify --repair; re-run jobs/ingest.py with the same sources)")
             if r.image_id in bad else r for r in rows]
    manifest.write_manifest(root, fixed, classes)
    return list(bad)
