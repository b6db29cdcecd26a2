"""Benchmark the I/O cost inside training: ATS time per sample fed from the store vs from RAM, and the fraction of
step time spent waiting on pixels (`io_wait_fraction`) with and without the low-res prefetch thread, for direct
store reads and through Ray patch servers.

    .venv/bin/python benchmarks/io_training.py --smoke           # 3 tiny runs, ~1 CPU-minute; what the tests run
    .venv/bin/python benchmarks/io_training.py                   # .gats/bench/small1500, local + Ray rows, ~14 min*
    .venv/bin/python benchmarks/io_training.py --s3 --no-ray     # adds S3 rows (a moto server on 127.0.0.1)

* at load average 7-12 on 2 CPUs (other jobs running): a fresh process costs ~50 s, a Ray one ~2 min of start-up.

The nets are the training/config.py ModelConfig defaults with n_patches=10 (ATS-10: `mnist_tanh` attention on the
pyramid level nearest data.low_scale=0.125, i.e. 188 px for 1500 px images; `lenet1` features on 50 px patches),
1 worker, batch 8. Every configuration runs in a FRESH subprocess (this script with `--one JSON`): in it, a warm-up
training pass over a few test-split images (unmeasured, same data path, same process: for the Ray rows inside the
Ray Train worker, before its real loop), then ONE measured epoch over the training images, so every step reads its
low-res views fresh (LowResViews caches a view after first use; one epoch over many images is the big-dataset case).
The figures are the run metrics the loop logs to MLflow (a throwaway SQLite store, or --tracking-uri), read back
with MlflowClient. Configurations alternate (round r runs the rows forward when r is even, backward when odd);
tables give medians with the min-max spread over rounds, and the store/RAM ratio is the median over rounds of the
ratio within a round (both runs close in time, so machine load affects both alike).

Rows:
- RAM: `data.in_memory=true` (level 0 and the low-res views of every image loaded before training; patches are
  crops of arrays in RAM). Its io_wait_fraction is the crop time.
- store, direct: the worker's own PatchReader reads low-res views and patches from the zarr store (no servers).
- Ray, K server(s): `training.driver.run` on an embedded Ray with runtime.num_cpus=2, 1 worker with 1 CPU, K patch
  servers with 0.1 CPU each; the worker reads the low-res views itself, the servers the patches.
- S3 (--s3): the store copied into a moto S3 server this script starts; direct reads.
torch runs one intra-op thread everywhere (--threads: runtime.torch_threads, which the loop applies in every worker,
and OMP_NUM_THREADS). The OS page cache is warm for the local store (the files were read before),
so "store" measures decompression, zarr and Python overhead rather than disk.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import load_average  # noqa: E402
from benchmarks.smoke_data import tiny_mnist  # noqa: E402

EXPERIMENT = "io-training-bench"
RATIO_TARGET = 1.3  # store-fed time per sample <= 1.3 x RAM-fed
WAIT_TARGET = 0.15  # io_wait_fraction with prefetch on


@dataclass(frozen=True, slots=True)
class Row:
    """One configuration of the data path."""

    source: str  # "ram" (data.in_memory) | "store" (direct PatchReader) | "ray" (patch servers)
    prefetch: bool = True
    servers: int = 0
    storage: str = "local"  # "local" | "s3"

    @property
    def name(self) -> str:
        where = {"ram": "RAM (in_memory)", "store": "store, direct",
                 "ray": f"Ray, {self.servers} server{'s' if self.servers > 1 else ''}"}[self.source]
        return f"{'S3' if self.storage == 's3' else 'local'} {where}, prefetch {'on' if self.prefetch else 'off'}"

    @property
    def key(self) -> str:
        """The name as a slug (MLflow run names, Ray Train folders)."""
        return f"{self.storage}-{self.source}{self.servers or ''}-prefetch-{'on' if self.prefetch else 'off'}"


@dataclass(frozen=True, slots=True)
class Settings:
    max_train: int  # images of the one measured epoch
    warmup_images: int  # test-split images of the unmeasured warm-up pass
    repeats: int  # rounds over the rows without Ray
    ray_repeats: int  # rounds that include the Ray rows (a Ray child costs 1-2 minutes of start-up on 2 CPUs)
    batch_size: int = 8
    n_patches: int = 10
    low_scale: float = 0.125
    threads: int = 1


LOCAL_ROWS = (Row("ram"), Row("store"), Row("store", prefetch=False))
RAY_ROWS = tuple(Row("ray", prefetch=p, servers=k) for k in (1, 2) for p in (True, False))
S3_ROWS = (Row("store", storage="s3"), Row("store", prefetch=False, storage="s3"))
FULL = Settings(max_train=128, warmup_images=16, repeats=2, ray_repeats=1)
SMOKE = Settings(max_train=16, warmup_images=8, repeats=1, ray_repeats=0)


# -----------------------------------------------------------------------------
# one configuration, in a fresh process

def train_config(job: dict[str, Any], warmup: bool) -> Any:
    from training import config as C

    s, row = Settings(**job["settings"]), Row(**job["row"])
    data = {"root": job["root"], "low_scale": s.low_scale, "batch_size": s.batch_size, "max_test": 1,
            "n_attention_maps": 0, "in_memory": row.source == "ram", "prefetch": row.prefetch,
            "max_train": s.warmup_images if warmup else s.max_train}
    if warmup:  # other images than the measured ones, so the measured epoch still reads its views fresh
        data.update(train_split="test", test_split="train")
    return C.from_dict({
        "data": data, "model": {"name": "ats", "n_patches": s.n_patches}, "optim": {"epochs": 1},
        "runtime": {"progress": False, "num_workers": 1, "cpus_per_worker": 1, "torch_threads": s.threads,
                    "num_patch_servers": row.servers, "server_cpus": 0.1, "num_cpus": 2, "max_failures": 0,
                    "tracking_uri": job["tracking_uri"],
                    "experiment": EXPERIMENT, "run_name": f"{'warmup-' if warmup else ''}{row.key}-r{job['round']}",
                    "storage_path": str(Path(job["scratch"]) / "ray")},
    })


def run_one(job: dict[str, Any]) -> dict[str, float]:
    """Warm-up, then the measured epoch; returns the measured run's metrics as logged to MLflow."""
    import torch

    torch.set_num_threads(Settings(**job["settings"]).threads)
    cfg, warm = train_config(job, False), train_config(job, True)
    if Row(**job["row"]).source == "ray":
        return run_ray(job, cfg, warm)
    from mlflow.tracking import MlflowClient

    from training.tracking import MlflowTracker
    from training.loop import train_loop
    from training.session import LocalSession

    train_loop({"config": warm.to_dict(), "run_id": ""}, LocalSession(Path(job["scratch"]) / "warmup"))
    run = MlflowTracker.create(job["tracking_uri"], EXPERIMENT, cfg.runtime.run_name)
    try:
        train_loop({"config": cfg.to_dict(), "run_id": run.run_id}, LocalSession(Path(job["scratch"]) / "run"))
    finally:
        run.finish()
    return dict(MlflowClient(job["tracking_uri"]).get_run(run.run_id).data.metrics)


