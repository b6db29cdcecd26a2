"""Train a model on an ingested dataset with Ray Train, tracked in MLflow (the training driver).

    python jobs/train.py --data ROOT --model {ats,deepmil,cnn,uniform,nested} [--config FILE] [--smoke-test] \
        [--set model.n_patches=10 ...] [--epochs N] [--workers W] [--servers N] [--address ADDR] [--resume CKPT]

Ray: an embedded local instance (`ray.init(address="local")`: a bare `ray.init()` would attach to any cluster
already running) unless `--address` is given or the job runs under `ray job submit` (which sets RAY_ADDRESS); then
it connects. The driver starts N PatchServer actors over ROOT (named per run, fractional CPU reservations so the
servers and the trainer never deadlock on a small machine), then a Ray Train `TorchTrainer` with W workers running
`training.loop.train_loop` (use_gpu when the cluster has GPUs). A worker that dies restarts the worker group from
the last epoch's checkpoint (`runtime.max_failures`); `--resume CKPT` starts from a checkpoint folder.

Stopping: SIGTERM (batch schedulers, `timeout`, container stops) and SIGINT (Ctrl-C) stop the run the same way: the
MLflow run is marked KILLED, the patch servers and Ray are shut down, the last complete checkpoint is kept and its
folder printed for --resume; the exit status is 128 + the signal number (143, 130). A second signal exits at once.

MLflow: the driver creates the run (params = the whole resolved config, the data ROOT and its manifest checksum,
`config.yaml`, tags), rank 0 logs the epoch metrics, attention maps and run measurements, and the driver logs the
final model (a weights-only checkpoint folder, `model/`). The store is $MLFLOW_TRACKING_URI, else
`<project>/.gats/mlflow.db`. The work is done by `training.driver` (resolve, start_ray, run); this file only parses.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Sequence

from training import config as C
from training import driver, tracking
from training.logs import configure_logging
from training.secrets import redact, redact_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", help="ROOT of an ingested dataset (folder or s3://bucket/prefix)")
    p.add_argument("--model", choices=C.MODELS,
                   help="ats | uniform (U-N) | deepmil | cnn | nested (regions, then patches)")
    p.add_argument("--config", help="YAML file with data:/model:/optim:/runtime: sections")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set model.n_patches=10 (repeatable)")
    p.add_argument("--epochs", type=int, help=f"= --set optim.epochs=N (default {C.OptimConfig().epochs})")
    p.add_argument("--workers", type=int,
                   help=f"Ray Train workers (= runtime.num_workers, default {C.RuntimeConfig().num_workers})")
    p.add_argument("--servers", type=int, help="patch servers (= runtime.num_patch_servers, default "
                   f"{C.RuntimeConfig().num_patch_servers}; 0: workers read the store)")
    p.add_argument("--n-patches", type=int, help=f"= --set model.n_patches=N (default {C.ModelConfig().n_patches})")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument("--resume", metavar="CHECKPOINT", help="a checkpoint folder to continue from")
    p.add_argument("--run-name", help="MLflow run name")
    p.add_argument("--experiment", help="MLflow experiment name")
    p.add_argument("--smoke-test", action="store_true", help="a tiny run (8 images, 1 epoch) that checks the wiring")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def config_from_args(args: argparse.Namespace) -> C.TrainConfig:
    direct = {
        "data": {"root": args.data} if args.data else {},
        "model": {k: v for k, v in (("name", args.model), ("n_patches", args.n_patches)) if v is not None},
        "optim": {"epochs": args.epochs} if args.epochs is not None else {},
        "runtime": {k: v for k, v in (("num_workers", args.workers), ("num_patch_servers", args.servers),
                                      ("address", args.address), ("resume_from", args.resume),
                                      ("run_name", args.run_name), ("experiment", args.experiment)) if v is not None},
    }
    cfg = C.load(args.config, args.overrides, **direct)
    return C.smoke(cfg) if args.smoke_test else cfg


class StopOnSignal:
    """SIGTERM and SIGINT raise KeyboardInterrupt in the main thread (once), so both unwind through the same cleanup;
    a second signal while that cleanup runs exits at once with 128 + its number."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum else None

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            os._exit(128 + signum)
        self.signum = signum
        raise KeyboardInterrupt

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging()
    try:
        cfg = config_from_args(args)
        if args.print_config:
            print(C.to_yaml(redact_config(cfg)))
            return 0
        if not cfg.data.root:
            parser.error("--data ROOT is required (a folder or s3://bucket/prefix made by jobs/ingest.py).")
        cfg = driver.resolve(cfg)
        from training.models import import_plugins
        from training.preflight import preflight

        import_plugins(cfg.model.plugins)
        preflight(cfg)  # the data and the config fit each other: checked here, before Ray or an MLflow run exists
    except C.ConfigError as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    import ray

    driver.start_ray(cfg)
    stop = StopOnSignal()  # after ray.init, so that our handlers are the ones in place
    try:
        result = driver.run(cfg)
    except driver.TrainingDataError as exc:  # a damaged chunk, storage unreachable: the typed error, one line
        print(f"train: error: {redact(str(exc))}", file=sys.stderr, flush=True)
        return 1
    except driver.TrainingStopped as exc:
        print(f"train: stopped by {stop.name or 'an interrupt'}: {redact(str(exc))}", file=sys.stderr, flush=True)
        return 128 + (stop.signum or signal.SIGINT)
    finally:
        ray.shutdown()
        stop.restore()
    m = result.metrics
    nan = float("nan")
    print(f"run {result.run_name} ({result.run_id}): train error {m.get('train_error', nan):.3f}, "
          f"test error ({cfg.runtime.eval_mode}) {m.get('selected_test_error', m.get('test_error', nan)):.3f} at the "
          f"selected epoch {m.get('selected_epoch', nan):.0f}, {m.get('time_per_sample_ms', nan):.1f} ms/sample")
    print(f"checkpoint: {redact(str(result.checkpoint))}")
    print(f"MLflow: {tracking.ui_command(result.tracking_uri)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
