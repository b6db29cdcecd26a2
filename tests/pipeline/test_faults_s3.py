"""The pipeline against a misbehaving object store: a real moto S3 server behind pipeline.fault_proxy, which resets
connections, answers 500/503 and truncates bodies with seeded probabilities, or dies outright.

- a flaky store (~17% of requests faulted, each fault clearing on retry) changes nothing: pyramids, every level and
  checksum, equal a clean ingest to another prefix, and patch reads return the clean pixels;
- a store that dies mid-ingest stops it within seconds with one clear reason naming the endpoint, no image marked
  complete that is not, and a rerun once it is back finishes the rest and skips what was complete;
- a transient fault on a delete (zarr deleting a chunk that became empty, the old copy deleted before a rewrite) is
  retried like any other request.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import dask.array as da
import numpy as np
import pytest
import zarr

from pipeline import megapixel_mnist as mm
from pipeline.errors import StorageError
from pipeline.fault_proxy import FAULT_KINDS, FaultPlan, FaultProxy, is_delete
from pipeline.ingest import WriteOptions, ingest_generated
from pipeline.local_s3 import BUCKET
from pipeline.manifest import read_manifest
from pipeline.pyramid import is_complete, open_pyramid, write_pyramid
from pipeline.reader import PatchReader
from pipeline.storage import DEFAULT_RETRY, RETRY_TOTALS, Storage

pytestmark = pytest.mark.network  # the images are drawn from real MNIST digits (GATS_CACHE)

CONFIG = mm.MegapixelMNISTConfig(size=192, n_digits=3, n_noise=4, seed=5)
OPTIONS = WriteOptions(chunk=64, min_size=48)  # 192 -> 96 -> 48: 3 levels, 9 + 4 + 1 chunks
N_TRAIN, N_TEST = 6, 2
IDS = [mm.image_id("train", i) for i in range(N_TRAIN)] + [mm.image_id("test", i) for i in range(N_TEST)]
# ~17% of requests: every kind, each request failing at most once (faults that clear on retry: a flaky network)
FLAKY = FaultPlan(reset=0.06, http_500=0.05, http_503=0.05, truncate=0.1, seed=7, max_per_request=1)


@dataclass(frozen=True)
class Clean:
    """A clean ingest of the same images (no proxy): its root, every level of every image, and the checksums."""

    root: str
    levels: dict[str, list[np.ndarray]]
    checksums: dict[str, str]


@pytest.fixture(scope="module")
def clean(s3_server: str) -> Clean:
    root = f"s3://{BUCKET}/clean-{uuid.uuid4().hex[:8]}"
    report = ingest_generated(root, CONFIG, n_train=N_TRAIN, n_test=N_TEST, options=OPTIONS, workers=2)
    assert report.complete, report.summary()
    pyramids = {i: open_pyramid(root, i) for i in IDS}
    return Clean(root, {i: [np.asarray(a[:]) for a in p.arrays] for i, p in pyramids.items()},
                 {i: p.info.checksum for i, p in pyramids.items()})


@pytest.fixture()
def proxy(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """A pass-through proxy in front of the moto server; every S3 request of the test goes through it."""
    with FaultProxy(s3_server) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        yield p


def assert_matches_clean(root: str, image_id: str, clean: Clean) -> None:
    pyramid = open_pyramid(root, image_id)
    assert pyramid.info.checksum == clean.checksums[image_id], image_id
    assert len(pyramid.arrays) == len(clean.levels[image_id]) == 3, image_id
    for level, (got, want) in enumerate(zip(pyramid.arrays, clean.levels[image_id])):
        assert np.array_equal(got[:], want), f"{image_id} level {level}"


def test_a_flaky_store_changes_nothing_ingest_equals_a_clean_one(clean: Clean, proxy: FaultProxy) -> None:
    root = f"s3://{BUCKET}/flaky-{uuid.uuid4().hex[:8]}"
    proxy.set_plan(FLAKY)
    retried = RETRY_TOTALS.retried
    report = ingest_generated(root, CONFIG, n_train=N_TRAIN, n_test=N_TEST, options=OPTIONS, workers=2)
    stats = proxy.stats()
    print(f"\nflaky ingest of {len(IDS)} images: {stats}; retried by RetryPolicy: {RETRY_TOTALS.retried - retried}")
    assert report.complete and report.stopped is None and report.manifest_error is None, report.summary()
    assert all(stats.by_kind()[k] > 0 for k in FAULT_KINDS), stats  # every kind of fault really happened
    assert stats.faults >= 0.1 * stats.requests, stats
    assert RETRY_TOTALS.retried > retried

    proxy.pause()  # compare what is stored, not the retries of the comparison
    for image_id in IDS:
        assert_matches_clean(root, image_id, clean)
    rows = {r.image_id: r for r in read_manifest(root)[0]}
    assert {i: (r.status, r.checksum) for i, r in rows.items()} == {i: ("complete", clean.checksums[i]) for i in IDS}


def _expected(level: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The level-l patch (C, h, w) of a level-l box, zeros (the fill) outside the image."""
    y0, x0, h, w = box
    out = np.zeros((level.shape[0], h, w), dtype=level.dtype)
    ys, xs = slice(max(y0, 0), min(y0 + h, level.shape[1])), slice(max(x0, 0), min(x0 + w, level.shape[2]))
    out[:, ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0] = level[:, ys, xs]
    return out


