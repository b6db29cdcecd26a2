"""Manifest: schema round trip, class order in Parquet metadata, atomic writes, safe unique ids, validation."""
from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest

from pipeline.errors import ImageNotFoundError, LabelError, SourceListError
from pipeline.manifest import SCHEMA, ManifestRow, read_manifest, read_manifest_table, safe_image_id, write_manifest


def _row(image_id: str, label: str = "3", **kw: object) -> ManifestRow:
    base = dict(uri=f"/r/images/{image_id}.zarr", source=f"/src/{image_id}.png", label=label, height=10, width=12,
                channels=3, dtype="uint8", levels=2, downsamples=((1, 1), (2, 2)), checksum="blake2b-128:00")
    base.update(kw)
    return ManifestRow(image_id=image_id, **base)  # type: ignore[arg-type]


def test_round_trip_schema_and_classes(tmp_path: os.PathLike) -> None:
    rows = [_row("b", "10", split="test", mpp=0.5), _row("a", "2"),
            ManifestRow("c", "", "/src/c.png", "", status="failed", error="CorruptImageError: truncated")]
    uri = write_manifest(str(tmp_path), rows)
    assert uri == os.path.join(str(tmp_path), "manifest.parquet")
    back, classes = read_manifest(str(tmp_path))
    assert back == rows
    assert classes == ("10", "2")  # sorted as strings, stored once
    table = pq.read_table(uri)
    assert table.schema.remove_metadata() == SCHEMA
    assert table.column("downsamples").to_pylist()[0] == [[1.0, 1.0], [2.0, 2.0]]
    assert read_manifest_table(str(tmp_path))[1] == classes


def test_group_round_trips_and_an_older_manifest_reads_as_no_group(tmp_path: os.PathLike) -> None:
    rows = [_row("a", group="patient-1"), _row("b"), ManifestRow("c", "", "s", "", status="failed", error="E: e",
                                                                 group="patient-2")]
    write_manifest(str(tmp_path), rows)
    back, _ = read_manifest(str(tmp_path))
    assert [r.group for r in back] == ["patient-1", "", "patient-2"] and back == rows
    path = os.path.join(str(tmp_path), "manifest.parquet")
    table = pq.read_table(path)
    older = table.drop_columns(["group"]).replace_schema_metadata(table.schema.metadata)  # before the column
    pq.write_table(older, path)
    back, classes = read_manifest(str(tmp_path))
    assert [r.group for r in back] == ["", "", ""] and classes == ("3",)
    assert [r.image_id for r in back] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="string group"):
        _row("d", group=7)


def test_band_statistics_round_trip_and_an_older_manifest_reads_as_none(tmp_path: os.PathLike) -> None:
    rows = [_row("a", band_mean=(0.1, 0.25, 0.5), band_std=(0.01, 0.02, 0.03)), _row("b"),
            ManifestRow("c", "", "s", "", status="failed", error="E: e")]
    write_manifest(str(tmp_path), rows)
    back, _ = read_manifest(str(tmp_path))
    assert back == rows and back[0].band_std == (0.01, 0.02, 0.03) and back[1].band_mean == ()
    path = os.path.join(str(tmp_path), "manifest.parquet")
    table = pq.read_table(path)
    older = table.drop_columns(["band_mean", "band_std"]).replace_schema_metadata(table.schema.metadata)
    pq.write_table(older, path)
    assert [(r.band_mean, r.band_std) for r in read_manifest(str(tmp_path))[0]] == [((), ())] * 3


def test_tissue_fraction_round_trips_and_an_older_manifest_reads_as_no_mask(tmp_path: os.PathLike) -> None:
    rows = [_row("a", tissue_fraction=0.375), _row("b")]
    write_manifest(str(tmp_path), rows)
    back, _ = read_manifest(str(tmp_path))
    assert back == rows and back[0].tissue_fraction == 0.375 and back[1].tissue_fraction is None
    path = os.path.join(str(tmp_path), "manifest.parquet")
    table = pq.read_table(path)
    pq.write_table(table.drop_columns(["tissue_fraction"]).replace_schema_metadata(table.schema.metadata), path)
    assert [r.tissue_fraction for r in read_manifest(str(tmp_path))[0]] == [None, None]


def test_explicit_classes_and_unknown_label(tmp_path: os.PathLike) -> None:
    write_manifest(str(tmp_path), [_row("a", "cat")], classes=["cat", "dog"])
    assert read_manifest(str(tmp_path))[1] == ("cat", "dog")
    with pytest.raises(LabelError, match="not among the classes"):
        write_manifest(str(tmp_path), [_row("a", "cow")], classes=["cat", "dog"])
    with pytest.raises(ValueError, match="sorted"):
        write_manifest(str(tmp_path), [_row("a", "cat")], classes=["dog", "cat"])


def test_atomic_overwrite_leaves_no_temp(tmp_path: os.PathLike) -> None:
    write_manifest(str(tmp_path), [_row("a")])
    write_manifest(str(tmp_path), [_row("a"), _row("b")])
    assert sorted(os.listdir(tmp_path)) == ["manifest.parquet"]
    assert [r.image_id for r in read_manifest(str(tmp_path))[0]] == ["a", "b"]


def test_validation() -> None:
    with pytest.raises(SourceListError, match="split"):
        _row("a", split="training")
    with pytest.raises(ValueError, match="error message"):
        ManifestRow("a", "", "s", "", status="failed")
    with pytest.raises(ValueError, match="needs a label"):
        _row("a", "")
    with pytest.raises(LabelError):
        _row("a", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Duplicate"):
        write_manifest("/nonexistent-never-written", [_row("a"), _row("a")])


def test_missing_manifest_names_fix(tmp_path: os.PathLike) -> None:
    with pytest.raises(ImageNotFoundError, match="jobs/ingest.py"):
        read_manifest(str(tmp_path))


def test_safe_image_id() -> None:
    taken: set[str] = set()
    ids = [safe_image_id(s, taken) for s in ["slide 1", "slide_1", "SLIDE_1", "../etc/passwd", "", "ok.v2", "é"]]
    assert ids == ["slide_1", "slide_1-2", "SLIDE_1-3", "_etc_passwd", "image", "ok.v2", "_"]
    assert taken == set(ids)
    assert all(not i.startswith(".") for i in ids)
