"""jobs/ingest.py end to end: mixed sources with failures, CSVs, the generator, reruns, a SIGKILL, real files, S3."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import zarr
from PIL import Image

from jobs.ingest import build_parser, main
from jobs.progress import Progress
from pipeline import megapixel_mnist as mm
from pipeline.ingest import Outcome, WriteOptions
from pipeline.manifest import ManifestRow, read_manifest, read_manifest_table
from pipeline.pyramid import open_pyramid
from pipeline.reader import PatchReader
from tests.pipeline.files import rgb, truncate, write_png, write_tiled_tiff

REPO = Path(__file__).resolve().parents[2]
FAST = ["--no-progress", "--workers", "2", "--chunk", "64", "--min-size", "32", "--patch-size", "16"]


def level0(root: str, image_id: str) -> np.ndarray:
    return np.asarray(open_pyramid(root, image_id).arrays[0][:])


def rows_by_id(root: str) -> dict:
    return {r.image_id: r for r in read_manifest(root)[0]}


@pytest.fixture()
def mixed(tmp_path: Path) -> Path:
    """A folder with a PNG, a tiled TIFF, an .npy, a truncated PNG and a too-small PNG."""
    d = tmp_path / "src"
    d.mkdir()
    write_png(d / "photo.png", rgb(100, 130, seed=1))
    write_tiled_tiff(d / "scan.tif", rgb(150, 90, seed=2), tile=32)
    np.save(d / "array.npy", np.random.default_rng(3).integers(0, 60000, (3, 70, 80), dtype=np.uint16))
    truncate(write_png(d / "broken.png", rgb(120, 120, seed=4)))
    write_png(d / "tiny.png", rgb(10, 12, seed=5))
    return d


def test_mixed_folder_completes_the_good_and_names_the_bad(mixed: Path, tmp_path: Path, capsys) -> None:
    root = str(tmp_path / "root")
    assert main(["--out", root, str(mixed), *FAST]) == 1
    summary = capsys.readouterr().out
    assert "3/5 images complete" in summary and "2 failed" in summary
    assert "broken (" in summary and "CorruptImageError" in summary
    assert "tiny (" in summary and "ImageTooSmallError" in summary and "--patch-size" in summary
    rows = rows_by_id(root)
    assert list(rows) == ["array", "broken", "photo", "scan", "tiny"]  # sorted folder order
    assert {i: r.status for i, r in rows.items()} == {"array": "complete", "broken": "failed", "photo": "complete",
                                                      "scan": "complete", "tiny": "failed"}
    assert rows["broken"].error.startswith("CorruptImageError:") and rows["tiny"].error.startswith("ImageTooSmallError")
    assert (rows["array"].dtype, rows["array"].channels, rows["array"].height, rows["array"].width) == ("uint16", 3, 70, 80)
    assert rows["photo"].source == str(mixed / "photo.png") and rows["photo"].label == "unlabeled"
    assert rows["photo"].levels == 4 and rows["photo"].downsamples[1] == (2.0, 2.0)  # 100x130 .. 25x33 -> 13x17
    assert np.array_equal(level0(root, "photo"), rgb(100, 130, seed=1).transpose(2, 0, 1))
    assert np.array_equal(level0(root, "scan"), rgb(150, 90, seed=2).transpose(2, 0, 1))
    assert np.array_equal(level0(root, "array"), np.load(mixed / "array.npy"))
    assert not (Path(root) / "images" / "broken.zarr").exists()


def test_csv_sources_labels_splits_and_bad_rows(tmp_path: Path, capsys) -> None:
    d = tmp_path / "data"
    (d / "imgs").mkdir(parents=True)
    write_png(d / "imgs" / "a.png", rgb(40, 40, seed=1))
    write_png(d / "imgs" / "b.png", rgb(50, 40, seed=2))
    np.save(d / "c.npy", rgb(40, 60, seed=3))
    (d / "list.csv").write_text("path,label,split\nimgs/a.png,tumour,train\nimgs/b.png,normal,val\nc.npy,tumour,\n"
                                "imgs/missing.png,normal,test\nimgs/a.png,,test\n")
    root = str(tmp_path / "root")
    assert main(["--out", root, str(d / "list.csv"), *FAST]) == 1
    out = capsys.readouterr().out
    assert "ImageNotFoundError" in out and "LabelError" in out and "empty label" in out
    rows, classes = read_manifest(root)
    assert classes == ("normal", "tumour")
    assert [(r.image_id, r.label, r.split, r.status) for r in rows] == [
        ("a", "tumour", "train", "complete"), ("b", "normal", "val", "complete"), ("c", "tumour", "train", "complete"),
        ("missing", "normal", "test", "failed"), ("a-2", "", "test", "failed")]
    assert np.array_equal(level0(root, "c"), rgb(40, 60, seed=3).transpose(2, 0, 1))


def test_csv_with_wrong_header_exits_2_naming_the_header(tmp_path: Path, capsys) -> None:
    (tmp_path / "l.csv").write_text("file,class\nx.png,1\n")
    assert main(["--out", str(tmp_path / "root"), str(tmp_path / "l.csv"), "--no-progress"]) == 2
    assert "path,label[,split]" in capsys.readouterr().err


@pytest.mark.network
def test_generator_tiny(tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    args = ["--out", root, "--generate", "megapixel-mnist", "--size", "200", "--n-train", "4", "--n-test", "2",
            "--n-noise", "10", "--seed", "3", "--no-progress", "--min-size", "64"]
    assert main(args) == 0
    table, classes = read_manifest_table(root)
    assert classes == tuple(str(d) for d in range(10))
    rows = read_manifest(root)[0]
    assert [(r.image_id, r.split) for r in rows] == [(f"mmnist-train-{i:05d}", "train") for i in range(4)] + [
        (f"mmnist-test-{i:05d}", "test") for i in range(2)]
    config = mm.MegapixelMNISTConfig(size=200, n_noise=10, seed=3)
    banks = {"train": mm.load_bank("train"), "test": mm.load_bank("test")}
    for row in rows:
        split, index = row.split, int(row.image_id[-5:])
        expected = mm.make_image(banks[split], split, index, config)
        assert row.label == expected.label and (row.height, row.width, row.channels, row.levels) == (200, 200, 1, 3)
        assert np.array_equal(level0(root, row.image_id), expected.image)
        gats = zarr.open_group(row.uri, mode="r").attrs["gats"]
        digits = [d[4] for d in gats["extra"]["digits_yxhw_digit"]]
        assert digits.count(int(row.label)) == 3 and len(gats["extra"]["noise_yxhw"]) == 10
    assert main(args) == 0  # rerun: everything already complete


@pytest.mark.network
def test_generator_n_classes_limits_labels_digits_and_manifest_classes(tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    assert main(["--out", root, "--generate", "megapixel-mnist", "--size", "200", "--n-train", "6", "--n-test", "0",
                 "--n-digits", "3", "--n-noise", "2", "--n-classes", "2", "--no-progress", "--min-size", "64"]) == 0
    _, classes = read_manifest_table(root)
    assert classes == ("0", "1")
    for row in read_manifest(root)[0]:
        assert row.label in classes and row.status == "complete"
        digits = [d[4] for d in zarr.open_group(row.uri, mode="r").attrs["gats"]["extra"]["digits_yxhw_digit"]]
        assert set(digits) <= {0, 1} and digits.count(int(row.label)) == 2


def test_rerun_skips_complete_force_rewrites_and_changed_sources_are_redone(mixed: Path, tmp_path: Path,
                                                                          capsys) -> None:
    root = str(tmp_path / "root")
    sources = [str(mixed / "photo.png"), str(mixed / "array.npy")]
    assert main(["--out", root, *sources, *FAST]) == 0
    first = {i: r.checksum for i, r in rows_by_id(root).items()}
    marker = Path(root) / "images" / "photo.zarr" / "zarr.json"
    stamp = marker.stat().st_mtime_ns
    assert main(["--out", root, *sources, *FAST]) == 0
    assert "(2 already complete, skipped)" in capsys.readouterr().out and marker.stat().st_mtime_ns == stamp
    assert {i: r.checksum for i, r in rows_by_id(root).items()} == first
    assert main(["--out", root, *sources, *FAST, "--force"]) == 0
    assert "(0 already complete" in capsys.readouterr().out
    assert {i: r.checksum for i, r in rows_by_id(root).items()} == first  # same pixels, same checksum
    write_png(mixed / "photo.png", rgb(100, 130, seed=99))  # new content under the same name
    assert main(["--out", root, *sources, *FAST]) == 0
    assert "(1 already complete" in capsys.readouterr().out
    assert np.array_equal(level0(root, "photo"), rgb(100, 130, seed=99).transpose(2, 0, 1))


def test_partial_pyramid_is_redone(mixed: Path, tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    assert main(["--out", root, str(mixed / "photo.png"), *FAST]) == 0
    group = zarr.open_group(str(Path(root) / "images" / "photo.zarr"), mode="r+")
    gats = dict(group.attrs["gats"])
    group.attrs["gats"] = {**gats, "complete": False}  # as if the marker had never been written
    group["0"][:, :10, :10] = 0
    assert main(["--out", root, str(mixed / "photo.png"), *FAST]) == 0
    assert np.array_equal(level0(root, "photo"), rgb(100, 130, seed=1).transpose(2, 0, 1))


def test_sigkill_mid_run_then_rerun_equals_a_clean_run(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        np.save(src / f"img{i}.npy", np.random.default_rng(i).integers(0, 256, (3, 512, 512), dtype=np.uint8))
    args = [str(src), "--no-progress", "--workers", "1", "--chunk", "64", "--min-size", "64"]
    crashed = tmp_path / "crashed"
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "ingest.py"), "--out", str(crashed), *args],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    images = crashed / "images"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if images.is_dir() and any(p.name.endswith(".zarr") and not p.name.startswith(".") for p in images.iterdir()):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "ingest finished before it could be killed; use bigger images"
    done = sorted(p.name for p in images.iterdir() if not p.name.startswith("."))
    assert 1 <= len(done) < 6 and not (crashed / "manifest.parquet").exists()
    assert main(["--out", str(crashed), *args]) == 0
    clean = tmp_path / "clean"
    assert main(["--out", str(clean), *args]) == 0
    crashed_rows, clean_rows = rows_by_id(str(crashed)), rows_by_id(str(clean))
    assert {i: r.checksum for i, r in crashed_rows.items()} == {i: r.checksum for i, r in clean_rows.items()}
    assert len(crashed_rows) == 6 and sorted(p.name for p in images.iterdir()) == [f"img{i}.zarr" for i in range(6)]
    for image_id in crashed_rows:  # every level, not only the checksummed level 0
        a, b = open_pyramid(str(crashed), image_id).arrays, open_pyramid(str(clean), image_id).arrays
        assert len(a) == len(b) and all(np.array_equal(x[:], y[:]) for x, y in zip(a, b))


@pytest.mark.network
def test_real_samples_round_trip_exactly(samples, tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    names = ["cmu_small_region.svs", "slide.tiff", "bmng.jpg"]
    assert main(["--out", root, *[str(samples[n]) for n in names], "--no-progress", "--workers", "2"]) == 0
    rows = rows_by_id(root)
    slide = openslide.OpenSlide(str(samples["cmu_small_region.svs"]))
    expected = {
        "cmu_small_region": np.asarray(slide.read_region((0, 0), 0, slide.dimensions))[..., :3],
        "slide": tifffile.imread(samples["slide.tiff"]),
        "bmng": np.asarray(Image.open(samples["bmng.jpg"])),
    }
    assert rows["cmu_small_region"].mpp == 0.499 and rows["slide"].mpp is None
    reader = PatchReader(root)
    for image_id, pixels in expected.items():
        pyr = open_pyramid(root, image_id)
        assert np.array_equal(pyr.arrays[0][:], pixels.transpose(2, 0, 1)), image_id
        shapes = [a.shape[1:] for a in pyr.arrays]
        assert all(s == (-(-p[0] // 2), -(-p[1] // 2)) for p, s in zip(shapes, shapes[1:]))
        assert max(shapes[-1]) <= 256 and all(a.chunks == (3, 256, 256) for a in pyr.arrays)
        patch = reader.read(image_id, [[300, 400, 50, 70]])[0]  # (C, h, w) through the colleague's reader
        assert np.array_equal(patch, pixels[300:350, 400:470].transpose(2, 0, 1))


@pytest.mark.network
def test_fetch_samples_prints_cached_paths(samples, capsys) -> None:
    assert main(["--fetch-samples"]) == 0
    assert capsys.readouterr().out.split() == [str(p) for p in samples.values()]


@pytest.mark.network
def test_smoke_test_and_bad_command_lines(tmp_path: Path, capsys) -> None:
    assert main(["--smoke-test"]) == 0
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path)])
    assert exc.value.code == 2 and "--out ROOT is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "r"), str(tmp_path), "--generate", "megapixel-mnist", "--n-train", "1"])
    assert main(["--out", str(tmp_path / "r"), "--generate", "megapixel-mnist", "--n-train", "1", "--size", "50"]) == 2


@pytest.mark.network
def test_script_smoke_test_runs_as_a_plain_script(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "ingest.py"), "--smoke-test", "--workers", "2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)  # another cwd: no sys.path help
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert done.stdout.strip().endswith("smoke test passed")


def test_cli_defaults_come_from_the_dataclasses() -> None:
    args = build_parser().parse_args([])
    for options in (WriteOptions(), mm.MegapixelMNISTConfig()):
        assert {f.name: getattr(args, f.name) for f in fields(options)} == {
            f.name: getattr(options, f.name) for f in fields(options)}


def test_bad_write_option_exits_2_naming_the_flag(tmp_path: Path, capsys) -> None:
    root = tmp_path / "root"
    assert main(["--out", str(root), str(tmp_path), "--chunk", "0", "--no-progress"]) == 2
    assert "--chunk" in capsys.readouterr().err and not root.exists()


@pytest.mark.network
def test_progress_off_a_terminal_is_plain_lines_without_carriage_returns(tmp_path: Path, capsys) -> None:
    assert main(["--out", str(tmp_path / "root"), "--generate", "megapixel-mnist", "--size", "160", "--n-train", "3",
                 "--n-digits", "3", "--n-noise", "2", "--chunk", "64", "--min-size", "32", "--workers", "2"]) == 0
    out, err = capsys.readouterr()
    assert "\r" not in out + err
    assert "ingest: 3/3 images (0 failed)" in err and "3/3 images complete" in out
    log = io.StringIO()  # a log file: a line every ~10% of the images and one at the end
    failed = Outcome(ManifestRow(image_id="x", uri="u", source="s", label="", status="failed", error="E: e"), False)
    with Progress(stream=log) as progress:
        progress.start(25)
        for _ in range(25):
            progress.update(failed)
    assert log.getvalue().splitlines() == [f"ingest: {n}/25 images ({n} failed)" for n in (*range(3, 25, 3), 25)]


def test_progress_on_a_terminal_draws_a_bar() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    with Progress(stream=screen) as progress:
        progress.start(2)
        progress.update(Outcome(ManifestRow(image_id="x", uri="u", source="s", label="", status="failed",
                                            error="E: e"), False))
    assert "\r" in screen.getvalue() and "ingest:" in screen.getvalue() and "failed=1" in screen.getvalue()
    assert "images (" not in screen.getvalue()


def test_ingest_to_s3(s3_root: str, mixed: Path) -> None:
    assert main(["--out", s3_root, str(mixed / "photo.png"), str(mixed / "array.npy"), *FAST]) == 0
    rows = rows_by_id(s3_root)
    assert rows["photo"].uri == f"{s3_root}/images/photo.zarr" and rows["photo"].status == "complete"
    assert np.array_equal(PatchReader(s3_root).read("photo", [[0, 0, 100, 130]])[0],
                          rgb(100, 130, seed=1).transpose(2, 0, 1))
    assert main(["--out", s3_root, str(mixed / "photo.png"), str(mixed / "array.npy"), *FAST]) == 0
    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
