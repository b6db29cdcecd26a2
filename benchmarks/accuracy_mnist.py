"""Benchmark accuracy at equal wall-clock: Megapixel MNIST (the paper's recipe) through `jobs/train.py` and MLflow.

    PYTHONPATH=. .venv/bin/python benchmarks/accuracy_mnist.py                  # 5000/1000 images, 6 min per run
    PYTHONPATH=. .venv/bin/python benchmarks/accuracy_mnist.py --budget-s 1800   # a longer budget
    PYTHONPATH=. .venv/bin/python benchmarks/accuracy_mnist.py --smoke           # a minute; what the tests run

Data: 1500x1500 canvases, 5 MNIST digits of which 3 give the label, 50 line-noise patterns, 10 classes, 5,000 train /
1,000 test, ingested once by `jobs/ingest.py --generate megapixel-mnist` into `--data` (kept, reused). Methods
(the paper's nets): ATS-10 and U-10 (mnist_tanh attention on the level nearest scale 0.125 = 188x188 px, i.e.
35,344 cells; lenet1 features on 50 px patches), seeds 0..2 each, and the CNN baseline on the whole image at scale
0.25 and 0.5, seed 0.

Every run gets the same budget of TRAINING seconds (`optim.time_budget_s`: seconds spent in training steps; the
per-epoch test evaluation is not counted), one Ray Train worker with 1 CPU and 1 torch thread, workers reading the
store directly (no patch servers), and `--parallel` runs go at once (default 2, the machine's cores), paired so that
runs sharing the machine are of different methods (ATS seed s with U-10 seed s; the two CNNs together). The reported
test error is the one evaluated after the budget ran out (sampled for ATS/U-10, 10 patches). Every run lands in the
MLflow experiment `--experiment` of the tracking store (default: the project's), so they compare in the MLflow UI.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import load_average  # noqa: E402
from benchmarks.smoke_data import ingest_mnist  # noqa: E402
from training import tracking  # noqa: E402

PROJECT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, slots=True)
class Settings:
    n_train: int = 5000
    n_test: int = 1000
    size: int = 1500
    n_digits: int = 5
    n_noise: int = 50
    budget_s: float = 360.0
    seeds: tuple[int, ...] = (0, 1, 2)
    cnn_scales: tuple[float, ...] = (0.25, 0.5)
    batch_size: int = 8
    lr: float = 1e-3
    low_scale: float = 0.125
    patch_size: int = 50
    n_patches: int = 10
    min_size: int = 128  # pyramid levels down to 188 px so the 0.125 view exists


SMOKE = Settings(n_train=16, n_test=8, size=384, n_digits=3, n_noise=4, budget_s=4.0, seeds=(0,),
                 cnn_scales=(0.25,), batch_size=4, low_scale=0.125, patch_size=32, n_patches=4, min_size=32)


@dataclass(frozen=True, slots=True)
class Job:
    label: str  # table row
    model: str  # ats | uniform | cnn
    seed: int
    scale: float = 0.0  # cnn only

    def run_name(self, tag: str) -> str:
        return f"bench-acc-{tag}-{self.label}-s{self.seed}".replace(" ", "").replace(".", "p")


def jobs_for(s: Settings) -> list[list[Job]]:
    """Groups that run at the same time: each group mixes methods, so contention hits all methods alike."""
    groups = [[Job(f"ATS-{s.n_patches}", "ats", seed), Job(f"U-{s.n_patches}", "uniform", seed)] for seed in s.seeds]
    groups.append([Job(f"CNN x{scale}", "cnn", 0, scale) for scale in s.cnn_scales])
    return groups


def command(s: Settings, job: Job, root: str, tracking_uri: str, experiment: str, tag: str, scratch: str
            ) -> list[str]:
    sets = {
        "data.low_scale": s.low_scale, "data.cnn_scale": job.scale or 0.25, "data.batch_size": s.batch_size,
        "data.n_attention_maps": 4, "model.n_patches": s.n_patches, "model.patch_hw": s.patch_size,
        "optim.lr": s.lr, "optim.seed": job.seed, "optim.time_budget_s": s.budget_s,
        "runtime.num_cpus": 1, "runtime.cpus_per_worker": 0.9, "runtime.torch_threads": 1,
        "runtime.tracking_uri": tracking_uri, "runtime.progress": False,
        "runtime.storage_path": os.path.join(scratch, job.run_name(tag)),
    }
    args = [sys.executable, str(PROJECT / "jobs" / "train.py"), "--data", root, "--model", job.model,
            "--epochs", "10000", "--workers", "1", "--servers", "0", "--experiment", experiment,
            "--run-name", job.run_name(tag)]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    return args


def run_group(s: Settings, group: list[Job], root: str, tracking_uri: str, experiment: str, tag: str,
              scratch: str, logs: Path) -> dict[Job, float]:
    """Start every job of the group at once; wall seconds per job."""
    started, procs = {}, {}
    for job in group:
        log = open(logs / f"{job.run_name(tag)}.log", "w")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT)}
        procs[job] = (subprocess.Popen(command(s, job, root, tracking_uri, experiment, tag, scratch), stdout=log,
                                       stderr=subprocess.STDOUT, env=env, cwd=PROJECT), log)
        started[job] = time.perf_counter()
    wall = {}
    for job, (proc, log) in procs.items():
        rc = proc.wait()
        log.close()
        wall[job] = time.perf_counter() - started[job]
        if rc != 0:
            tail = Path(log.name).read_text()[-4000:]
            raise SystemExit(f"{job.label} seed {job.seed} failed (exit {rc}); the end of its log:\n{tail}")
        print(f"  {job.label} seed {job.seed}: done in {wall[job]:.0f} s", flush=True)
    return wall


def fetch(tracking_uri: str, experiment: str, name: str) -> tuple[dict[str, float], int]:
    """Final metrics of the newest run called `name`, and how many epochs it evaluated."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    run = runs[0]
    return dict(run.data.metrics), len(client.get_metric_history(run.info.run_id, "test_error"))


