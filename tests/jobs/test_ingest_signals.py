"""Ingest stops cleanly: SIGTERM / SIGINT to jobs/ingest.py, the `stop` event of pipeline.ingest.run_ingest behind
them, and the storage circuit breaker seen from the command line.

A stop never leaves an image marked complete that is not: the manifest lists what finished as complete and the rest
as failed rows "not finished: ...", every pyramid that says it is complete has the right pixels on every level, and
a rerun finishes the rest, skipping what was complete.
"""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dask.array as da
import numpy as np
import pytest

from jobs.ingest import build_parser, main
from pipeline import megapixel_mnist as mm
from pipeline.ingest import MAX_STORAGE_FAILURES, IngestTask, Loaded, Outcome, StopRequest, WriteOptions, run_ingest
from pipeline.local_s3 import BUCKET, S3_ENV
from pipeline.manifest import read_manifest
from pipeline.pyramid import downsample_block, is_complete, open_pyramid

REPO = Path(__file__).resolve().parents[2]
N_IMAGES = 10
CONFIG = mm.MegapixelMNISTConfig(size=2000, n_digits=5, n_noise=20, seed=4)  # ~0.3 s per image here, 1 worker
ARGS = ["--generate", "megapixel-mnist", "--n-train", str(N_IMAGES), "--size", str(CONFIG.size), "--n-digits",
        str(CONFIG.n_digits), "--n-noise", str(CONFIG.n_noise), "--seed", str(CONFIG.seed), "--workers", "1",
        "--no-progress"]
IDS = [mm.image_id("train", i) for i in range(N_IMAGES)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def complete_folders(root: Path) -> set[str]:
    """Image ids whose pyramid folder is in place: on a local root a pyramid is renamed there after its marker."""
    images = root / "images"
    if not images.is_dir():
        return set()
    return {p.name[:-len(".zarr")] for p in images.iterdir() if p.name.endswith(".zarr") and not p.name.startswith(".")}


def assert_right_pixels(root: str, image_id: str, bank: mm.DigitBank) -> None:
    """Level 0 is the generated image and each level l >= 1 the 2x2 mean of level l-1 (rounded half up)."""
    want = mm.make_image(bank, "train", int(image_id[-5:]), CONFIG).image  # (1, H, W)
    for level, array in enumerate(open_pyramid(root, image_id).arrays):
        if level:
            want = downsample_block(want, 2)
        assert np.array_equal(array[:], want), f"{image_id} level {level}"


@pytest.mark.network  # the images are drawn from real MNIST digits (GATS_CACHE)
@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_ingest_cleanly_and_a_rerun_finishes(sig: signal.Signals, status: int, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "ingest.py"), "--out", str(root), *ARGS], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not complete_folders(root) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "ingest ended before the signal: use more or bigger images"
        sent = time.monotonic()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
        stop_s = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with capsys.disabled():  # the measured figure, also without -s
        print(f"\n{sig.name}: jobs/ingest.py exited {proc.returncode} {stop_s:.2f} s after the signal")
    assert proc.returncode == status, err[-3000:]
    assert stop_s < 5, f"{stop_s:.1f} s from {sig.name} to exit"
    assert "Traceback" not in err, err[-3000:]
    assert out.count(f"stopped early: interrupted by {sig.name}") == 1 and "manifest: NOT" not in out

    rows = read_manifest(str(root))[0]
    assert [r.image_id for r in rows] == IDS
    done = {r.image_id for r in rows if r.status == "complete"}
    assert 1 <= len(done) < N_IMAGES
    assert done == complete_folders(root) == {i for i in IDS if is_complete(str(root), i)}
    assert all(r.error.startswith(f"not finished: interrupted by {sig.name} (")
               and r.error.endswith("re-run ingest to write it") for r in rows if r.status == "failed")
    assert f"{N_IMAGES - len(done)} not written because of the stop" in out
    bank = mm.load_bank("train")
    for image_id in done:
        assert_right_pixels(str(root), image_id, bank)

    assert main(["--out", str(root), *ARGS]) == 0
    assert f"{N_IMAGES}/{N_IMAGES} images complete in {root} ({len(done)} already complete, skipped)" in (
        capsys.readouterr().out)
    assert [r.status for r in read_manifest(str(root))[0]] == ["complete"] * N_IMAGES
    for image_id in set(IDS) - done:
        assert_right_pixels(str(root), image_id, bank)


