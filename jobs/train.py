"""Train a model on an ingested dataset with Ray Train, tracked in MLflow (the training driver).

    python jobs/train.py --data ROOT --model {ats,deepmil,cnn,uniform} [--config FILE] [--smoke-test] \
        [--set model.n_patches=10 ...] [--epochs N] [--workers W] [--servers N] [--address ADDR] [--resume CKPT]

Ray: an embedded local instance (`ray.init(address="local")`: a bare `ray.init()` would attach to any cluster
already running) unless `--address` is given or the job runs under `ray job submit` (which sets RAY_ADDRESS); then
it connects. The driver starts N PatchServer actors over ROOT (named per run, fractional CPU reservations so the
servers and the trainer never deadlock on a small machine), then a Ray Train `TorchTrainer` with W workers running
`jobs.train_loop.train_loop` (use_gpu when the cluster has GPUs). A worker that dies restarts the worker group from
the last epoch's checkpoint (`runtime.max_failures`); `--resume CKPT` starts from a checkpoint folder.

MLflow: the driver creates the run (params = the whole resolved config, the data ROOT and its manifest checksum,
`config.yaml`, tags), rank 0 logs the epoch metrics, attention maps and run measurements, and the driver logs the
final model (`mlflow.pytorch`). The store is $MLFLOW_TRACKING_URI, else `<project>/.gats/mlflow.db`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # `python jobs/train.py` from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs import config as C  # noqa: E402
from jobs import tracking  # noqa: E402

log = logging.getLogger("gats.train")


@dataclass(frozen=True, slots=True)
class TrainResult:
    run_id: str
    run_name: str
    tracking_uri: str
    checkpoint: str | None
    metrics: dict[str, float]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", help="ROOT of an ingested dataset (folder or s3://bucket/prefix)")
    p.add_argument("--model", choices=C.MODELS, help="ats | uniform (U-N) | deepmil | cnn")
    p.add_argument("--config", help="YAML file with data:/model:/optim:/runtime: sections")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set model.n_patches=10 (repeatable)")
    p.add_argument("--epochs", type=int, help="= --set optim.epochs=N")
    p.add_argument("--workers", type=int, help="Ray Train workers (= runtime.num_workers)")
    p.add_argument("--servers", type=int, help="patch servers (= runtime.num_patch_servers; 0: workers read)")
    p.add_argument("--n-patches", type=int, help="= --set model.n_patches=N")
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


def resolve(cfg: C.TrainConfig) -> C.TrainConfig:
    """Fill what depends on the machine: absolute store paths, the tracking URI, the run name."""
    if not cfg.data.root:
        raise C.ConfigError("No dataset: pass --data ROOT (a folder or s3://bucket/prefix made by jobs/ingest.py).")
    root = cfg.data.root if "://" in cfg.data.root else str(Path(cfg.data.root).expanduser().resolve())
    storage = cfg.runtime.storage_path or str(tracking.project_dir() / ".gats" / "ray_results")
    name = cfg.runtime.run_name or (
        f"{cfg.model.name}-{cfg.model.n_patches}" if cfg.model.name in ("ats", "uniform") else cfg.model.name
    ) + f"-{Path(root.rstrip('/')).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    resume = cfg.runtime.resume_from and str(Path(cfg.runtime.resume_from).expanduser().resolve())
    return cfg.replace(data={"root": root}, runtime={
        "tracking_uri": cfg.runtime.tracking_uri or tracking.default_tracking_uri(), "storage_path": storage,
        "run_name": name, "resume_from": resume or ""})


def start_ray(cfg: C.TrainConfig) -> None:
    import ray

    address = cfg.runtime.address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        ray.init(address="local", num_cpus=cfg.runtime.num_cpus or None, include_dashboard=False,
                 log_to_driver=True, configure_logging=False)
    else:
        ray.init(address=address, configure_logging=False)


def use_gpu(cfg: C.TrainConfig) -> bool:
    import ray

    if cfg.runtime.use_gpu != "auto":
        return cfg.runtime.use_gpu == "true"
    return ray.cluster_resources().get("GPU", 0) > 0


def run(cfg: C.TrainConfig) -> TrainResult:
    """Train with an already resolved config inside a running Ray; returns the run and its final metrics."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from jobs.train_loop import train_loop

    rt = cfg.runtime
    run = tracking.MlflowTracker.create(rt.tracking_uri, rt.experiment, rt.run_name, tags={
        "gats.model": cfg.model.name, "gats.data_root": cfg.data.root, "gats.kind": "train",
        "gats.workers": str(rt.num_workers), "gats.patch_servers": str(rt.num_patch_servers)})
    servers: list[Any] = []
    status = "FAILED"
    try:
        run.log_params({**C.flatten(cfg), "data.manifest_checksum": tracking.manifest_checksum(cfg.data.root),
                        "eval_mode": rt.eval_mode})
        run.log_text(C.to_yaml(cfg), "config.yaml")
        if rt.num_patch_servers and not cfg.data.in_memory:  # in memory: every worker holds the pixels itself
            from pipeline.serving import ServerOptions, start_servers

            options = ServerOptions(name_prefix=f"gats-{run.run_id[:8]}-patch-server", num_cpus=rt.server_cpus)
            servers = start_servers(cfg.data.root, rt.num_patch_servers, options)
        ray_name = f"{rt.run_name}-{run.run_id[:8]}"
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"config": cfg.to_dict(), "run_id": run.run_id, "servers": servers,
                               "run_dir": "" if "://" in rt.storage_path else str(Path(rt.storage_path, ray_name))},
            scaling_config=ray.train.ScalingConfig(num_workers=rt.num_workers, use_gpu=use_gpu(cfg),
                                                   resources_per_worker={"CPU": rt.cpus_per_worker}),
            run_config=ray.train.RunConfig(
                name=ray_name, storage_path=rt.storage_path,
                failure_config=ray.train.FailureConfig(max_failures=rt.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
        )
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        checkpoint = result.checkpoint.path if result.checkpoint is not None else None
        if checkpoint:
            run.set_tags({"gats.checkpoint": checkpoint})
            with result.checkpoint.as_directory() as folder:  # a local copy when storage is s3://
                run.log_model(load_checkpoint(folder)[0])
        metrics = dict(run.client.get_run(run.run_id).data.metrics)
        status = "FINISHED"
        return TrainResult(run.run_id, rt.run_name, rt.tracking_uri, checkpoint, metrics)
    finally:
        run.finish(status)
        for handle in servers:
            ray.kill(handle)


def load_checkpoint(folder: str) -> tuple[Any, C.TrainConfig, dict]:
    """(core model with the checkpoint's weights, its config, the raw state) from a checkpoint folder."""
    import torch

    from jobs.models import build_model, core
    from jobs.train_loop import STATE_FILE

    cfg = C.load(Path(folder) / "config.yaml")
    state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)
    model = core(build_model(cfg.model, int(state["in_channels"]), len(state["classes"])))
    model.load_state_dict(state["model"])
    return model, cfg, state


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
        if args.print_config:
            print(C.to_yaml(cfg))
            return 0
        if not cfg.data.root:
            parser.error("--data ROOT is required (a folder or s3://bucket/prefix made by jobs/ingest.py).")
        cfg = resolve(cfg)
    except C.ConfigError as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    import ray

    start_ray(cfg)
    try:
        result = run(cfg)
    finally:
        ray.shutdown()
    m = result.metrics
    print(f"run {result.run_name} ({result.run_id}): train error {m.get('train_error', float('nan')):.3f}, "
          f"test error ({cfg.runtime.eval_mode}) {m.get('test_error', float('nan')):.3f}, "
          f"{m.get('time_per_sample_ms', float('nan')):.1f} ms/sample")
    print(f"checkpoint: {result.checkpoint}")
    print(f"MLflow: {tracking.ui_command(result.tracking_uri)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