def mean_se(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) / math.sqrt(len(values)):.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", default=str(PROJECT / ".gats" / "bench" / "mmnist1500"), help="ingested dataset ROOT")
    p.add_argument("--budget-s", type=float, default=None, help="training seconds per run")
    p.add_argument("--tracking-uri", default="", help="MLflow store (default: $MLFLOW_TRACKING_URI or the project's)")
    p.add_argument("--experiment", default="benchmark-accuracy")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    s = SMOKE if args.smoke else Settings()
    if args.budget_s is not None:
        s = replace(s, budget_s=args.budget_s)
    tmp = tempfile.TemporaryDirectory(prefix="gats-bench-acc-")
    root = str(Path(tmp.name) / "data") if args.smoke else args.data
    tracking_uri = args.tracking_uri or (f"sqlite:///{tmp.name}/mlflow.db" if args.smoke
                                         else tracking.default_tracking_uri())
    print(f"load average at start: {load_average()}", flush=True)
    if not (Path(root) / "manifest.parquet").is_file():
        t0 = time.perf_counter()
        ingest_mnist(root, s.n_train, s.n_test, size=s.size, n_digits=s.n_digits, n_noise=s.n_noise,
                     min_size=s.min_size, progress=True)
        print(f"ingested {s.n_train + s.n_test} images in {time.perf_counter() - t0:.0f} s", flush=True)
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri).get_experiment_by_name(args.experiment)  # creates a new store's tables once, here:
    tag = time.strftime("%Y%m%d-%H%M%S")  # runs starting together on a fresh SQLite store would race to create them
    logs = Path(tmp.name) / "logs"
    logs.mkdir()
    walls: dict[Job, float] = {}
    groups = jobs_for(s)
    if args.smoke:  # one Ray start-up's worth of waiting, and no U-N (it is the ATS job with another attention net):
        groups = [[job for group in groups for job in group if job.model != "uniform"]]  # the smoke checks wiring
    for group in groups:
        print(f"running together: {', '.join(f'{j.label} seed {j.seed}' for j in group)}", flush=True)
        walls |= run_group(s, group, root, tracking_uri, args.experiment, tag, tmp.name, logs)

    rows: dict[str, list[tuple[dict[str, float], int, float]]] = {}
    for job, wall in walls.items():
        metrics, epochs = fetch(tracking_uri, args.experiment, job.run_name(tag))
        rows.setdefault(job.label, []).append((metrics, epochs, wall))
    print(f"\nMegapixel MNIST {s.size}x{s.size}, {s.n_train} train / {s.n_test} test, {s.n_digits} digits "
          f"({s.n_digits // 2 + 1} give the label), {s.n_noise} noise patterns; budget {s.budget_s:.0f} s of training "
          f"steps per run, 1 CPU + 1 torch thread each, {len(groups[0])} runs at a time; chance = 0.900\n")
    print("| method | runs | test error (mean ± s.e.) | train error | epochs evaluated | samples trained | "
          "ms / sample | wall per run (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for label, results in rows.items():
        test = [m["test_error"] for m, _, _ in results]
        train = [m["train_error"] for m, _, _ in results]
        samples = [m["train_time_s"] * 1000 / m["time_per_sample_ms"] for m, _, _ in results]
        print(f"| {label} | {len(results)} | {mean_se(test)} | {mean_se(train)} | "
              f"{', '.join(str(e) for _, e, _ in results)} | {statistics.mean(samples):.0f} | "
              f"{statistics.median(m['time_per_sample_ms'] for m, _, _ in results):.1f} | "
              f"{statistics.median(w for _, _, w in results):.0f} |")
    print(f"\nMLflow experiment {args.experiment!r}, runs tagged {tag}: {tracking.ui_command(tracking_uri)}")
    print(f"load average at end: {load_average()}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
