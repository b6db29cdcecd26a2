"""pipeline.ingest, the typed library: reports, reruns, a bad file among good ones, callbacks, option validation.
The command line over it is tested in tests/jobs/test_ingest.py."""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from pathlib import Path

import dask.array as da
import numpy as np
import pytest

from pipeline import megapixel_mnist as mm
from pipeline.ingest import (IngestTask, Loaded, Outcome, WriteOptions, ingest_generated, ingest_one, ingest_sources,
                             run_ingest, source_tasks)
from pipeline.manifest import read_manifest
from pipeline.pyramid import GATS_FORMAT, open_pyramid
from tests.pipeline.files import open_fds, rgb, truncate, write_png, write_tiled_tiff

TINY = WriteOptions(chunk=64, min_size=32, patch_size=16)
CONFIG = mm.MegapixelMNISTConfig(size=160, n_digits=3, n_noise=2, seed=1)


@pytest.mark.network  # ingest_generated draws real MNIST digits (pipeline.megapixel_mnist.load_bank)
def test_generated_report_matches_manifest_and_a_rerun_skips_all(tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    started: list[int] = []
    seen: list[Outcome] = []
    report = ingest_generated(root, CONFIG, n_train=2, n_test=1, options=TINY, workers=2,
                              on_start=started.append, on_image=seen.append)
    assert report.complete and report.failed == () and report.root == root
    assert started == [3] and sorted(o.row.image_id for o in seen) == sorted(o.row.image_id for o in report.outcomes)
    rows, classes = read_manifest(root)
    assert classes == tuple(str(d) for d in range(10))
    assert [o.row for o in report.outcomes] == rows  # task order = manifest order
    assert [r.image_id for r in rows] == ["mmnist-train-00000", "mmnist-train-00001", "mmnist-test-00000"]
    assert all(r.status == "complete" and (r.height, r.width, r.channels) == (160, 160, 1) for r in rows)
    assert [r.label for r in rows] == [mm.label_for(CONFIG, r.split, int(r.image_id[-5:])) for r in rows]
    assert not any(o.skipped for o in report.outcomes)
    assert report.summary().startswith(f"3/3 images complete in {root} (0 already complete, skipped)")

    again = ingest_generated(root, CONFIG, n_train=2, n_test=1, options=TINY)
    assert again.complete and all(o.skipped for o in again.outcomes)
    assert [o.row for o in again.outcomes] == rows and read_manifest(root)[0] == rows
    assert "(3 already complete, skipped)" in again.summary()


def test_sources_with_one_bad_file_reports_it_and_completes_the_rest(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    write_png(src / "a.png", rgb(40, 50, seed=1))
    truncate(write_png(src / "b.png", rgb(60, 60, seed=2)))
    np.save(src / "c.npy", rgb(30, 20, seed=3))
    root = str(tmp_path / "root")
    seen: list[Outcome] = []
    report = ingest_sources(root, [str(src)], label="cat", options=TINY, on_image=seen.append)
    assert len(seen) == 3 and not report.complete
    assert [(o.row.image_id, o.row.status) for o in report.outcomes] == [
        ("a", "complete"), ("b", "failed"), ("c", "complete")]
    (bad,) = report.failed
    assert bad.image_id == "b" and bad.error.startswith("CorruptImageError:") and bad.label == "cat"
    assert "1 failed:" in report.summary() and f"  b ({src / 'b.png'}): CorruptImageError" in report.summary()
    rows, classes = read_manifest(root)  # written although an image failed
    assert classes == ("cat",) and [r.status for r in rows] == ["complete", "failed", "complete"]
    assert np.array_equal(open_pyramid(root, "a").arrays[0][:], rgb(40, 50, seed=1).transpose(2, 0, 1))


def test_a_complete_pyramid_of_an_older_format_is_rewritten_not_skipped(tmp_path: Path, caplog) -> None:
    src = tmp_path / "src"
    src.mkdir()
    pixels = rgb(70, 90, seed=4)
    write_png(src / "a.png", pixels)
    root = str(tmp_path / "root")
    assert ingest_sources(root, [str(src)], options=TINY).complete
    assert ingest_sources(root, [str(src)], options=TINY).outcomes[0].skipped  # same source, current format: kept
    zarr_json = tmp_path / "root" / "images" / "a.zarr" / "zarr.json"
    meta = json.loads(zarr_json.read_text())
    assert meta["attributes"]["gats"]["format"] == GATS_FORMAT == 3
    meta["attributes"]["gats"]["format"] = 1  # as written before exact level factors
    zarr_json.write_text(json.dumps(meta))

    with caplog.at_level(logging.INFO, logger="pipeline.ingest"):
        again = ingest_sources(root, [str(src)], options=TINY)
    (outcome,) = again.outcomes
    assert outcome.row.status == "complete" and not outcome.skipped
    assert f"a: the stored pyramid has gats.format 1, not the current {GATS_FORMAT}" in caplog.text
    assert json.loads(zarr_json.read_text())["attributes"]["gats"]["format"] == GATS_FORMAT
    assert np.array_equal(open_pyramid(root, "a").arrays[0][:], pixels.transpose(2, 0, 1))
    assert ingest_sources(root, [str(src)], options=TINY).outcomes[0].skipped  # rewritten: kept from now on


def test_band_statistics_reach_the_manifest_also_for_pyramids_kept_from_before_them(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    pixels = rgb(70, 90, seed=5)  # (h, w, 3) uint8: below STATS_MAX_PX, so level 0 is the stats level
    write_png(src / "a.png", pixels)
    root = str(tmp_path / "root")
    assert ingest_sources(root, [str(src)], options=TINY).complete
    (row,) = read_manifest(root)[0]
    unit = pixels.reshape(-1, 3).astype(np.float64) / 255
    np.testing.assert_allclose(row.band_mean, unit.mean(0), rtol=1e-12)
    np.testing.assert_allclose(row.band_std, unit.std(0), rtol=1e-12)
    zarr_json = tmp_path / "root" / "images" / "a.zarr" / "zarr.json"
    meta = json.loads(zarr_json.read_text())
    del meta["attributes"]["gats"]["band_stats"]  # a pyramid written before band statistics
    zarr_json.write_text(json.dumps(meta))
    again = ingest_sources(root, [str(src)], options=TINY)
    assert again.outcomes[0].skipped and read_manifest(root)[0] == [row]  # kept, and its row has them again
    assert "band_stats" not in json.loads(zarr_json.read_text())["attributes"]["gats"]  # nothing written back


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc/self/fd")
def test_the_source_file_is_closed_once_its_pyramid_is_written(tmp_path: Path) -> None:
    path = write_tiled_tiff(tmp_path / "t.tif", rgb(200, 150, seed=9), tile=64)
    (task,) = source_tasks([str(path)], label="a", split="train", fill=None)
    kept: list[Loaded] = []

    def load() -> Loaded:  # keeps the opened image (and with it the file object) alive past the write
        kept.append(task.load())
        return kept[-1]

    outcome = ingest_one(str(tmp_path / "root"), dataclasses.replace(task, load=load), TINY)
    assert outcome.row.status == "complete" and kept[0].source is not None
    assert open_fds(path) == 0  # the writer closed the handle that computing the pixels opened


@pytest.mark.parametrize("kwargs, words", [
    ({"chunk": 0}, ["chunk (--chunk)", ">= 1", "Got 0", "the default is 256"]),
    ({"downsample": 1}, ["downsample (--downsample)", ">= 2", "the default is 2"]),
    ({"patch_size": -3}, ["patch_size (--patch-size)", "the default is 32"]),
    ({"chunk": 64, "shards": 100}, ["shards (--shards)", "multiple of chunk=64", "e.g. 256"]),
    ({"fill": -1}, ["fill (--fill)", ">= 0"]),
    ({"max_levels": 0}, ["max_levels (--max-levels)", "None for no cap"]),
    ({"mpp": -0.5}, ["mpp (--mpp)", "micrometres per pixel", "0.5 (20x)"]),
    ({"mpp": float("inf")}, ["mpp (--mpp)"]),
])
def test_write_options_reject_bad_values_naming_the_fix(kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as exc:
        WriteOptions(**kwargs)
    assert all(w in str(exc.value) for w in words), str(exc.value)


def test_bad_arguments_raise_before_anything_is_written(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with pytest.raises(ValueError, match="n_train and/or n_test"):
        ingest_generated(str(root), CONFIG, n_train=0, n_test=0)
    with pytest.raises(ValueError, match="split"):
        ingest_sources(str(root), [str(tmp_path)], split="validation")
    with pytest.raises(ValueError, match="list of SOURCE"):
        ingest_sources(str(root), str(tmp_path))  # a bare string, not a list
    with pytest.raises(ValueError, match="workers"):
        ingest_sources(str(root), [str(tmp_path / "x.png")], workers=0)
    assert not root.exists()


def _task(load) -> IngestTask:
    return IngestTask(image_id="x", source="x.png", label="a", split="train", identity="x", load=load)


def test_ingest_one_turns_an_error_into_a_failed_row_but_lets_memory_errors_through(tmp_path: Path) -> None:
    def broken() -> Loaded:
        raise RuntimeError("decoder exploded")

    def exhausted() -> Loaded:
        raise MemoryError

    outcome = ingest_one(str(tmp_path), _task(broken), TINY)
    assert outcome.row.status == "failed" and outcome.row.error == (
        "RuntimeError: decoder exploded (while reading or writing 'x.png')")
    with pytest.raises(MemoryError):
        ingest_one(str(tmp_path), _task(exhausted), TINY)
    ok = ingest_one(str(tmp_path), _task(lambda: Loaded(da.zeros((1, 40, 40), dtype=np.uint8))), TINY)
    assert ok.row.status == "complete" and not ok.skipped


def test_an_interrupt_cancels_queued_images_and_writes_no_manifest(tmp_path: Path) -> None:
    gate, opened = threading.Event(), []

    def load(i: int):
        def opened_now() -> Loaded:
            opened.append(i)
            if i:
                gate.wait(10)
                time.sleep(0.2)  # time for the interrupt to cancel what is still queued
            return Loaded(da.zeros((1, 40, 40), dtype=np.uint8))
        return opened_now

    def interrupt(outcome: Outcome) -> None:
        gate.set()
        raise KeyboardInterrupt

    tasks = [IngestTask(image_id=f"x{i}", source=f"x{i}", label="a", split="train", identity=f"x{i}", load=load(i))
             for i in range(4)]
    with pytest.raises(KeyboardInterrupt):
        run_ingest(str(tmp_path / "root"), tasks, ["a"], options=TINY, workers=1, on_image=interrupt)
    assert opened[0] == 0 and set(opened) <= {0, 1}  # x2 and x3 never started
    assert not (tmp_path / "root" / "manifest.parquet").exists()


def test_mpp_fills_in_a_missing_resolution_and_a_csv_column_replaces_it(tmp_path: Path) -> None:
    """--mpp (WriteOptions.mpp) is recorded for files that record none: a rerun that adds or changes it records it
    without rewriting a pixel, and one without it keeps the stored value; the CSV's mpp column replaces it. The value
    and its source reach the manifest, gats.extra.mpp_source and the OME-NGFF scales (micrometer) of the image and of
    its mask label."""
    import zarr

    np.save(tmp_path / "plain.npy", rgb(64, 64, 1))  # .npy records no resolution
    root = str(tmp_path / "root")
    tiny = WriteOptions(chunk=32, min_size=16, mask="nodata", nodata=0)
    image = tmp_path / "root" / "images" / "plain.zarr"

    def mpp_of(image_id: str) -> float | None:
        return {r.image_id: r.mpp for r in read_manifest(root)[0]}[image_id]

    def chunks() -> dict[str, int]:  # every stored chunk and its modification time: what a rewrite would change
        return {str(p.relative_to(image)): p.stat().st_mtime_ns for p in image.rglob("*") if "/c/" in str(p)}

    def ingest(mpp: float | None = None, sources: str = "plain.npy"):
        report = ingest_sources(root, [str(tmp_path / sources)], options=dataclasses.replace(tiny, mpp=mpp))
        assert report.complete, report.summary()
        return [o.skipped for o in report.outcomes]

    def scales() -> tuple[list[float], list[float], str]:
        group = zarr.open_group(str(image), mode="r")
        ome = group.attrs["ome"]["multiscales"][0]
        label = group["labels"]["tissue"].attrs["ome"]["multiscales"][0]
        return (ome["datasets"][1]["coordinateTransformations"][0]["scale"][1:],
                label["datasets"][0]["coordinateTransformations"][0]["scale"][1:], ome["axes"][1].get("unit", ""))

    assert ingest() == [False] and mpp_of("plain") is None
    assert scales() == ([2.0, 2.0], [1.0, 1.0], "")  # level 1 in level-0 pixels; the mask at full size
    written = chunks()
    assert len(written) > 4
    assert ingest(0.5) == [True] and mpp_of("plain") == 0.5  # recorded in place: the pixels stay
    assert chunks() == written and scales() == ([1.0, 1.0], [0.5, 0.5], "micrometer")  # 0.5 x 2; 0.5 x 1
    gats = zarr.open_group(str(image), mode="r").attrs["gats"]
    assert gats["mpp"] == 0.5 and gats["extra"]["mpp_source"] == "option" and gats["complete"] is True
    assert ingest(0.5) == [True] and ingest() == [True] and mpp_of("plain") == 0.5  # same, or none given: kept
    assert ingest(0.25) == [True] and mpp_of("plain") == 0.25  # a corrected --mpp
    (tmp_path / "list.csv").write_text("path,label,mpp\nplain.npy,x,0.3\n")
    assert ingest(0.5, "list.csv") == [True] and mpp_of("plain") == 0.3  # the CSV replaces it
    assert zarr.open_group(str(image), mode="r").attrs["gats"]["extra"]["mpp_source"] == "csv"
    assert chunks() == written
    assert np.array_equal(open_pyramid(root, "plain").arrays[0][:], np.load(tmp_path / "plain.npy").transpose(2, 0, 1))
