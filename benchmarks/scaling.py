"""Benchmark training throughput against the number of Ray Train workers and patch servers (ATS-10, one machine).

    .venv/bin/python benchmarks/scaling.py --smoke     # own tiny dataset, 2x2 only, 1 epoch (what a test runs)
    .venv/bin/python benchmarks/scaling.py             # .gats/bench/small1500, workers {1, 2} x servers {1..4}
    .venv/bin/python benchmarks/scaling.py --data ROOT --workers 1 2 --servers 1 2 --epochs 2 --repeats 2

Model: ATS-10 with training/config.py ModelConfig defaults (n_patches=10, 50 px patches), attention on the pyramid level
nearest data.low_scale=0.125; batch 8 per worker. Every configuration runs in a fresh subprocess (this script with
`--one JSON`) that starts an embedded local Ray, trains through `training.driver.run` into a throwaway SQLite MLflow store
and shuts Ray down. Run order interleaves the worker counts at each server count (1x1, 2x1, 1x2, 2x2, ...) so that
load drift from other processes hits neighbours alike; `--repeats R` adds passes in alternating order (reversed on
even passes) and the table shows the median (a mean for two) and every run's figure. One pass by default: on
the shared 2-core machine (load average 7-19) a configuration took ~2.5 min, of which training steps ~20 s (the rest:
Python and Ray start-up, Ray Train worker group, patch servers, evaluation, checkpoints, model logging). A
configuration that fails is reported and the others still run (exit status 1).

Sizing, so that Ray never waits on a CPU that nobody gets: with C = os.cpu_count(), Ray gets num_cpus=C, each of
W workers C_w = (C - 0.5) / W and each of S servers min(0.1, 0.5 / S) (they are I/O bound); the Ray Train V2
controller actor reserves 0 CPUs, so W * C_w + S * C_s <= C. Torch threads per worker (runtime.torch_threads, which
the loop passes to torch.set_num_threads): max(1, floor(C_w)) unless --threads says otherwise; 1 on 2 CPUs.

Figures are the loop's run metrics from MLflow (training steps only: Ray/actor start-up, evaluation and checkpoints
are outside them): samples_per_s (sum over workers), time_per_sample_ms (per worker), io_wait_fraction,
patches_per_s, bytes_read_per_sample. They cover all epochs, so epoch 1 (low-res view cache filling, first array
opens, allocator warm-up) is included; the last column is the wall-clock rate of the epochs after the first, from the
MLflow timestamps of consecutive epoch metrics (that span also holds one evaluation and one checkpoint per epoch).
The loop counts patches and I/O waits of training steps only (evaluation excluded): patches_per_s = 10 x
samples_per_s. The test split is cut to data.max_test=2 images so that evaluation stays short.
A calibration before the runs times direct PatchReader reads of 10 random 50 px patches per image in this process.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import load_average  # noqa: E402
from benchmarks.smoke_data import tiny_mnist  # noqa: E402

DEFAULT_DATA = ROOT / ".gats" / "bench" / "small1500"
METRICS = ("samples_per_s", "time_per_sample_ms", "io_wait_fraction", "patches_per_s", "bytes_read_per_sample",
           "train_time_s")
SERVER_RESERVE = 0.5  # CPUs left to the servers (and the driver) out of C


@dataclass(frozen=True, slots=True)
class Settings:
    workers: tuple[int, ...]
    servers: tuple[int, ...]
    epochs: int
    repeats: int
    batch_size: int = 8
    max_test: int = 2  # test images evaluated per epoch (only to keep evaluation short)
    low_scale: float = 0.125
    only: tuple[tuple[int, int], ...] = ()  # (workers, servers) pairs to run instead of the whole grid

    def configs(self) -> list[tuple[int, int]]:
        """In run order: worker counts interleaved at each server count, so load drift hits both alike."""
        return list(self.only) or [(w, n) for n in self.servers for w in self.workers]


FULL = Settings(workers=(1, 2), servers=(1, 2, 3, 4), epochs=2, repeats=1)
SMOKE = Settings(workers=(2,), servers=(2,), epochs=1, repeats=1, batch_size=4, max_test=2,
                 only=((2, 2),))  # the multi-worker, multi-server path; one worker is what most other tests train


@dataclass(frozen=True, slots=True)
class Job:
    """One configuration, as the `--one` subprocess receives it."""

    data: str
    workers: int
    servers: int
    epochs: int
    batch_size: int
    max_test: int
    low_scale: float
    num_cpus: int
    threads: int
    cpus_per_worker: float
    server_cpus: float
    tmp: str


def sizing(num_cpus: int, workers: int, servers: int, threads: int = 0) -> tuple[float, float, int]:
    """(CPUs per worker, CPUs per server, torch threads per worker) that fit in num_cpus with room to spare."""
    per_worker = (num_cpus - SERVER_RESERVE) / workers
    per_server = min(0.1, SERVER_RESERVE / servers) if servers else 0.0
    if per_worker <= 0 or workers * per_worker + servers * per_server > num_cpus + 1e-9:
        raise ValueError(f"{workers} workers and {servers} servers do not fit in {num_cpus} CPUs.")
    return per_worker, per_server, threads or max(1, math.floor(per_worker))


# -----------------------------------------------------------------------------
# one configuration (runs in its own process)

def run_one(job: Job) -> dict:
    import ray
    from mlflow.tracking import MlflowClient

    from training import config as C
    from training import driver as train

    tmp = Path(job.tmp)
    cfg = C.from_dict({
        "data": {"root": job.data, "batch_size": job.batch_size, "max_test": job.max_test,
                 "low_scale": job.low_scale, "n_attention_maps": 0},
        "model": {"name": "ats"},
        "optim": {"epochs": job.epochs},
        "runtime": {"num_workers": job.workers, "num_patch_servers": job.servers, "num_cpus": job.num_cpus,
                    "cpus_per_worker": job.cpus_per_worker, "server_cpus": job.server_cpus, "use_gpu": "false",
                    "torch_threads": job.threads,
                    "progress": False, "experiment": "scaling", "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
                    "storage_path": str(tmp / "ray"), "run_name": f"ats10-w{job.workers}-s{job.servers}"},
    })
    cfg = train.resolve(cfg)
    start = time.perf_counter()
    train.start_ray(cfg)
    try:
        ray_start_s = time.perf_counter() - start
        start = time.perf_counter()
        result = train.run(cfg)
        fit_s = time.perf_counter() - start
    finally:
        ray.shutdown()
    history = MlflowClient(cfg.runtime.tracking_uri).get_metric_history(result.run_id, "train_loss")
    stamps = [m.timestamp / 1000 for m in sorted(history, key=lambda m: m.step)]
    per_epoch = math.ceil(_n_split(job.data, "train") / job.workers) * job.workers  # shards are padded to equal size
    later = (len(stamps) - 1) * per_epoch / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return {**{k: result.metrics.get(k, float("nan")) for k in METRICS}, "later_epochs_samples_per_s": later,
            "ray_start_s": ray_start_s, "run_s": fit_s}


def _n_split(root: str, split: str) -> int:
    import pandas as pd

    m = pd.read_parquet(Path(root) / "manifest.parquet", columns=["split", "status"])
    return int(((m["split"] == split) & (m["status"] == "complete")).sum())


# -----------------------------------------------------------------------------
# the driver: calibration, subprocesses, table

def calibrate(root: str, low_scale: float, n_images: int = 16, n_patches: int = 10, size: int = 50) -> dict:
    """Direct PatchReader reads in this process (arrays opened first, untimed), like one server answering."""
    import numpy as np
    import pandas as pd

    from pipeline.reader import PatchReader

    m = pd.read_parquet(Path(root) / "manifest.parquet")
    m = m[(m["split"] == "train") & (m["status"] == "complete")].head(n_images)
    reader = PatchReader(root)
    rng = np.random.default_rng(0)
    ids = list(m["image_id"])
    for i in ids:
        reader.info(i)
    level = reader.level_for_scale(ids[0], low_scale)
    before = reader.stats.bytes_read
    reader.low_res(ids[0], level)
    low_bytes = reader.stats.bytes_read - before
    boxes = {i: np.c_[rng.integers(0, [h - size, w - size], (n_patches, 2)), np.full((n_patches, 2), size)]
             for i, h, w in zip(ids, m["height"], m["width"])}
    before = reader.stats
    start = time.perf_counter()
    for i in ids:
        reader.read(i, boxes[i])
    took = time.perf_counter() - start
    n = len(ids) * n_patches
    after = reader.stats
    return {"ms_per_patch": 1000 * took / n, "bytes_per_patch": (after.bytes_read - before.bytes_read) / n,
            "chunks_per_patch": (after.chunks_read - before.chunks_read) / n, "low_res_bytes": low_bytes,
            "low_res_level": level}


def spawn(job: Job, tries: int = 3) -> dict | None:
    """One configuration in a fresh process, None if it failed. Retried when Ray itself did not start: its raylet
    has a fixed 30 s start-up deadline that a machine shared with other heavy processes can miss."""
    for attempt in range(1, tries + 1):
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(asdict(job))], capture_output=True,
                              text=True, cwd=ROOT, timeout=900)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode == 0 and lines:
            return json.loads(lines[-1][len("RESULT "):])
        if "timed out during startup" not in proc.stderr:
            break
        print(f"  (try {attempt} of {tries}: Ray did not start within its 30 s deadline)", flush=True)
        time.sleep(15)
    print(f"  {job.workers} worker(s) x {job.servers} server(s) FAILED (exit status {proc.returncode}):\n"
          f"{proc.stderr[-3000:]}", flush=True)
    return None


def table(results: dict[tuple[int, int], list[dict]]) -> list[str]:
    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    done = [c for c in sorted(results) if results[c]]
    base = statistics.median(r["samples_per_s"] for r in results[done[0]]) if done else float("nan")
    rows = ["| workers | servers | samples/s (median) | each run | speed-up | ms/sample per worker | io wait "
            "| patches/s | bytes/sample | later epochs, wall samples/s |",
            "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for w, n in sorted(results):
        runs = results[(w, n)]
        if not runs:
            rows.append(f"| {w} | {n} | failed | | | | | | | |")
            continue
        each = " / ".join(f"{r['samples_per_s']:.1f}" for r in runs)
        rows.append(f"| {w} | {n} | {med('samples_per_s'):.1f} | {each} | {med('samples_per_s') / base:.2f} | "
                    f"{med('time_per_sample_ms'):.1f} | {med('io_wait_fraction'):.2f} | {med('patches_per_s'):.0f} | "
                    f"{med('bytes_read_per_sample'):,.0f} | {med('later_epochs_samples_per_s'):.1f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="own tiny dataset, 2x2 only, 1 epoch")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="an ingested dataset ROOT (manifest.parquet)")
    parser.add_argument("--workers", type=int, nargs="+", help="Ray Train worker counts")
    parser.add_argument("--servers", type=int, nargs="+", help="patch server counts")
    parser.add_argument("--epochs", type=int, help="epochs per configuration")
    parser.add_argument("--repeats", type=int, help="runs per configuration (alternating order)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: max(1, floor(C_w)))")
    parser.add_argument("--json", metavar="PATH", help="also write the settings, calibration and every run here")
    parser.add_argument("--one", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(Job(**json.loads(args.one)))), flush=True)
        return 0

    s = SMOKE if args.smoke else FULL
    s = Settings(**{**asdict(s), **{k: tuple(v) if isinstance(v, list) else v for k, v in
                                    (("workers", args.workers), ("servers", args.servers), ("epochs", args.epochs),
                                     ("repeats", args.repeats)) if v is not None}})
    if args.workers or args.servers:
        s = Settings(**{**asdict(s), "only": ()})
    cpus = os.cpu_count() or 1
    print(f"load average at start: {load_average()}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gats-scaling-") as tmp:
        data = tiny_mnist(tmp, 8, 2) if args.smoke else str(Path(args.data).resolve())
        if not (Path(data) / "manifest.parquet").is_file():
            print(f"scaling: error: no manifest.parquet under {data}: ingest one with jobs/ingest.py "
                  "(`make bench-data`) or pass --data ROOT.", file=sys.stderr)
            return 2
        cal = calibrate(data, s.low_scale)
        print(f"calibration (direct PatchReader, this process): {cal['ms_per_patch']:.2f} ms, "
              f"{cal['chunks_per_patch']:.2f} chunks and {cal['bytes_per_patch']:,.0f} chunk bytes per random 50 px "
              f"patch; low-res view (level "
              f"{cal['low_res_level']}) {cal['low_res_bytes']:,} bytes per image")
        configs = s.configs()
        results: dict[tuple[int, int], list[dict]] = {c: [] for c in configs}
        for rep in range(s.repeats):
            for w, n in configs if rep % 2 == 0 else configs[::-1]:
                per_worker, per_server, threads = sizing(cpus, w, n, args.threads)
                job = Job(data, w, n, s.epochs, s.batch_size, s.max_test, s.low_scale, cpus, threads, per_worker,
                          per_server, tempfile.mkdtemp(prefix=f"w{w}s{n}-", dir=tmp))
                t = time.perf_counter()
                r = spawn(job)
                if r is None:
                    continue
                results[(w, n)].append(r)
                print(f"  pass {rep + 1}: {w} worker(s) x {n} server(s) ({per_worker:.2f} + {per_server:.2f} CPUs "
                      f"each, {threads} torch thread(s) per worker): {r['samples_per_s']:.1f} samples/s, "
                      f"{r['time_per_sample_ms']:.0f} ms/sample, io wait {r['io_wait_fraction']:.2f}; "
                      f"{time.perf_counter() - t:.0f} s in all: Ray start {r['ray_start_s']:.0f} s, training.driver.run "
                      f"{r['run_s']:.0f} s of which training steps {r['train_time_s']:.0f} s", flush=True)
    print(f"\nATS-10 (50 px patches, low_scale {s.low_scale}), batch {s.batch_size} per worker, {s.epochs} epoch(s), "
          f"{cpus} CPUs (Ray num_cpus={cpus}); {Path(data).name}; median of {s.repeats} run(s).\n")
    print("\n".join(table(results)))
    if args.json:
        runs = [{"workers": w, "servers": n, **r} for (w, n), rs in results.items() for r in rs]
        Path(args.json).write_text(json.dumps({"settings": asdict(s), "cpus": cpus, "calibration": cal,
                                               "runs": runs}, indent=1))
    print(f"\nwall time {time.perf_counter() - started:.0f} s; load average at end: {load_average()}")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
