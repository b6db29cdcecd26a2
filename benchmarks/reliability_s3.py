"""Measure ingest against a misbehaving object store: a moto S3 server (started here on 127.0.0.1) behind
pipeline.fault_proxy.

    .venv/bin/python benchmarks/reliability_s3.py --smoke    # seconds; what the test suite runs
    .venv/bin/python benchmarks/reliability_s3.py            # 16 Megapixel MNIST images of 512 px, ~17% faults

Prints two markdown tables:
1. one ingest of N images through the proxy passing everything (clean) vs injecting faults (reset, HTTP 500, HTTP
   503, truncated bodies; each request fails at most once, as on a flaky network): requests, faults by kind,
   operations retried by RetryPolicy, wall time, and whether every level of every pyramid and every checksum of the
   faulty ingest equals the clean one;
2. the endpoint killed mid-ingest: time from the kill to run_ingest returning its report (no new image started,
   writes in flight stopped), the stop reason, and a rerun once the endpoint is back (time, images skipped).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import load_average  # noqa: E402
from pipeline import megapixel_mnist as mm  # noqa: E402
from pipeline.fault_proxy import FaultPlan, FaultProxy  # noqa: E402
from pipeline.ingest import IngestReport, WriteOptions, ingest_generated  # noqa: E402
from pipeline.local_s3 import BUCKET, S3_ENV, start_moto_server, stop_moto_server  # noqa: E402
from pipeline.pyramid import is_complete, open_pyramid  # noqa: E402
from pipeline.storage import RETRY_TOTALS  # noqa: E402

FLAKY = FaultPlan(reset=0.06, http_500=0.05, http_503=0.05, truncate=0.1, seed=7, max_per_request=1)


@dataclass(frozen=True, slots=True)
class Settings:
    n_images: int
    size: int
    chunk: int
    workers: int = 2
    kill_fraction: float = 0.4  # the endpoint dies after this fraction of a clean ingest's requests


FULL = Settings(n_images=16, size=512, chunk=64)
SMOKE = Settings(n_images=4, size=192, chunk=64)


def run(root: str, s: Settings, proxy: FaultProxy, **kwargs: object) -> tuple[IngestReport, float, int, int]:
    """One ingest through `proxy`: (report, seconds, operations retried, operations failed after their retries)."""
    retried, failed = RETRY_TOTALS.retried, RETRY_TOTALS.failed
    t = time.perf_counter()
    report = ingest_generated(root, mm.MegapixelMNISTConfig(size=s.size, n_digits=3, n_noise=10, seed=3),
                              n_train=s.n_images, n_test=0, options=WriteOptions(chunk=s.chunk, min_size=s.chunk),
                              workers=s.workers, **kwargs)
    return report, time.perf_counter() - t, RETRY_TOTALS.retried - retried, RETRY_TOTALS.failed - failed


def same_pyramids(a: str, b: str, ids: list[str]) -> bool:
    """Every level of every image and every checksum equal."""
    for image_id in ids:
        pa, pb = open_pyramid(a, image_id), open_pyramid(b, image_id)
        if pa.info.checksum != pb.info.checksum or len(pa.arrays) != len(pb.arrays):
            return False
        if not all(np.array_equal(x[:], y[:]) for x, y in zip(pa.arrays, pb.arrays)):
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="4 small images, a few seconds")
    args = parser.parse_args(argv)
    s = SMOKE if args.smoke else FULL
    ids = [mm.image_id("train", i) for i in range(s.n_images)]
    logging.getLogger("pipeline.ingest").setLevel(logging.CRITICAL)  # one warning per failed image: the tables say it
    print(f"load average at start: {load_average()}", flush=True)
    proc, endpoint = start_moto_server()
    os.environ.update(S3_ENV)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    # fixed prefixes in a fresh server: the same requests, so the same seeded faults, on every run of the script
    try:
        with FaultProxy(endpoint) as proxy:
            os.environ["AWS_ENDPOINT_URL"] = proxy.url
            rows = []
            for name, plan in (("clean", FaultPlan()), (f"faulty (seed {FLAKY.seed})", FLAKY)):
                proxy.set_plan(plan)
                proxy.reset_stats()
                root = f"s3://{BUCKET}/{name.split()[0]}"
                report, seconds, retried, failed = run(root, s, proxy)
                rows.append((name, root, report, seconds, retried, failed, proxy.stats()))
            clean_requests = rows[0][6].requests
            proxy.set_plan(FaultPlan())
            match = same_pyramids(rows[0][1], rows[1][1], ids)

            print(f"\n### 1. One ingest of {s.n_images} Megapixel MNIST images ({s.size} px, chunk {s.chunk}, "
                  f"{s.workers} workers) through the proxy\n")
            print("| run | s | requests | faults | reset | HTTP 500 | HTTP 503 | truncated | retried (RetryPolicy) "
                  "| failed ops | images complete |")
            print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            for name, _, report, seconds, retried, failed, st in rows:
                done = sum(o.row.status == "complete" for o in report.outcomes)
                print(f"| {name} | {seconds:.1f} | {st.requests} | {st.faults} ({st.faults / st.requests:.0%}) | "
                      f"{st.reset} | {st.http_500} | {st.http_503} | {st.truncate} | {retried} | {failed} | "
                      f"{done}/{s.n_images} |")
            print("\nfaulty ingest == clean ingest (every level of every image, checksums): "
                  f"{'yes' if match else 'NO'}")

            kill_after = int(s.kill_fraction * clean_requests)
            root = f"s3://{BUCKET}/outage"
            proxy.reset_stats()
            proxy.kill_after(kill_after)
            report, seconds, _, _ = run(root, s, proxy)
            returned = time.monotonic()
            stop_s = returned - proxy.killed_at if proxy.killed_at is not None else float("nan")
            proxy.revive()
            complete = sum(is_complete(root, i) for i in ids)
            again, rerun_s, _, _ = run(root, s, proxy)
            skipped = sum(o.skipped for o in again.outcomes)
            print(f"\n### 2. Endpoint killed after {kill_after} requests ({s.kill_fraction:.0%} of a clean ingest)\n")
            print("| kill -> report returned s | ingest s | stop reason | images complete at the kill | manifest "
                  "| rerun s | rerun: skipped / complete |")
            print("|---:|---:|---|---:|---|---:|---:|")
            manifest = "written" if report.manifest_error is None else "not written"
            print(f"| {stop_s:.2f} | {seconds:.1f} | {report.stopped} | {complete}/{s.n_images} | {manifest} | "
                  f"{rerun_s:.1f} | {skipped} / {sum(o.row.status == 'complete' for o in again.outcomes)} |")
            outage_ok = report.stopped is not None and again.complete and same_pyramids(rows[0][1], root, ids)
            print(f"\nafter the rerun, the outage root == clean ingest: {'yes' if outage_ok else 'NO'}")
    finally:
        stop_moto_server(proc)
    print(f"\nload average at end: {load_average()}")
    return 0 if match and outage_ok and all(r[2].complete for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
