"""The dataset manifest: ROOT/manifest.parquet, one row per source image (DESIGN "Storage layout").

Columns: image_id, uri, source, label (string), split, height, width, channels, dtype, levels, downsamples
(per level [fy, fx] = the exact factor d^l), mpp, checksum, status ("complete" | "failed"), error, group (the unit
that must stay in one split, e.g. a patient or a site; "" when none: each image is its own unit; manifests written
before the column existed read as ""), band_mean and band_std (per band, in the nets' [0, 1] convention, from the
pyramid's `gats.band_stats`; empty in rows that failed at ingest and in manifests written before them),
tissue_fraction (the foreground share of the image's stored mask, pipeline.masks; null when none was made), crs and
geotransform (a GeoTIFF's "EPSG:<code>" and GDAL geotransform; "" and [] otherwise). The class order (sorted labels)
is stored in the Parquet key-value metadata `classes` as a JSON list. The file is written
atomically: temp file + rename on a folder, a single PUT on S3, so readers never see half a manifest.
"""
from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ImageNotFoundError, LabelError, SourceListError
from pipeline.storage import Storage

MANIFEST_KEY = "manifest.parquet"
SPLITS = ("train", "val", "test")
STATUSES = ("complete", "failed")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("uri", pa.string()),
    ("source", pa.string()),
    ("label", pa.string()),
    ("split", pa.string()),
    ("height", pa.int64()),
    ("width", pa.int64()),
    ("channels", pa.int64()),
    ("dtype", pa.string()),
    ("levels", pa.int64()),
    ("downsamples", pa.list_(pa.list_(pa.float64()))),
    ("mpp", pa.float64()),
    ("checksum", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("group", pa.string()),
    ("band_mean", pa.list_(pa.float64())),
    ("band_std", pa.list_(pa.float64())),
    ("tissue_fraction", pa.float64()),
    ("crs", pa.string()),
    ("geotransform", pa.list_(pa.float64())),
])


@dataclass(frozen=True, slots=True)
class ManifestRow:
    """One image. Failed rows keep what is known (source, label, split) and say why in `error`."""

    image_id: str
    uri: str
    source: str
    label: str
    split: str = "train"
    height: int | None = None
    width: int | None = None
    channels: int | None = None
    dtype: str | None = None
    levels: int | None = None
    downsamples: tuple[tuple[float, float], ...] = ()
    mpp: float | None = None
    checksum: str | None = None
    status: str = "complete"
    error: str | None = None
    group: str = ""  # patient, site, ...: images that must stay in one split ("": none)
    band_mean: tuple[float, ...] = ()  # per band, [0, 1] convention (pyramid `gats.band_stats`; (): not recorded)
    band_std: tuple[float, ...] = ()
    tissue_fraction: float | None = None  # foreground share of the stored mask (None: no mask)
    crs: str = ""  # a GeoTIFF's CRS, "EPSG:<code>" ("": none, or defined by the file itself)
    geotransform: tuple[float, ...] = ()  # GDAL order (x0, dx, rx, y0, ry, dy); (): not georeferenced

    def __post_init__(self) -> None:
        object.__setattr__(self, "group", "" if self.group is None else self.group)
        if not isinstance(self.group, str):
            raise ValueError(f"Expected a string group. Got {self.group!r} for {self.source!r}: pass str(group).")
        if self.split not in SPLITS:
            raise SourceListError(f"Expected split in {SPLITS}. Got {self.split!r} for {self.source!r}: fix the CSV.")
        if self.status not in STATUSES:
            raise ValueError(f"Expected status in {STATUSES}. Got {self.status!r}.")
        if not isinstance(self.label, str):
            raise LabelError(f"Expected a string label. Got {self.label!r} for {self.source!r}: pass str(label).")
        if self.status == "complete":
            missing = [n for n in ("height", "width", "channels", "dtype", "levels") if getattr(self, n) is None]
            if missing or not self.label:
                raise ValueError(
                    f"A complete row needs a label and {missing or 'its shape'} (image {self.image_id!r}): "
                    "fill them from PyramidInfo or mark the row failed with an error."
                )
        elif not self.error:
            raise ValueError(f"A failed row needs an error message (image {self.image_id!r}).")
        object.__setattr__(self, "downsamples", tuple((float(f[0]), float(f[1])) for f in self.downsamples))
        object.__setattr__(self, "crs", self.crs or "")
        for name in ("band_mean", "band_std", "geotransform"):
            object.__setattr__(self, name, tuple(float(v) for v in (getattr(self, name) or ())))


