"""One contract suite for every storage backend (zarr's StoreTests style): local folder and a real S3 server.

`StorageContract` holds the tests; each subclass supplies `root` for one backend. Covers bytes I/O, pyramid write,
the complete marker, rerun-skip semantics (partial images are not complete and are refused), read back, patch
reads with byte accounting, the manifest, and bounded retries on the same key.
"""
from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pytest
import zarr

from pipeline.errors import ImageNotFoundError, IncompleteImageError, StorageError
from pipeline.manifest import ManifestRow, read_manifest, write_manifest
from pipeline.pyramid import is_complete, open_pyramid, write_pyramid
from pipeline.reader import PatchReader
from pipeline.storage import CountingStore, RetryPolicy, Storage, call_with_retries, image_key


def _image(seed: int = 0, shape: tuple[int, int, int] = (3, 300, 200)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


class StorageContract:
    """Tests every backend must pass; subclasses provide the `root` fixture."""

    def test_bytes_roundtrip(self, root: str) -> None:
        st = Storage(root)
        assert not st.exists("a/b.bin")
        st.write_bytes("a/b.bin", b"hello")
        assert st.exists("a/b.bin") and st.read_bytes("a/b.bin") == b"hello"
        st.write_bytes("a/b.bin", b"bye")  # overwrite is atomic and complete
        assert st.read_bytes("a/b.bin") == b"bye" and st.size("a/b.bin") == 3
        assert st.listdir("a") == ["b.bin"]
        st.delete("a")
        assert not st.exists("a/b.bin")
        st.delete("a")  # deleting twice is fine

    def test_missing_key_is_typed(self, root: str) -> None:
        with pytest.raises(ImageNotFoundError, match="does not exist"):
            Storage(root).read_bytes("nope.bin")

    def test_write_complete_and_read_back(self, root: str) -> None:
        x = _image()
        assert not is_complete(root, "img")
        info = write_pyramid(root, "img", da.from_array(x, chunks=(3, 70, 90)), chunk=64, min_size=50)
        assert is_complete(root, "img")
        assert info.uri == Storage(root).uri(image_key("img"))
        pyr = open_pyramid(root, "img")
        assert pyr.info == info
        np.testing.assert_array_equal(pyr.arrays[0][:], x)
        assert [a.chunks for a in pyr.arrays] == [(3, 64, 64)] * info.levels

    def test_partial_image_is_not_complete_and_is_refused(self, root: str) -> None:
        # What a crash leaves on S3 (and what a foreign writer could leave anywhere): arrays, no marker.
        group = zarr.open_group(Storage(root).zarr_store(image_key("part")), mode="w", zarr_format=3)
        group.create_array("0", shape=(1, 8, 8), dtype="uint8", chunks=(1, 8, 8))[:] = 1
        assert not is_complete(root, "part")
        with pytest.raises(IncompleteImageError, match="re-run jobs/ingest.py"):
            open_pyramid(root, "part")
        with pytest.raises(IncompleteImageError):
            PatchReader(root).read("part", [[0, 0, 4, 4]])
        # A rerun redoes it.
        write_pyramid(root, "part", da.from_array(_image(1, (1, 40, 40))), chunk=16)
        assert is_complete(root, "part")

    def test_failed_write_never_looks_complete(self, root: str) -> None:
        def boom(block: np.ndarray, block_info: dict | None = None) -> np.ndarray:
            if block_info and block_info[0]["chunk-location"] == (0, 1, 1):
                raise RuntimeError("source died")
            return block

        bad = da.from_array(_image(2), chunks=(3, 64, 64)).map_blocks(boom, dtype=np.uint8)
        with pytest.raises(RuntimeError, match="source died"):
            write_pyramid(root, "bad", bad, chunk=64)
        assert not is_complete(root, "bad")
        with pytest.raises((IncompleteImageError, ImageNotFoundError)):
            open_pyramid(root, "bad")

    def test_rewrite_replaces_complete_image(self, root: str) -> None:
        write_pyramid(root, "img", da.from_array(_image(3)), chunk=64)
        x = _image(4)
        info = write_pyramid(root, "img", da.from_array(x), chunk=64)
        np.testing.assert_array_equal(PatchReader(root).low_res("img", 0), x)
        assert open_pyramid(root, "img").info.checksum == info.checksum
        assert [n for n in Storage(root).listdir("images")] == ["img.zarr"]  # no temp leftovers

    def test_patch_reads_and_bytes(self, root: str) -> None:
        x = _image(5)
        write_pyramid(root, "img", da.from_array(x), chunk=64)
        reader = PatchReader(root)
        boxes = np.array([[-20, -20, 50, 50], [280, 180, 50, 50], [100, 60, 50, 50], [500, 500, 50, 50]])
        got = reader.read("img", boxes)
        padded = np.pad(x, ((0, 0), (20, 60), (20, 60)))
        for b, patch in zip(boxes, got):
            y0, x0 = b[0] + 20, b[1] + 20
            ref = padded[:, y0:y0 + 50, x0:x0 + 50] if b[0] < 300 else np.zeros((3, 50, 50), np.uint8)
            np.testing.assert_array_equal(patch, ref)
        touched = {(0, 0), (4, 2), (4, 3), (1, 0), (1, 1), (2, 0), (2, 1)}  # 64-px chunks
        st = Storage(root)
        expected = sum(st.size(f"{image_key('img')}/0/c/0/{cy}/{cx}") for cy, cx in touched)
        assert reader.stats.bytes_read == expected
        assert reader.stats.chunks_read == len(touched)

    def test_manifest_roundtrip(self, root: str) -> None:
        info = write_pyramid(root, "img", da.from_array(_image(6)), chunk=64, mpp=0.5)
        rows = [
            ManifestRow(image_id="img", uri=info.uri, source="/data/img.png", label="tumor", split="test",
                        height=info.height, width=info.width, channels=info.channels, dtype=info.dtype,
                        levels=info.levels, downsamples=info.downsamples, mpp=info.mpp, checksum=info.checksum),
            ManifestRow(image_id="bad", uri="", source="/data/bad.png", label="", status="failed", error="corrupt"),
        ]
        write_manifest(root, rows)
        back, classes = read_manifest(root)
        assert back == rows and classes == ("tumor",)


class TestLocalStorage(StorageContract):
    @pytest.fixture()
    def root(self, local_root: str) -> str:
        return local_root


class TestS3Storage(StorageContract):
    @pytest.fixture()
    def root(self, s3_root: str) -> str:
        return s3_root

    def test_endpoint_comes_from_env(self, root: str, s3_server: str) -> None:
        st = Storage(root)
        st.write_bytes("x.json", json.dumps({"a": 1}).encode())
        import boto3

        bucket, prefix = root[len("s3://"):].split("/", 1)
        body = boto3.client("s3", endpoint_url=s3_server).get_object(Bucket=bucket, Key=f"{prefix}/x.json")["Body"]
        assert json.loads(body.read()) == {"a": 1}


class _FlakyStore(CountingStore):
    """A real store that fails its first `failures` reads of each key with a transient error."""

    def __init__(self, store, failures: int) -> None:  # noqa: ANN001
        super().__init__(store, policy=RetryPolicy(attempts=1))
        self.failures = failures
        self.calls: dict[str, int] = {}

    def _with_store(self, store):  # noqa: ANN001, ANN202 - keep failing after zarr's with_read_only
        flaky = _FlakyStore(store, self.failures)
        flaky.calls = self.calls
        return flaky

    async def get(self, key, prototype, byte_range=None):  # noqa: ANN001, ANN201
        self.calls[key] = self.calls.get(key, 0) + 1
        if self.calls[key] <= self.failures:
            raise ConnectionError(f"transient failure {self.calls[key]} on {key}")
        return await self._store.get(key, prototype, byte_range)


@pytest.mark.parametrize("failures, ok", [(2, True), (3, False)])
def test_transient_errors_retry_same_key_then_fail_typed(local_root: str, failures: int, ok: bool) -> None:
    x = _image(7, (1, 32, 32))
    write_pyramid(local_root, "img", da.from_array(x), chunk=32)
    flaky = _FlakyStore(Storage(local_root).zarr_store(image_key("img"))._store, failures)
    store = CountingStore(flaky, policy=RetryPolicy(attempts=3, base_delay_s=0.001))
    if ok:
        arr = zarr.open_array(store, path="0", mode="r")
        np.testing.assert_array_equal(arr[:], x)
        assert flaky.calls["0/c/0/0/0"] == 3  # the same key, retried
    else:
        with pytest.raises(StorageError, match="zarr.json.*failed after 3 attempt"):
            zarr.open_array(store, path="0", mode="r")


def test_only_transient_errors_are_retried() -> None:
    from botocore.exceptions import EndpointConnectionError

    policy = RetryPolicy(attempts=3, base_delay_s=0.0)
    for exc, raised, n_calls in [(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), StorageError, 3),
                                 (ConnectionResetError("reset"), StorageError, 3),
                                 (FileNotFoundError("gone"), FileNotFoundError, 1),
                                 (KeyError("a bug, not the network"), KeyError, 1)]:
        calls = []

        def fn(exc: BaseException = exc) -> None:
            calls.append(1)
            raise exc

        with pytest.raises(raised):
            call_with_retries(fn, "k", policy)
        assert len(calls) == n_calls, exc
