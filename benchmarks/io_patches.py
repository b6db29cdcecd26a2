"""Benchmark patch I/O: patches/s for direct PatchReader reads vs Ray PatchServers, on a local folder vs S3 (a moto
server this script starts on 127.0.0.1), and bytes read per patch vs the chunk-touched minimum for several chunk sizes.

    .venv/bin/python benchmarks/io_patches.py --smoke     # seconds; what the test suite runs
    .venv/bin/python benchmarks/io_patches.py             # 2048 x 2048 RGB x 2 images, 50 steps of 16 patches of 128 px

Prints two markdown tables. The image is synthetic (smooth gradients plus noise, so it compresses like a photo rather
than like pure noise). Boxes are uniform random level-0 positions (partly outside the image at the borders).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.pyramid import write_pyramid  # noqa: E402
from pipeline.reader import PatchReader  # noqa: E402
from pipeline.storage import Storage, image_key  # noqa: E402


@dataclass(frozen=True, slots=True)
class Settings:
    size: int
    patch: int
    steps: int
    per_step: int
    n_images: int
    chunks: tuple[int, ...]
    servers: int = 2
    ray_chunk: int = 256  # the Ray rows use this chunk size only


FULL = Settings(size=2048, patch=128, steps=50, per_step=16, n_images=2, chunks=(128, 256, 512))
SMOKE = Settings(size=512, patch=64, steps=3, per_step=4, n_images=1, chunks=(128, 256, 512), servers=1)


def synthetic_image(size: int, seed: int) -> da.Array:
    """(3, size, size) uint8, built lazily block by block."""
    def block(block_info: dict | None = None) -> np.ndarray:
        (y0, y1), (x0, x1) = block_info[None]["array-location"][1:]
        rng = np.random.default_rng([seed, y0, x0])
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        base = 127 + 60 * np.sin(yy / 97.0 + seed) * np.cos(xx / 131.0)
        return np.clip(base[None] + rng.normal(0, 12, (3, y1 - y0, x1 - x0)), 0, 255).astype(np.uint8)

    return da.map_blocks(block, chunks=((3,), (512,) * (size // 512) + ((size % 512,) if size % 512 else ()),
                                        (512,) * (size // 512) + ((size % 512,) if size % 512 else ())),
                         dtype=np.uint8)


def make_steps(s: Settings, seed: int = 0) -> list[list[tuple[str, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    steps = []
    for _ in range(s.steps):
        step = []
        for i in range(s.n_images):
            yx = rng.integers(-s.patch // 2, s.size - s.patch // 2, (s.per_step // s.n_images, 2))
            step.append((f"bench{i}", np.c_[yx, np.full((len(yx), 2), s.patch)]))
        steps.append(step)
    return steps


def touched_minimum(root: str, steps: list, chunk: int, size: int) -> int:
    """Sum over requests of the stored sizes of the level-0 chunks each request touches (each chunk once)."""
    st = Storage(root)
    sizes: dict[str, int] = {}
    total = 0
    for step in steps:
        for image_id, boxes in step:
            keys = set()
            for y0, x0, h, w in boxes:
                for cy in range(max(y0, 0) // chunk, (min(y0 + h, size) - 1) // chunk + 1):
                    for cx in range(max(x0, 0) // chunk, (min(x0 + w, size) - 1) // chunk + 1):
                        keys.add(f"{image_key(image_id)}/0/c/0/{cy}/{cx}")
            for k in keys:
                if k not in sizes:
                    sizes[k] = st.size(k) if st.exists(k) else 0
                total += sizes[k]
    return total


def time_direct(root: str, steps: list) -> tuple[float, int]:
    reader = PatchReader(root)
    for image_id, boxes in steps[0]:  # open + warm the cache, not timed
        reader.read(image_id, boxes[:1])
    before = reader.stats.bytes_read
    t = time.perf_counter()
    n = sum(len(reader.read(image_id, boxes)) for step in steps for image_id, boxes in step)
    dt = time.perf_counter() - t
    return n / dt, reader.stats.bytes_read - before


def time_ray(root: str, steps: list, n_servers: int, tag: str) -> float:
    from pipeline.serving import PatchClient, ServerOptions

    client = PatchClient.start(root, n_servers, options=ServerOptions(name_prefix=f"bench-{tag}"), max_in_flight=8)
    client.read(steps[0])  # warm
    t = time.perf_counter()
    n = sum(len(p) for got in client.read_steps(steps) for p in got)
    return n / (time.perf_counter() - t)


def moto() -> Iterator[str]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pipeline.local_s3 import S3_ENV, start_moto_server, stop_moto_server

    proc, endpoint = start_moto_server()
    os.environ.update(S3_ENV)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="gats-bench")
    try:
        yield "s3://gats-bench/run"
    finally:
        stop_moto_server(proc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray PatchServer rows")
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 (moto) rows")
    args = parser.parse_args(argv)
    s = SMOKE if args.smoke else FULL
    steps = make_steps(s)
    n_patches = sum(len(b) for step in steps for _, b in step)
    s3_gen = None if args.no_s3 else moto()
    roots = {"local": tempfile.mkdtemp(prefix="gats-bench-")}
    if s3_gen is not None:
        roots["s3"] = next(s3_gen)
    if not args.no_ray:
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    speed_rows, byte_rows = [], []
    try:
        for chunk in s.chunks:
            for backend, base in roots.items():
                root = f"{base}/c{chunk}" if backend == "s3" else os.path.join(base, f"c{chunk}")
                for i in range(s.n_images):
                    write_pyramid(root, f"bench{i}", synthetic_image(s.size, i), chunk=chunk, max_levels=2)
                rate, n_bytes = time_direct(root, steps)
                speed_rows.append((backend, "direct PatchReader", chunk, rate))
                if not args.no_ray and chunk == s.ray_chunk:  # actor start-up is slow on 2 CPUs
                    speed_rows.append((backend, f"Ray, {s.servers} PatchServer(s)", chunk,
                                       time_ray(root, steps, s.servers, f"{backend}-{chunk}")))
                if backend == "local":
                    minimum = touched_minimum(root, steps, chunk, s.size)
                    byte_rows.append((chunk, n_bytes / n_patches, minimum / n_patches,
                                      3 * s.patch * s.patch))
    finally:
        if not args.no_ray:
            import ray

            ray.shutdown()
        if s3_gen is not None:
            s3_gen.close()

    print(f"\nImage {s.size}x{s.size} RGB uint8 x {s.n_images}; {s.steps} steps x {s.per_step} patches of "
          f"{s.patch}x{s.patch} (level 0); 2 CPUs.\n")
    print("| storage | path | chunk | patches/s |")
    print("|---|---|---:|---:|")
    for backend, path, chunk, rate in speed_rows:
        print(f"| {backend} | {path} | {chunk} | {rate:,.0f} |")
    print("\n| chunk | bytes read / patch | chunk-touched minimum / patch | ratio | raw patch bytes |")
    print("|---:|---:|---:|---:|---:|")
    for chunk, got, minimum, raw in byte_rows:
        print(f"| {chunk} | {got:,.0f} | {minimum:,.0f} | {got / minimum:.3f} | {raw:,} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
