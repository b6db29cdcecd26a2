"""Which files to ingest: the command-line SOURCE arguments (image files, folders, CSV lists) -> `SourceEntry` rows.

    for entry in iter_sources(["slide.svs", "folder/", "list.csv"]):
        entry.path, entry.stem, entry.label, entry.split, entry.group, entry.error

A file is taken as is (opening it is pipeline/sources.py's job, and its errors are found then), a folder gives its
supported images (sorted, not recursive), a CSV gives one entry per row with its own label, split and group. The
CSV's first line is a header naming its columns, in any order: `path` and `label` (required), `split` (default
"train"), `group` (the patient or site an image belongs to; default "", see pipeline/manifest.py) and `mpp` (the
image's micrometres per level-0 pixel, which replaces what the file records; empty: the file's, or --mpp); so
`path,label`, `path,label,split` and `path,label,split,group,mpp` all work. A bad folder or CSV header raises before
anything is ingested; a bad CSV row becomes an entry carrying its typed error, so that it turns into a failed
manifest row and the other rows still run.
"""
from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ImageNotFoundError, LabelError, PipelineError, SourceListError
from pipeline.manifest import SPLITS  # a CSV row's split must be one the manifest accepts
from pipeline.sources import SUPPORTED_SUFFIXES, image_stem

CSV_HEADER = "path,label[,split][,group][,mpp]"
CSV_COLUMNS = ("path", "label", "split", "group", "mpp")  # path and label required; any order


@dataclass(frozen=True, slots=True)
class SourceEntry:
    """One image to ingest, as named on the command line or listed in a CSV (`listed`, with its own label, split and
    group); `error` is set for a bad CSV row."""

    path: str
    label: str | None = None
    split: str = "train"
    error: PipelineError | None = None
    listed: bool = False
    group: str = ""
    mpp: float | None = None  # the CSV's mpp column: micrometres per level-0 pixel, replacing the file's

    @property
    def stem(self) -> str:
        return image_stem(self.path)


def iter_sources(args: Iterable[str | Path]) -> Iterator[SourceEntry]:
    """Expand SOURCE arguments: a file as is, a folder's supported images (sorted, not recursive), a CSV's rows."""
    for arg in args:
        p = Path(arg)
        if p.suffix.lower() == ".csv":
            yield from read_source_list(p)
        elif p.is_dir():
            children = sorted(c for c in p.iterdir()
                              if not c.name.startswith(".") and c.suffix.lower() in SUPPORTED_SUFFIXES)
            if not children:
                raise SourceListError(f"Folder {str(p)!r} holds no images with a supported suffix "
                                      f"({', '.join(SUPPORTED_SUFFIXES)}). Point SOURCE at the folder with the images.")
            yield from (SourceEntry(str(c)) for c in children)
        else:
            yield SourceEntry(str(p))


def read_source_list(csv_path: str | Path) -> list[SourceEntry]:
    """Rows of a CSV with a header naming its columns (`path,label[,split][,group]`, any order). A wrong header
    raises; a bad row becomes an entry carrying its error."""
    p = Path(csv_path)
    if not p.is_file():
        raise ImageNotFoundError(f"Source list {str(p)!r} does not exist. Check the path.")
    with p.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if not {"path", "label"} <= set(header) or not set(header) <= set(CSV_COLUMNS) or len(set(header)) < len(header):
        raise SourceListError(f"{str(p)!r} has the header {','.join(header)!r}; expected '{CSV_HEADER}' as the "
                              "first line (columns in any order). Rename the columns.")
    column = {name: i for i, name in enumerate(header)}
    entries = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        cells = [c.strip() for c in row] + [""] * (len(header) - len(row))
        path_cell, label = cells[column["path"]], cells[column["label"]]
        split = cells[column["split"]] if "split" in column and cells[column["split"]] else "train"
        group = cells[column["group"]] if "group" in column else ""
        mpp_cell = cells[column["mpp"]] if "mpp" in column else ""
        mpp = _positive(mpp_cell)
        path = str(p.parent / path_cell) if path_cell and not Path(path_cell).is_absolute() else path_cell
        error: PipelineError | None = None
        if len(row) > len(header):
            error = SourceListError(f"{p.name} line {line} has {len(row)} cells; expected '{CSV_HEADER}'. Quote "
                                    "values that contain commas.")
        elif not path_cell:
            error = SourceListError(f"{p.name} line {line} has an empty path. Fill in the image path.")
        elif not label:
            error = LabelError(f"{p.name} line {line} ({path_cell}) has an empty label. Give every image a label.")
        elif split not in SPLITS:
            error = SourceListError(f"{p.name} line {line} has split {split!r}; expected one of {', '.join(SPLITS)}.")
        elif mpp_cell and mpp is None:
            error = SourceListError(f"{p.name} line {line} has mpp {mpp_cell!r}; expected a positive number of "
                                    "micrometres per pixel (e.g. 0.25 at 40x, 0.5 at 20x), or leave it empty.")
        entries.append(SourceEntry(path, label or None, split if split in SPLITS else "train", error, listed=True,
                                   group=group, mpp=mpp))
    if not entries:
        raise SourceListError(f"{str(p)!r} lists no images. Add rows '{CSV_HEADER}' below the header.")
    return entries


def _positive(cell: str) -> float | None:
    """A CSV cell as a positive finite number, else None."""
    try:
        value = float(cell)
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None
