"""How `jobs/train.py` stops (issue 15), run as a user would, the command in a subprocess: SIGTERM stops it cleanly
(exit 143, the MLflow run marked KILLED, the last complete checkpoint intact, named on stderr and resumable), sent
once the first epoch's checkpoint exists, and SIGINT takes the very same path (one handler); a damaged chunk fails
it with one line naming the image (exit 1, run FAILED) instead of training on substitute pixels."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training import checkpoint

PROJECT = Path(__file__).resolve().parents[2]
TINY = ["--set", "model.patch_hw=32", "--set", "model.n_patches=4", "--set", "model.feature_dim=16",
        "--set", "data.low_scale=0.25", "--set", "data.batch_size=4", "--set", "runtime.num_workers=1"]


def _train(data: str, tmp: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "jobs/train.py", "--data", data, "--model", "ats", *TINY,
         "--set", f"runtime.storage_path={tmp / 'ray'}", *extra],
        cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(proc: subprocess.Popen, tmp: Path, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not list((tmp / "ray").glob(f"*/checkpoint_*/{checkpoint.EPOCH_FILE}")):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no checkpoint was written in time"
        time.sleep(0.5)


@pytest.mark.ray
@pytest.mark.slow
def test_sigterm_stops_training_cleanly_and_the_checkpoint_resumes(tiny_data: str, tmp_path: Path) -> None:
    from tests.training.test_loop import tiny_config
    from training.preflight import preflight

    sig = signal.SIGTERM
    proc = _train(tiny_data, tmp_path, "--epochs", "500")
    try:
        _wait_for_checkpoint(proc, tmp_path)
        sent = time.monotonic()
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=90)
        stopped_s = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"{signal.Signals(sig).name}: exited {proc.returncode} after {stopped_s:.1f} s")
    assert proc.returncode == 128 + sig, out[-3000:]
    own = [ln for ln in out.splitlines() if "pid=" not in ln]  # ours, not Ray's worker and controller logs
    assert any(ln.startswith("train: stopped by SIGTERM") for ln in own), out[-3000:]
    assert not any("Traceback" in ln for ln in own), out[-3000:]
    assert stopped_s < 60
    (run,) = _runs(tmp_path)
    assert run.info.status == "KILLED"

    folder = out.split("resume with --resume ")[1].split()[0]
    done = checkpoint.load(folder).epoch  # complete and loadable
    assert done >= 1 and checkpoint.newest_loadable(Path(folder).parent) == folder
    # what `--resume folder --epochs done+1` checks before Ray starts: complete, safe to load, epochs left
    preflight(tiny_config(tiny_data, optim={"epochs": done + 1}, runtime={"resume_from": folder}))


def test_sigint_and_sigterm_take_the_same_path() -> None:
    """Both signals become one KeyboardInterrupt in the main thread, recorded by number (the Ray run above covers
    what that KeyboardInterrupt does); the old handlers come back after."""
    from jobs.train import StopOnSignal

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    for sig in (signal.SIGINT, signal.SIGTERM):
        stop = StopOnSignal()
        try:
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), sig)
                time.sleep(5)  # the handler raises here, in the main thread
            assert stop.signum == sig and stop.name == signal.Signals(sig).name
        finally:
            stop.restore()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def _runs(tmp: Path) -> list:
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.ray
@pytest.mark.slow
def test_a_damaged_chunk_fails_the_run_with_one_line_naming_the_image(tiny_data: str, tmp_path: Path) -> None:
    import shutil

    from pipeline.manifest import read_manifest

    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    victim = next(r.image_id for r in read_manifest(str(root))[0] if r.split == "train")
    for chunk in (root / "images" / f"{victim}.zarr").glob("*/c/0/*/*"):
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0x04
        chunk.write_bytes(bytes(data))
    proc = _train(str(root), tmp_path, "--epochs", "2", "--set", "runtime.max_failures=0")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out[-3000:]
    (line,) = [ln for ln in out.splitlines() if ln.startswith("train: error: ")]
    assert "CorruptChunkError: Chunk " in line and f"of image '{victim}'" in line and "is marked FAILED" in line
    (run,) = _runs(tmp_path)
    assert run.info.status == "FAILED"
