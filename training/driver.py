"""The training driver's library: resolve a config on this machine, start Ray, run Ray Train with patch servers and
MLflow, and hand back the run. `jobs/train.py` parses arguments and calls these; the demo and benchmarks call them too.

    cfg = resolve(cfg)            absolute store paths, tracking URI, run name, progress bars only on a terminal
    start_ray(cfg)                embedded local Ray (never attaches to a running cluster) or the given address
    result = run(cfg)             -> TrainResult(run_id, run_name, tracking_uri, checkpoint, metrics)

Ray: `ray.init(address="local")` unless `runtime.address` is set or the job runs under `ray job submit` (which sets
RAY_ADDRESS). `run` starts N PatchServer actors over the data ROOT (named per run, fractional CPU reservations so
the servers and the trainer never deadlock on a small machine), then a `TorchTrainer` with W workers running
`training.loop.train_loop` (use_gpu when the cluster has GPUs). A worker that dies restarts the worker group from the
last epoch's checkpoint (`runtime.max_failures`). MLflow: the driver creates the run (params = the whole resolved
config with credentials stripped, the manifest checksum, `config.yaml`, tags), rank 0 logs the epoch metrics,
attention maps and run measurements, and the driver logs the final checkpoint as the model.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from training import config as C
from training import tracking

log = logging.getLogger("gats.train")
RAY_TRAIN_NOISE = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


class TrainingStopped(Exception):
    """Training was interrupted (Ctrl-C, or SIGTERM turned into KeyboardInterrupt by the entry point): the MLflow run
    is marked KILLED, the patch servers are gone, and `checkpoint` is the newest complete checkpoint that loads (None
    when no epoch finished), to pass to --resume."""

    def __init__(self, run_id: str, run_name: str, checkpoint: str | None) -> None:
        self.run_id, self.run_name, self.checkpoint = run_id, run_name, checkpoint
        resume = f"resume with --resume {checkpoint}" if checkpoint else "no epoch had finished: nothing to resume"
        super().__init__(f"training run {run_name} ({run_id}) stopped; the MLflow run is marked KILLED; {resume}")


class TrainingDataError(Exception):
    """Training stopped on a data error raised in a worker (a damaged chunk, storage unreachable, a missing image):
    the typed pipeline error, unwrapped from Ray's worker-failure wrappers, and the run it ended (marked FAILED)."""

    def __init__(self, run_id: str, run_name: str, error: BaseException) -> None:
        self.run_id, self.run_name, self.error = run_id, run_name, error
        super().__init__(f"{type(error).__name__}: {error} (training run {run_name} ({run_id}) is marked FAILED)")


@dataclass(frozen=True, slots=True)
class TrainResult:
    run_id: str
    run_name: str
    tracking_uri: str
    checkpoint: str | None
    metrics: dict[str, float]


def resolve(cfg: C.TrainConfig) -> C.TrainConfig:
    """Fill what depends on the machine: absolute store paths, the tracking URI, the run name; progress bars only
    when stderr is a terminal (log files get a line per epoch instead)."""
    if not cfg.data.root:
        raise C.ConfigError("No dataset: pass --data ROOT (a folder or s3://bucket/prefix made by jobs/ingest.py).")
    root = cfg.data.root if "://" in cfg.data.root else str(Path(cfg.data.root).expanduser().resolve())
    storage = cfg.runtime.storage_path or str(tracking.project_dir() / ".gats" / "ray_results")
    nested = cfg.model.nested
    kind = {"nested": f"nested-{nested.n_regions}x{nested.n_patches_per_region}"}.get(
        cfg.model.name, f"{cfg.model.name}-{cfg.model.n_patches}" if cfg.model.name in C.SAMPLED_MODELS
        else cfg.model.name)
    name = cfg.runtime.run_name or f"{kind}-{Path(root.rstrip('/')).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    resume = cfg.runtime.resume_from and str(Path(cfg.runtime.resume_from).expanduser().resolve())
    return cfg.replace(data={"root": root}, runtime={
        "tracking_uri": cfg.runtime.tracking_uri or tracking.default_tracking_uri(), "storage_path": storage,
        "run_name": name, "resume_from": resume or "", "progress": cfg.runtime.progress and sys.stderr.isatty()})


def quiet_worker_logs() -> None:
    """Ray worker set-up hook: Ray Train's placement-group cleaner polls the state API, which an embedded Ray
    without a dashboard does not serve, and warns about it every second; those lines only bury the training log."""
    logging.getLogger(RAY_TRAIN_NOISE).setLevel(logging.ERROR)


def start_ray(cfg: C.TrainConfig) -> None:
    import ray

    address = cfg.runtime.address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        ray.init(address="local", num_cpus=cfg.runtime.num_cpus or None, include_dashboard=False,
                 log_to_driver=True, configure_logging=False,
                 runtime_env={"worker_process_setup_hook": quiet_worker_logs})
    else:
        ray.init(address=address, configure_logging=False)


def use_gpu(cfg: C.TrainConfig) -> bool:
    import ray

    if cfg.runtime.use_gpu != "auto":
        return cfg.runtime.use_gpu == "true"
    return ray.cluster_resources().get("GPU", 0) > 0