def test_patch_reads_through_a_flaky_store_return_the_clean_pixels(clean: Clean, proxy: FaultProxy) -> None:
    proxy.set_plan(FaultPlan(reset=0.06, http_500=0.06, http_503=0.04, truncate=0.1, seed=11, max_per_request=1))
    retried = RETRY_TOTALS.retried
    reader = PatchReader(clean.root)
    boxes = np.array([[0, 0, 64, 64], [40, 100, 64, 64], [-24, 160, 64, 64], [152, -8, 64, 64]])  # (y0, x0, h, w)
    for image_id in IDS:
        for level in range(3):
            f = 2**level  # the boxes are multiples of 8: exact on every level
            got = reader.read(image_id, boxes, level=level)  # (n, C, 64/f, 64/f)
            want = [_expected(clean.levels[image_id][level], tuple(int(v) // f for v in b)) for b in boxes]
            assert np.array_equal(got, np.stack(want)), (image_id, level)
        assert np.array_equal(reader.low_res(image_id, 2), clean.levels[image_id][2])
    stats = proxy.stats()
    print(f"\npatch reads: {stats}; retried by RetryPolicy: {RETRY_TOTALS.retried - retried}")
    assert stats.faults > 0 and stats.truncate > 0 and RETRY_TOTALS.retried > retried


def test_a_store_that_dies_mid_ingest_stops_it_fast_and_a_rerun_finishes(clean: Clean, proxy: FaultProxy) -> None:
    root = f"s3://{BUCKET}/dies-{uuid.uuid4().hex[:8]}"
    proxy.kill_after(200)  # one image is ~80 requests: the endpoint dies while the third is being written
    t0 = time.perf_counter()
    report = ingest_generated(root, CONFIG, n_train=N_TRAIN, n_test=N_TEST, options=OPTIONS, workers=2,
                              max_storage_failures=3)
    returned = time.monotonic()
    elapsed = time.perf_counter() - t0
    summary = report.summary()
    assert proxy.killed and proxy.killed_at is not None
    stop_s = returned - proxy.killed_at
    print(f"\nendpoint killed after 200 requests; run_ingest returned {stop_s:.2f} s after the kill "
          f"({elapsed:.2f} s after it started):\n{summary}")
    assert stop_s < 10 and elapsed < 30
    assert report.stopped is not None and report.stopped.startswith(f"storage unreachable: {proxy.url} ")
    assert summary.count("storage unreachable") == 1 and proxy.url in summary  # the reason once, not per image
    assert report.manifest_error is not None and report.manifest_error.startswith("manifest not written: ")
    assert report.manifest_error.endswith("re-run ingest when the storage is back")
    assert "manifest: NOT written" in summary
    held = [o for o in report.outcomes if o.storage_failed or o.not_finished]
    assert len(held) >= 3 and f"{len(held)} not written because of the stop" in summary
    assert not any(f"  {o.row.image_id} (" in summary for o in held)  # grouped into one line, not one per image
    assert [o.row.image_id for o in report.outcomes] == IDS

    proxy.revive()
    complete = [i for i in IDS if is_complete(root, i)]
    print(f"complete when the endpoint died: {complete}")
    assert 1 <= len(complete) < len(IDS)
    reported = {o.row.image_id for o in report.outcomes if o.row.status == "complete"}
    assert reported <= set(complete)  # what the report calls complete is marked complete ...
    for image_id in complete:  # ... and whatever is marked complete is whole and right
        assert_matches_clean(root, image_id, clean)

    again = ingest_generated(root, CONFIG, n_train=N_TRAIN, n_test=N_TEST, options=OPTIONS, workers=2)
    assert again.complete and again.stopped is None and again.manifest_error is None, again.summary()
    assert sorted(o.row.image_id for o in again.outcomes if o.skipped) == sorted(complete)
    for image_id in IDS:
        assert_matches_clean(root, image_id, clean)
    assert [r.status for r in read_manifest(root)[0]] == ["complete"] * len(IDS)


def test_a_transient_fault_on_a_delete_is_retried(s3_root: str, proxy: FaultProxy) -> None:
    # zarr deletes a chunk that becomes all fill (write_empty_chunks is off by default): one DELETE request
    proxy.set_plan(FaultPlan(http_500=1.0, only=is_delete, limit=1))  # the first delete request fails, once
    retried = RETRY_TOTALS.retried
    array = zarr.create_array(Storage(s3_root).zarr_store("a"), shape=(8, 8), chunks=(4, 4), dtype="uint8",
                              fill_value=0)
    array[:] = 7
    assert Storage(s3_root).exists("a/c/0/0")
    array[:4, :4] = 0  # chunk (0, 0) is all fill now: zarr deletes its key
    assert proxy.stats().http_500 == 1 and RETRY_TOTALS.retried > retried  # it failed, and was retried
    assert not Storage(s3_root).exists("a/c/0/0") and Storage(s3_root).exists("a/c/1/1")
    want = np.full((8, 8), 7, dtype=np.uint8)
    want[:4, :4] = 0
    assert np.array_equal(array[:], want)

    # rewriting a pyramid deletes the old copy first (its complete marker with it): same retries
    old, new = (np.random.default_rng(s).integers(0, 256, (1, 100, 100), dtype=np.uint8) for s in (1, 2))
    write_pyramid(s3_root, "img", da.from_array(old), chunk=32)
    proxy.reset_stats()
    proxy.set_plan(FaultPlan(http_500=1.0, only=is_delete, limit=1))
    write_pyramid(s3_root, "img", da.from_array(new), chunk=32)
    assert proxy.stats().http_500 == 1
    assert np.array_equal(open_pyramid(s3_root, "img").arrays[0][:], new)

    # a fault that outlasts the retries is a StorageError naming the key, and the chunk is still there
    proxy.reset_stats()
    proxy.set_plan(FaultPlan(http_500=1.0, only=is_delete, limit=DEFAULT_RETRY.attempts))
    with pytest.raises(StorageError, match=r"c/1/1.*failed after 4 attempt"):
        array[4:, 4:] = 0
    assert proxy.stats().http_500 == DEFAULT_RETRY.attempts and Storage(s3_root).exists("a/c/1/1")


def test_training_through_a_flaky_store_equals_training_through_a_clean_one(clean: Clean, proxy: FaultProxy,
                                                                            tmp_path) -> None:
    """The smoke training of issue 15: the per-worker loop (no Ray) on the S3 root, once with the proxy passing
    everything and once with ~20% of requests faulted: the same losses, errors and weights, bit for bit."""
    import torch

    from tests.training.test_loop import tiny_config
    from training import checkpoint
    from training.loop import train_loop
    from training.session import LocalSession

    cfg = tiny_config(clean.root, data={"max_test": 2}, optim={"epochs": 2})
    runs = {}
    for name, plan in (("clean", None), ("flaky", FaultPlan(reset=0.06, http_500=0.05, http_503=0.04, truncate=0.08,
                                                           seed=13, max_per_request=1))):
        if plan is None:
            proxy.pause()
        else:
            proxy.set_plan(plan)
            proxy.resume()
        before = proxy.stats()
        session = LocalSession(tmp_path / name)
        train_loop({"config": cfg.to_dict(), "run_id": ""}, session)
        runs[name] = (session.reports, checkpoint.load(tmp_path / name / "epoch_0002"), proxy.stats().faults
                      - before.faults)
    (clean_reports, clean_ckpt, _), (flaky_reports, flaky_ckpt, faults) = runs["clean"], runs["flaky"]
    print(f"\nsmoke training through the flaky store: {faults} faults injected")
    assert faults > 0
    keys = ("epoch", "train_loss", "train_error", "test_error")
    assert [{k: r[k] for k in keys} for r in flaky_reports] == [{k: r[k] for k in keys} for r in clean_reports]
    assert all(torch.equal(flaky_ckpt.model[k], v) for k, v in clean_ckpt.model.items())