def warm_then_train(warm: dict[str, Any], marker: str, loop_config: dict[str, Any]) -> None:
    """In the Ray Train worker: the warm-up pass (unlogged, checkpoints to a local folder, same patch servers),
    then the real loop. The worker process is the measured one, so its first-step costs stay out of the figures."""
    from training.loop import train_loop
    from training.session import LocalSession

    train_loop({"config": warm, "run_id": "", "servers": loop_config.get("servers")},
               LocalSession(Path(marker).parent / "warmup"))
    Path(marker).write_text("warm\n")
    train_loop(loop_config)


def run_ray(job: dict[str, Any], cfg: Any, warm: Any) -> dict[str, float]:
    """`training.driver.run` with its worker function wrapped by `warm_then_train` (training.driver imports
    training.loop.train_loop when it runs, so replacing that attribute here, in the driver only, wraps it)."""
    import functools

    import ray

    import training.loop
    from training import driver as train

    marker = Path(job["scratch"]) / "warmed-up"
    marker.parent.mkdir(parents=True, exist_ok=True)
    original = training.loop.train_loop
    training.loop.train_loop = functools.partial(warm_then_train, warm.to_dict(), str(marker))
    train.start_ray(cfg)
    try:
        metrics = train.run(cfg).metrics
    finally:
        ray.shutdown()
        training.loop.train_loop = original
    if not marker.is_file():
        raise RuntimeError("The Ray worker ran no warm-up: training.driver.run no longer looks up "
                           "training.loop.train_loop when it runs; update run_ray in this script.")
    return metrics