def create_run(cfg: C.TrainConfig) -> tracking.MlflowTracker:
    """The MLflow run of a training job (tracking.open_run: tags, params, config.yaml, the manifest as its dataset
    input, a description); rank 0 and the driver log into it by id."""
    rt = cfg.runtime
    run = tracking.open_run(
        cfg, rt.tracking_uri, experiment=rt.experiment, run_name=rt.run_name, kind="train", context="training",
        tags={"gats.workers": str(rt.num_workers), "gats.patch_servers": str(rt.num_patch_servers)},
        params={"eval_mode": rt.eval_mode},
        note=[f"trained on `{cfg.data.train_split}`, tested on `{cfg.data.test_split}`; {cfg.optim.epochs} epochs, "
              f"Ray workers: {rt.num_workers}"])
    log.info("MLflow run %s (%s) in %s", rt.run_name, run.run_id, rt.tracking_uri)  # redacted by the log filter
    return run


def _fit(trainer: Any) -> Any:
    """`trainer.fit()` in a helper thread while the main thread waits in short joins. Off the main thread, Ray Train
    does not install its own SIGINT handler (which aborts the controller and ends the process with status 1 and no
    cleanup of ours), so SIGINT and SIGTERM both reach the entry point's handler: a KeyboardInterrupt raised here,
    in the main thread, unwinds through `run`'s cleanup (run KILLED, servers killed) and the caller shuts Ray down,
    which ends the abandoned fit."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as exc:  # handed to the main thread as is
            box["error"] = exc

    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.2)  # interruptible: a signal handler's KeyboardInterrupt lands here
    if "error" in box:
        raise box["error"]
    return box["result"]


def run(cfg: C.TrainConfig, *, on_step: Callable[[int, int, int, int], None] | None = None) -> TrainResult:
    """Train with an already resolved config inside a running Ray; returns the run and its final metrics.
    `on_step(epoch, step, steps, rank)` is called in every worker after every training step (tests, hooks)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from training.loop import train_loop
    from training.models import import_plugins

    import_plugins(cfg.model.plugins)  # fail here, before Ray starts workers, when a plugin is missing
    if cfg.model.band_scaled is None:  # decided once, so the params, the workers and the checkpoints agree
        from training.data import load_splits, with_band_scaling

        cfg, why = with_band_scaling(cfg, load_splits(cfg.data, cfg.optim.seed).train, cfg.runtime.resume_from)
        log.info("model.band_scaled=%s (%s)", str(cfg.model.band_scaled).lower(), why)
    rt = cfg.runtime
    run = create_run(cfg)
    servers: list[Any] = []
    status = "FAILED"
    ray_name = f"{rt.run_name}-{run.run_id[:8]}"
    run_dir = "" if "://" in rt.storage_path else str(Path(rt.storage_path, ray_name))
    try:
        if rt.num_patch_servers and not cfg.data.in_memory:  # in memory: every worker holds the pixels itself
            from pipeline.serving import ServerOptions, start_servers

            options = ServerOptions(name_prefix=f"gats-{run.run_id[:8]}-patch-server", num_cpus=rt.server_cpus)
            servers = start_servers(cfg.data.root, rt.num_patch_servers, options)
        loop_config = {"config": cfg.to_dict(), "run_id": run.run_id, "servers": servers, "on_step": on_step,
                       "run_dir": run_dir}
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=loop_config,
            scaling_config=ray.train.ScalingConfig(num_workers=rt.num_workers, use_gpu=use_gpu(cfg),
                                                   resources_per_worker={"CPU": rt.cpus_per_worker}),
            run_config=ray.train.RunConfig(
                name=ray_name, storage_path=rt.storage_path,
                failure_config=ray.train.FailureConfig(max_failures=rt.max_failures),
                # keep the selected epoch's checkpoint (optim.select_metric; the latest one without it) and the
                # latest (Ray always keeps it, so a resume continues where training stopped)
                checkpoint_config=ray.train.CheckpointConfig(
                    num_to_keep=2, checkpoint_score_attribute="selection_score", checkpoint_score_order="max")),
        )
        try:
            result = _fit(trainer)
            if result.error is not None:
                raise result.error
        except Exception as exc:  # Ray Train raises worker errors wrapped; a data error is reported as itself
            from pipeline.errors import PipelineError, find_error

            cause = find_error(exc, PipelineError)
            if cause is not None:
                raise TrainingDataError(run.run_id, rt.run_name, cause) from exc
            raise
        best = max(result.best_checkpoints or [], key=lambda cm: (cm[1]["selection_score"], -cm[1]["epoch"]),
                   default=None)
        chosen = best[0] if best else result.checkpoint
        checkpoint = chosen.path if chosen is not None else None
        if checkpoint:
            run.set_tags({"gats.checkpoint": checkpoint})
            with chosen.as_directory() as folder:  # a local copy when storage is s3://
                run.log_checkpoint(folder)  # the model: the selected epoch's weights
        metrics = dict(run.client.get_run(run.run_id).data.metrics)
        status = "FINISHED"
        return TrainResult(run.run_id, rt.run_name, rt.tracking_uri, checkpoint, metrics)
    except KeyboardInterrupt:
        status = "KILLED"
        from training.checkpoint import newest_loadable

        last = newest_loadable(run_dir) if run_dir else None
        raise TrainingStopped(run.run_id, rt.run_name, last) from None
    finally:
        run.finish(status)
        for handle in servers:
            ray.kill(handle)