def safe_image_id(stem: str, taken: set[str]) -> str:
    """A unique, safe id ([A-Za-z0-9._-], not starting with '.') for a source file stem; adds it to `taken`.

    Uniqueness is case-insensitive (ids become folder names, and some file systems ignore case): the second
    "slide" becomes "slide-2".
    """
    base = _UNSAFE.sub("_", stem).lstrip(".") or "image"
    lowered = {t.lower() for t in taken}
    candidate, k = base, 2
    while candidate.lower() in lowered:
        candidate = f"{base}-{k}"
        k += 1
    taken.add(candidate)
    return candidate


def class_order(rows: Iterable[ManifestRow]) -> tuple[str, ...]:
    """Sorted distinct non-empty labels of the rows."""
    return tuple(sorted({r.label for r in rows if r.label}))


def rows_to_table(rows: Sequence[ManifestRow], classes: Sequence[str]) -> pa.Table:
    """A pyarrow Table in SCHEMA with `classes` (JSON list) in the key-value metadata."""
    columns = {f.name: [getattr(r, f.name) for r in rows] for f in fields(ManifestRow)}
    columns["downsamples"] = [[list(fyx) for fyx in r.downsamples] for r in rows]
    table = pa.table(columns, schema=SCHEMA)
    return table.replace_schema_metadata({"classes": json.dumps(list(classes))})


def write_manifest(root: str, rows: Sequence[ManifestRow], classes: Sequence[str] | None = None) -> str:
    """Write ROOT/manifest.parquet atomically; returns its URI. `classes` defaults to the sorted labels."""
    rows = list(rows)
    ids = [r.image_id for r in rows]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"Duplicate image ids {dup[:5]}: make ids with safe_image_id(stem, taken).")
    classes = tuple(classes) if classes is not None else class_order(rows)
    if list(classes) != sorted(set(classes)):
        raise ValueError(f"Expected classes sorted and distinct. Got {list(classes)[:10]}.")
    unknown = sorted({r.label for r in rows if r.status == "complete" and r.label not in classes})
    if unknown:
        raise LabelError(f"Labels {unknown[:5]} are not among the classes: add them to `classes` or fix the labels.")
    buf = io.BytesIO()
    pq.write_table(rows_to_table(rows, classes), buf)
    storage = Storage(root)
    storage.write_bytes(MANIFEST_KEY, buf.getvalue())
    return storage.uri(MANIFEST_KEY)


def read_manifest_table(root: str) -> tuple[pa.Table, tuple[str, ...]]:
    """ROOT/manifest.parquet as a pyarrow Table, plus the class order."""
    storage = Storage(root)
    try:
        data = storage.read_bytes(MANIFEST_KEY)
    except ImageNotFoundError as exc:
        raise ImageNotFoundError(
            f"No manifest at {storage.uri(MANIFEST_KEY)!r}: run jobs/ingest.py --out {root} first."
        ) from exc
    # One thread, no pre-buffering: with torch loaded, pyarrow's reader thread pools abort the interpreter at exit
    # ("terminate called without an active exception") in ~40% of runs of pq.read_table, even with
    # use_threads=False; ParquetFile without pre_buffer never did in 30 runs (benchmarks/integrity.py found it).
    table = pq.ParquetFile(pa.BufferReader(data), pre_buffer=False).read(use_threads=False)
    meta = table.schema.metadata or {}
    classes = tuple(json.loads(meta.get(b"classes", b"[]")))
    return table, classes


def read_manifest(root: str) -> tuple[list[ManifestRow], tuple[str, ...]]:
    """The manifest rows (in written order) and the class order."""
    table, classes = read_manifest_table(root)
    rows = []
    for rec in table.to_pylist():
        rec["downsamples"] = tuple(tuple(f) for f in (rec["downsamples"] or ()))
        rows.append(ManifestRow(**rec))
    return rows, classes
