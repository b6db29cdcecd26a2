"""SOURCE arguments -> entries: folders list their supported images, CSV rows carry labels, splits and typed
errors."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import ImageNotFoundError, LabelError, SourceListError
from pipeline.source_lists import SourceEntry, iter_sources, read_source_list


def test_files_are_taken_as_named_with_their_stem(tmp_path: Path) -> None:
    entries = list(iter_sources([tmp_path / "slide.ome.tiff", "photo.PNG"]))
    assert entries == [SourceEntry(str(tmp_path / "slide.ome.tiff")), SourceEntry("photo.PNG")]
    assert [e.stem for e in entries] == ["slide", "photo"] and not any(e.listed for e in entries)


def test_folder_lists_supported_images_sorted(tmp_path: Path) -> None:
    for name in ["b.png", "a.tif", "c.npy", "notes.txt", ".hidden.png"]:
        (tmp_path / name).write_bytes(b"")
    assert [Path(e.path).name for e in iter_sources([tmp_path])] == ["a.tif", "b.png", "c.npy"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceListError, match="no images"):
        list(iter_sources([tmp_path / "empty"]))


def test_csv_rows_resolve_relative_paths_and_default_split(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "list.csv").write_text("path,label,split\nimgs/a.png,tumour,val\n/abs/b.tif,3,\n\n"
                                               "c.npy,normal,test\n")
    entries = read_source_list(tmp_path / "sub" / "list.csv")
    assert all(e.listed for e in entries)
    assert [(e.path, e.label, e.split, e.error) for e in entries] == [
        (str(tmp_path / "sub" / "imgs" / "a.png"), "tumour", "val", None),
        ("/abs/b.tif", "3", "train", None),
        (str(tmp_path / "sub" / "c.npy"), "normal", "test", None),
    ]
    (tmp_path / "two.csv").write_text("PATH, Label\nx.png,1\n")
    assert [(e.label, e.split) for e in iter_sources([tmp_path / "two.csv"])] == [("1", "train")]


def test_csv_group_column_in_any_order(tmp_path: Path) -> None:
    (tmp_path / "g.csv").write_text("path,label,split,group\na.png,tumour,train,patient-1\nb.png,normal,test,\n"
                                    "c.png,normal,val,site A\n")
    entries = read_source_list(tmp_path / "g.csv")
    assert [(e.label, e.split, e.group, e.error) for e in entries] == [
        ("tumour", "train", "patient-1", None), ("normal", "test", "", None), ("normal", "val", "site A", None)]
    (tmp_path / "o.csv").write_text("Group,label,path\np9,1,x.png\n")
    (entry,) = read_source_list(tmp_path / "o.csv")
    assert (Path(entry.path).name, entry.label, entry.split, entry.group) == ("x.png", "1", "train", "p9")
    assert [e.group for e in iter_sources([tmp_path / "g.csv", tmp_path / "a.png"])] == [
        "patient-1", "", "site A", ""]  # files named on the command line have no group


def test_csv_with_wrong_columns_names_the_expected_header(tmp_path: Path) -> None:
    (tmp_path / "bad.csv").write_text("file,class\nx.png,1\n")
    with pytest.raises(SourceListError, match=r"expected 'path,label\[,split\]\[,group\]\[,mpp\]'"):
        read_source_list(tmp_path / "bad.csv")
    for header in ("path,label,split,patient", "path,split,group", "path,label,label"):
        (tmp_path / "bad.csv").write_text(header + "\nx.png,1,train\n")
        with pytest.raises(SourceListError, match="any order"):
            read_source_list(tmp_path / "bad.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(SourceListError):
        read_source_list(tmp_path / "empty.csv")
    with pytest.raises(ImageNotFoundError):
        read_source_list(tmp_path / "absent.csv")


def test_bad_csv_rows_carry_typed_errors(tmp_path: Path) -> None:
    (tmp_path / "l.csv").write_text("path,label,split\na.png,,train\nb.png,1,holdout\nc.png,1,train,extra\n,2\n")
    errors = [e.error for e in read_source_list(tmp_path / "l.csv")]
    assert isinstance(errors[0], LabelError) and "empty label" in str(errors[0])
    assert isinstance(errors[1], SourceListError) and "train, val, test" in str(errors[1])
    assert isinstance(errors[2], SourceListError) and "Quote" in str(errors[2])
    assert isinstance(errors[3], SourceListError) and "empty path" in str(errors[3])


def test_an_mpp_column_gives_each_image_its_resolution(tmp_path: Path) -> None:
    """The optional mpp column: a positive number per row (empty: the file's own, or --mpp); anything else is that
    row's typed error naming what is expected."""
    (tmp_path / "l.csv").write_text("label,mpp,path\nx,0.25,a.png\nx,,b.png\nx,fast,c.png\nx,-1,d.png\nx,nan,e.png\n")
    entries = read_source_list(tmp_path / "l.csv")
    assert [e.mpp for e in entries[:2]] == [0.25, None] and entries[0].error is None and entries[1].error is None
    for e in entries[2:]:
        assert isinstance(e.error, SourceListError) and "micrometres per pixel" in str(e.error) and e.mpp is None
