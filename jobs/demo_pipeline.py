"""The full-pipeline demo (what `make demo` runs): generate -> ingest -> Ray Train (ATS-10 and U-10) -> MLflow.

    python jobs/demo_pipeline.py [--smoke-test] [--n-train N] [--epochs E] ...

1. Generates a reduced Megapixel MNIST (canvas DEMO.size px instead of the paper's 1500, DEMO.n_digits digits from
   classes 0..DEMO.n_classes-1 of which a strict majority give the label, DEMO.n_noise line-noise patches; see
   DemoConfig for why) with `pipeline.ingest.ingest_generated` into the default local store `<project>/.gats/data/` (a rerun skips
   complete images).
2. Starts one embedded Ray and trains ATS-10 (attention sampling, 10 patches) and then U-10 (uniform sampling, same
   feature net, patch size and N) with 2 Ray Train workers each and 2 patch servers, on the local MLflow store.
3. Prints their test errors side by side and the `mlflow ui` command that shows both runs.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from training import config as C
from training import tracking
from training.logs import configure_logging


@dataclass(frozen=True, slots=True)
class DemoConfig:
    # A reduction of the paper's task sized so that both models train in ~10 minutes on 2 CPU cores and attention
    # has something to find: one digit from classes 0-2 on a 256x256 canvas, 32x32 low-res view (1024 cells, the
    # digit about 1% of the area); a 32 px patch holds one digit. With line noise or a 3-digit majority the feature
    # net does not get past chance within this budget (attention sampling needs many more epochs there).
    size: int = 256  # canvas side, px (the paper: 1500)
    n_digits: int = 1
    n_noise: int = 0
    n_classes: int = 3  # digits drawn from classes 0..n_classes-1 (the paper: 10)
    n_train: int = 600
    n_test: int = 200
    seed: int = 0
    epochs: int = 10
    lr: float = 3e-3
    batch_size: int = 8  # per worker: 2 workers make 16 per step
    n_patches: int = 10
    patch_size: int = 32
    low_scale: float = 0.125  # attention on a 32x32 view of the 256x256 canvas
    workers: int = 2
    servers: int = 2


DEMO = DemoConfig()


def data_root(cfg: DemoConfig) -> Path:
    return (tracking.project_dir() / ".gats" / "data" /
            f"megapixel-mnist-{cfg.size}px-{cfg.n_digits}d-{cfg.n_noise}n-{cfg.n_classes}c-{cfg.n_train}-{cfg.n_test}-"
            f"s{cfg.seed}")


def ingest(cfg: DemoConfig) -> str:
    from jobs.progress import Progress
    from pipeline.ingest import WriteOptions, ingest_generated
    from pipeline.megapixel_mnist import MegapixelMNISTConfig

    root = str(data_root(cfg))
    config = MegapixelMNISTConfig(size=cfg.size, n_digits=cfg.n_digits, n_noise=cfg.n_noise, seed=cfg.seed,
                                  n_classes=cfg.n_classes)
    options = WriteOptions(chunk=128, min_size=max(16, round(cfg.size * cfg.low_scale)))
    with Progress() as progress:
        report = ingest_generated(root, config, n_train=cfg.n_train, n_test=cfg.n_test, options=options, workers=2,
                                  on_start=progress.start, on_image=progress.update)
    print(report.summary(), flush=True)
    if not report.complete:
        raise SystemExit(f"Ingest into {root} failed for {len(report.failed)} images; see the summary above.")
    return root


def train_config(cfg: DemoConfig, root: str, model: str, experiment: str) -> C.TrainConfig:
    return C.from_dict({
        "data": {"root": root, "low_scale": cfg.low_scale, "batch_size": cfg.batch_size, "n_attention_maps": 4},
        "model": {"name": model, "n_patches": cfg.n_patches, "patch_hw": cfg.patch_size, "feature_dim": 64},
        "optim": {"epochs": cfg.epochs, "lr": cfg.lr, "seed": cfg.seed},
        "runtime": {"num_workers": cfg.workers, "num_patch_servers": cfg.servers, "experiment": experiment,
                    "run_name": f"demo-{model}-{cfg.n_patches}-{time.strftime('%Y%m%d-%H%M%S')}"},
    })


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--n-train", type=int, default=DEMO.n_train)
    p.add_argument("--n-test", type=int, default=DEMO.n_test)
    p.add_argument("--size", type=int, default=DEMO.size)
    p.add_argument("--epochs", type=int, default=DEMO.epochs)
    p.add_argument("--lr", type=float, default=DEMO.lr)
    p.add_argument("--experiment", default="demo")
    p.add_argument("--smoke-test", action="store_true", help="tiny data, one epoch: checks the wiring only")
    args = p.parse_args(argv)
    configure_logging()
    cfg = replace(DEMO, n_train=args.n_train, n_test=args.n_test, size=args.size, epochs=args.epochs, lr=args.lr)
    if args.smoke_test:
        cfg = replace(cfg, n_train=8, n_test=4, epochs=1, batch_size=2)
    started = time.perf_counter()
    root = ingest(cfg)
    print(f"Data: {cfg.n_train} train / {cfg.n_test} test Megapixel MNIST images of {cfg.size}x{cfg.size} px "
          f"({cfg.n_digits} digits of classes 0-{cfg.n_classes - 1}, majority label; {cfg.n_noise} noise patches) "
          f"in {root}")

    import ray

    from training import driver as train

    results = []
    from training.preflight import preflight

    first = train.resolve(train_config(cfg, root, "ats", args.experiment))
    preflight(first)  # the demo's data and config fit each other, before Ray starts
    train.start_ray(first)
    try:
        for model in ("ats", "uniform"):
            tc = first if model == "ats" else train.resolve(train_config(cfg, root, model, args.experiment))
            if args.smoke_test:
                tc = tc.replace(runtime={"progress": False})
            t0 = time.perf_counter()
            results.append((f"{'ATS' if model == 'ats' else 'U'}-{cfg.n_patches}", train.run(tc),
                            time.perf_counter() - t0))
    finally:
        ray.shutdown()

    print()
    print("| model | train error | test error | ms / sample | wall time |")
    print("|---|---|---|---|---|")
    for name, result, seconds in results:
        m = result.metrics
        print(f"| {name} | {m.get('train_error', float('nan')):.3f} | {m.get('test_error', float('nan')):.3f} | "
              f"{m.get('time_per_sample_ms', float('nan')):.1f} | {seconds:.0f} s |")
    print(f"\nTotal {time.perf_counter() - started:.0f} s. Look at both runs: "
          f"{tracking.ui_command(results[0][1].tracking_uri)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