def test_stop_lets_nothing_new_start_stops_the_write_in_flight_and_writes_the_manifest(tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    stop = StopRequest()

    def load(i: int):  # noqa: ANN202
        def opened() -> Loaded:
            if i == 1:  # in flight when the stop comes: its write must stop before its first block
                stop.wait(10)
                time.sleep(0.5)  # several of run_ingest's polls: the stop has reached the writers
            return Loaded(da.from_array(np.full((1, 64, 64), i + 1, dtype=np.uint8), chunks=(1, 16, 16)))
        return opened

    def on_image(outcome: Outcome) -> None:
        stop.request("interrupted by the test")

    tasks = [IngestTask(image_id=f"x{i}", source=f"x{i}", label="a", split="train", identity=f"x{i}", load=load(i))
             for i in range(4)]
    t0 = time.perf_counter()
    report = run_ingest(root, tasks, ["a"], options=WriteOptions(chunk=16, min_size=16), workers=1, stop=stop,
                        on_image=on_image)
    assert time.perf_counter() - t0 < 5
    assert report.stopped == "interrupted by the test" and report.manifest_error is None
    assert [(o.row.status, o.not_finished) for o in report.outcomes] == [
        ("complete", False), ("failed", True), ("failed", True), ("failed", True)]
    errors = [o.row.error for o in report.outcomes[1:]]
    assert errors[0] == ("not finished: interrupted by the test (its write stopped before the next block, "
                         "unmarked); re-run ingest to write it")
    assert errors[1:] == ["not finished: interrupted by the test (not started); re-run ingest to write it"] * 2
    assert [is_complete(root, f"x{i}") for i in range(4)] == [True, False, False, False]
    assert [(r.image_id, r.status) for r in read_manifest(root)[0]] == [
        ("x0", "complete"), ("x1", "failed"), ("x2", "failed"), ("x3", "failed")]
    assert report.summary().count("interrupted by the test") == 1


def test_a_dead_endpoint_stops_the_command_with_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there: every connection is refused
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        np.save(src / f"a{i}.npy", np.zeros((1, 40, 40), dtype=np.uint8))
    t0 = time.perf_counter()
    assert main(["--out", f"s3://{BUCKET}/dead", str(src), "--no-progress", "--workers", "1",
                 "--max-storage-failures", "2"]) == 1
    elapsed = time.perf_counter() - t0
    out, err = capsys.readouterr()
    print(f"\nstopped {elapsed:.2f} s after the start:\n{out}")
    assert elapsed < 15 and "Traceback" not in err
    assert out.count(f"storage unreachable: {endpoint} (2 images in a row failed with StorageError)") == 1
    assert "manifest: NOT written" in out and "re-run ingest when the storage is back" in out
    assert "6 not written because of the stop" in out and "failed:" not in out


def test_the_max_storage_failures_flag_default_is_the_library_constant(tmp_path: Path) -> None:
    assert build_parser().parse_args([]).max_storage_failures == MAX_STORAGE_FAILURES == 3
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "root"), str(tmp_path), "--max-storage-failures", "0"])
    assert exc.value.code == 2 and not (tmp_path / "root").exists()
    with pytest.raises(ValueError, match=r"max_storage_failures \(--max-storage-failures\) an integer >= 1"):
        run_ingest(str(tmp_path / "root"), [], [], max_storage_failures=0)


def test_a_second_signal_while_stopping_exits_at_once() -> None:
    script = ("import os, signal, sys, time\n"
              "from jobs.ingest import stop_on_signals\n"
              "from pipeline.ingest import StopRequest\n"
              "stop = StopRequest()\n"
              "with stop_on_signals(stop) as received:\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    time.sleep(0.2)\n"
              "    assert stop.is_set() and stop.reason == 'interrupted by SIGTERM' and received == [signal.SIGTERM]\n"
              "    print('stopping', flush=True)\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    time.sleep(30)\n"
              "sys.exit(0)\n")
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 130 and done.stdout == "stopping\n", done.stderr[-3000:]
    assert "second SIGINT while stopping: exiting now" in done.stderr and time.monotonic() - t0 < 20


def test_a_stopped_rerun_keeps_the_rows_of_images_it_never_looked_at(tmp_path: Path) -> None:
    """Stopping a rerun over a finished dataset must not hide its images: rows the stop kept it from reaching stay
    complete (their pyramids were not touched); only what it stopped in flight is marked not finished."""
    root = str(tmp_path / "root")

    def task(i: int, source: str) -> IngestTask:
        pixels = np.full((1, 32, 32), i + 1, dtype=np.uint8)
        return IngestTask(image_id=f"x{i}", source=source, label="a", split="train", identity=source,
                          load=lambda: Loaded(da.from_array(pixels, chunks=(1, 16, 16))))

    options = WriteOptions(chunk=16, min_size=16)
    assert run_ingest(root, [task(i, f"x{i}") for i in range(3)], ["a"], options=options).complete
    stop = StopRequest()
    stop.request("interrupted by the test")
    again = run_ingest(root, [task(0, "x0"), task(1, "x1"), task(2, "elsewhere")], ["a"], options=options,
                       stop=stop)
    assert again.stopped == "interrupted by the test"
    # x0, x1: same source, never looked at: kept complete; x2 now comes from another source: not finished
    assert [(r.image_id, r.status) for r in read_manifest(root)[0]] == [
        ("x0", "complete"), ("x1", "complete"), ("x2", "failed")]
    assert [o.skipped for o in again.outcomes] == [True, True, False]