def run_child(job: dict[str, Any], env: dict[str, str], attempts: int = 2) -> dict[str, float]:
    """`job` in a fresh interpreter. A Ray that times out starting (it does on an overloaded 2-CPU machine) is
    retried once."""
    start = time.perf_counter()
    for attempt in range(1, attempts + 1):
        done = subprocess.run([sys.executable, __file__, "--one", json.dumps(job)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=1200)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        if done.returncode == 0 and lines:
            return {**json.loads(lines[-1][len("RESULT "):]), "wall_s": time.perf_counter() - start}
        if attempt == attempts or "timed out during startup" not in done.stderr:
            raise RuntimeError(f"{Row(**job['row']).name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        print(f"  Ray timed out starting; retrying {Row(**job['row']).name}", flush=True)
    raise AssertionError("unreachable")


# -----------------------------------------------------------------------------
# data: the given store, a tiny generated one (--smoke), a copy in a moto S3 server (--s3)

def copy_to_s3(root: str, env: dict[str, str]) -> tuple[Any, str]:
    """Start moto on 127.0.0.1, copy the store folder into it; returns (server process, s3 root)."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.local_s3 import S3_ENV, start_moto_server

    proc, endpoint = start_moto_server()
    env.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    import boto3

    from pipeline.storage import Storage

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="gats-io-training")
    s3_root = "s3://gats-io-training/data"
    target = Storage(s3_root)
    files = [p for p in Path(root).rglob("*") if p.is_file()]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: target.write_bytes(p.relative_to(root).as_posix(), p.read_bytes()), files))
    return proc, s3_root


# -----------------------------------------------------------------------------
# report

def spread(values: list[float], fmt: str) -> str:
    med = statistics.median(values)
    return f"{med:{fmt}}" if len(values) == 1 else f"{med:{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def median_of(got: list[dict[str, float]], metric: str) -> float:
    return statistics.median(r[metric] for r in got)


def table(rows: list[Row], results: dict[Row, list[dict[str, float]]]) -> None:
    ram_ms = median_of(results[Row("ram")], "time_per_sample_ms")
    print("| configuration | runs | time / sample ms, median (min-max) | vs RAM | io_wait_fraction | samples/s "
          "| step memory MB | bytes read / sample | child wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        got = results[row]
        ms = [r["time_per_sample_ms"] for r in got]
        print(f"| {row.name} | {len(got)} | {spread(ms, '.0f')} | {statistics.median(ms) / ram_ms:.2f}x "
              f"| {spread([r['io_wait_fraction'] for r in got], '.3f')} | {median_of(got, 'samples_per_s'):.2f} "
              f"| {median_of(got, 'step_memory_mb'):.0f} | {median_of(got, 'bytes_read_per_sample'):,.0f} "
              f"| {median_of(got, 'wall_s'):.0f} |")


def report(rows: list[Row], results: dict[Row, list[dict[str, float]]]) -> None:
    ram, store = Row("ram"), Row("store")
    print("\n### 1. ATS time per sample: store-fed vs RAM-fed (direct reads, prefetch on)\n")
    table([ram, store], results)
    per_round = [s["time_per_sample_ms"] / r["time_per_sample_ms"] for s, r in zip(results[store], results[ram])]
    ratio = statistics.median(per_round)
    medians = median_of(results[store], "time_per_sample_ms") / median_of(results[ram], "time_per_sample_ms")
    print(f"\nstore / RAM time per sample: {ratio:.2f}x (median of per-round ratios "
          f"{', '.join(f'{x:.2f}' for x in per_round)}; ratio of medians {medians:.2f}x) -> target <= "
          f"{RATIO_TARGET}x {'MET' if ratio <= RATIO_TARGET else 'MISSED'}")
    # Both rows train on identical samples (same seed), so their non-waiting time is the same work; the ratio that
    # the store row's own wait implies does not depend on load drifting between the two runs.
    implied = (1 - median_of(results[ram], "io_wait_fraction")) / (1 - median_of(results[store], "io_wait_fraction"))
    print(f"store / RAM implied by the I/O wait within the runs, (1 - wait RAM) / (1 - wait store): {implied:.2f}x")
    print("\n### 2. Fraction of step time waiting on I/O, prefetch on vs off\n")
    table([r for r in rows if r != ram], results)
    print()
    for row in rows:
        if row.prefetch and row != ram:
            wait = median_of(results[row], "io_wait_fraction")
            print(f"- {row.name}: io_wait_fraction {wait:.3f} -> target <= {WAIT_TARGET} "
                  f"{'MET' if wait <= WAIT_TARGET else 'MISSED'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny generated data, 1 round, no Ray")
    parser.add_argument("--data", default=str(REPO / ".gats" / "bench" / "small1500"), help="an ingested ROOT")
    parser.add_argument("--tracking-uri", help="MLflow store for the runs (default: a throwaway SQLite store)")
    parser.add_argument("--repeats", type=int, help="rounds over the configurations (default 2; smoke 1)")
    parser.add_argument("--ray-repeats", type=int, help="how many of those rounds include the Ray rows (default 1)")
    parser.add_argument("--max-train", type=int, help="training images of the measured epoch (default 128)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray patch-server rows")
    parser.add_argument("--s3", action="store_true", help="add S3 rows (the store copied into a local moto server)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration (JSON) in this process
    args = parser.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))), flush=True)
        return 0

    start = time.perf_counter()
    print(f"load average at start: {load_average()}", flush=True)
    s = SMOKE if args.smoke else FULL
    s = dataclasses.replace(s, max_train=args.max_train or s.max_train, repeats=args.repeats or s.repeats,
                            ray_repeats=s.ray_repeats if args.ray_repeats is None else args.ray_repeats,
                            threads=args.threads)
    with_ray = not (args.smoke or args.no_ray) and s.ray_repeats > 0
    rows = [*LOCAL_ROWS, *(RAY_ROWS if with_ray else ()), *(S3_ROWS if args.s3 else ())]
    scratch = Path(tempfile.mkdtemp(prefix="gats-io-training-"))
    root = tiny_mnist(scratch, 16, 8) if args.smoke else str(Path(args.data).resolve())
    tracking_uri = args.tracking_uri or f"sqlite:///{scratch / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(s.threads), "RAY_USAGE_STATS_ENABLED": "0"}
    moto, s3_root = (None, "")
    if args.s3:
        t = time.perf_counter()
        moto, s3_root = copy_to_s3(root, env)
        print(f"copied {root} to {s3_root} in {time.perf_counter() - t:.0f} s", flush=True)
    from training.tracking import MlflowTracker

    MlflowTracker.create(tracking_uri, EXPERIMENT, "setup").finish()  # the store and experiment exist before children
    results: dict[Row, list[dict[str, float]]] = {row: [] for row in rows}
    try:
        for r in range(s.repeats):
            todo = [row for row in rows if row.source != "ray" or r < s.ray_repeats]
            for i, row in enumerate(todo if r % 2 == 0 else todo[::-1]):
                job = {"row": asdict(row), "settings": asdict(s), "root": s3_root if row.storage == "s3" else root,
                       "tracking_uri": tracking_uri, "round": r, "scratch": str(scratch / f"r{r}-{i}")}
                got = run_child(job, env)
                results[row].append(got)
                shutil.rmtree(job["scratch"], ignore_errors=True)  # checkpoints; the MLflow store stays
                print(f"round {r + 1}/{s.repeats} {row.name}: {got['time_per_sample_ms']:.0f} ms/sample, io wait "
                      f"{got['io_wait_fraction']:.3f} ({got['wall_s']:.0f} s)", flush=True)
    finally:
        if moto is not None:
            from pipeline.local_s3 import stop_moto_server

            stop_moto_server(moto)
        if args.smoke:
            shutil.rmtree(root, ignore_errors=True)

    print(f"\n{root}: {s.max_train} training images, 1 measured epoch ({s.max_train // s.batch_size} steps of batch "
          f"{s.batch_size}, every low-res view read fresh) after a warm-up over {s.warmup_images} test images; "
          f"ATS-{s.n_patches}, low_scale {s.low_scale}; 1 worker; torch threads {s.threads}; {os.cpu_count()} CPUs; "
          f"{s.repeats} round(s) ({s.ray_repeats} with the Ray rows), rows alternating.")
    report(rows, results)
    print(f"\nMLflow runs: {tracking_uri} (experiment {EXPERIMENT})")
    print(f"wall time {time.perf_counter() - start:.0f} s; load average at end: {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
