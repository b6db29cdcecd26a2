"""The per-worker training loop (Ray Train calls `train_loop(config)` on each worker; tests call it directly).

Per batch on each worker: the low-res views (cached per worker, the NEXT batch's prefetched by a background thread
while this step runs unless `data.prefetch` is off), attention, sampling, level-0 boxes, ONE `read_many` request
per patch server for only those boxes, the feature net, the estimator, the loss, backward, optimiser step (DDP
through ray.train.torch).

Why patch reads are overlapped inside the step and not prefetched for the next batch: the next batch's patches
would have to be sampled from the attention BEFORE this step's update, while the estimator weighs them with the
attention AFTER it; sampling from a stale distribution biases the estimator. So `StreamingATS` (training/models.py)
samples all B images, fires every server's request at once (Ray futures), and runs the feature net on whichever
server's micro-batch of images arrives first (`ray.wait`), then the next, so compute hides the slower servers' I/O
(direct reads do the same image by image from a read thread, see training/data.py DirectFetcher). Only
inputs that do not depend on the parameters (low-res views, labels) are prefetched across steps.

Each epoch: train on this worker's shard; test error in the configured mode on this worker's slice of the test
split, summed over workers (all-reduce); a checkpoint (model + optimiser) reported by rank 0; rank 0 logs the
metrics and attention heatmaps of fixed test images to MLflow. At the end rank 0 logs the per-run measurements.
With `optim.time_budget_s`, training stops at the first step that ends past the budget (seconds of training steps,
evaluation excluded, summed over resumed attempts; all workers stop at the same step), then evaluates as usual.

Step memory (`step_memory_mb`): per epoch, training.memory resets the RSS high-water mark after returning free heap to the
OS, and the training phase's high-water mark minus the RSS at its start is that epoch's figure; the run reports the
largest over epochs after the first (the first also holds the growth of the low-res view cache) when there are any.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from training import config as C
from training import memory
from training.data import (Batch, DirectFetcher, InMemoryImages, LowResViews, ServerFetcher, batched, class_weights,
                       load_split, shard_indices)
from training.models import attention_maps, build_model, core, eval_logits, train_forward
from training.tracking import Tracker, save_heatmap, tracker_for

log = logging.getLogger("gats.train")
STATE_FILE = "state.pt"
EPOCH_FILE = "epoch.txt"  # written after state.pt: a checkpoint folder with it is complete


# -----------------------------------------------------------------------------
# sessions: Ray Train or a plain local run (tests)

class LocalSession:
    """World of one, checkpoints into a folder; what tests use to run the loop without Ray."""

    def __init__(self, checkpoint_dir: str | Path) -> None:
        self.dir = Path(checkpoint_dir)
        self.reports: list[dict[str, float]] = []
        self.rank, self.world = 0, 1

    def device(self) -> torch.device:
        return torch.device("cpu")

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def latest(self) -> str | None:
        found = sorted(self.dir.glob("epoch_*"))
        return str(found[-1]) if found else None

    def report(self, metrics: dict[str, float], folder: str | None) -> None:
        self.reports.append(metrics)
        if folder:
            import shutil

            shutil.copytree(folder, self.dir / f"epoch_{int(metrics['epoch']):04d}", dirs_exist_ok=True)


class RaySession:
    """Inside a Ray Train worker. `run_dir`: the run's checkpoint folder on a local or shared file system."""

    def __init__(self, run_dir: str = "") -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.run_dir = run_dir

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def prepare(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def latest(self) -> str | None:
        """The newest complete checkpoint: Ray's, or a newer one found in the run folder. Ray Train registers a
        reported checkpoint when its controller next polls the workers, so a worker that dies right after
        `report` leaves a checkpoint on storage that Ray does not hand back; we would redo that epoch otherwise."""
        import ray.train

        candidates = []
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            candidates.append(ckpt.to_directory())
        if self.run_dir and Path(self.run_dir).is_dir():
            candidates += [str(p.parent) for p in Path(self.run_dir).glob(f"checkpoint_*/{EPOCH_FILE}")]
        return max(candidates, key=checkpoint_epoch, default=None)

    def report(self, metrics: dict[str, float], folder: str | None) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None)


def checkpoint_epoch(folder: str) -> int:
    """The epoch a checkpoint folder holds, -1 when it is incomplete."""
    try:
        return int((Path(folder) / EPOCH_FILE).read_text())
    except (OSError, ValueError):
        return -1


def all_reduce(values: Sequence[float], op: str = "sum") -> list[float]:
    """Sum (or max) over workers; identity without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


# -----------------------------------------------------------------------------
# the loop

@dataclass
class Meter:
    """Per-worker measurements over the training steps of this attempt."""

    step_s: float = 0.0
    samples: int = 0
    budget_used_s: float = 0.0  # seconds of training steps, earlier attempts included (checkpointed)
    first_epoch_mb: float = 0.0  # step memory of this attempt's first epoch
    later_epochs_mb: float = -1.0  # the largest over its later epochs (-1: none ran)
    peak_mb: float = 0.0  # RSS high-water mark before each reset
    io_wait_s: float = 0.0  # seconds blocked on pixels during training steps (evaluation excluded)
    patches: int = 0  # patches received during training steps
    local_bytes: int = 0  # read by this worker's own reader (low-res views; patches too without servers)
    server_bytes: int = 0  # rank 0: read by all patch servers during all workers' training phases


def train_loop(loop_config: dict[str, Any], session: LocalSession | RaySession | None = None) -> None:
    """Entry point per worker. loop_config: {"config": TrainConfig.to_dict(), "run_id": str, "servers": [handles]}."""
    cfg = C.from_dict(loop_config["config"])
    session = session or RaySession(loop_config.get("run_dir", ""))
    rank, world = session.rank, session.world
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s rank%(process)d %(name)s: %(message)s")
    device = session.device()
    if cfg.runtime.torch_threads:
        torch.set_num_threads(cfg.runtime.torch_threads)
    torch.manual_seed(cfg.optim.seed)
    tracker = tracker_for(rank, cfg.runtime.tracking_uri, loop_config.get("run_id", ""))

    from pipeline.reader import PatchReader

    reader = PatchReader(cfg.data.root)
    servers = loop_config.get("servers") or []
    train, classes = load_split(cfg.data.root, cfg.data.train_split, cfg.data.max_train)
    test, _ = load_split(cfg.data.root, cfg.data.test_split, cfg.data.max_test)
    # the CNN's input level; Deep MIL never looks at a view (its patches come from level 0): the coarsest level
    scale = {"cnn": cfg.data.cnn_scale, "deepmil": 1e-9}.get(cfg.model.name, cfg.data.low_scale)
    views = LowResViews(reader, scale)
    if cfg.data.in_memory:  # every pixel this worker can need, read once before training (patch servers unused)
        patched = cfg.model.name != "cnn"  # the CNN needs its low-res view only
        images = InMemoryImages(reader, [e.image_id for e in train + test] if patched else [])
        for part in batched(train + test, 64):
            views.batch(part)
        fetcher: DirectFetcher | ServerFetcher = DirectFetcher(images)
        log.info("data.in_memory: %.0f MB of level-0 pixels and %d low-res views in RAM", images.nbytes / 2**20,
                 len(views.cache))
    else:
        fetcher = ServerFetcher(servers) if servers else DirectFetcher(reader)
    weights = class_weights(train, len(classes)).to(device) if cfg.optim.class_weighted else None

    model = build_model(cfg.model, train[0].channels, len(classes))
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    start_epoch, budget_used_s = 1, 0.0
    ckpt = session.latest() or (cfg.runtime.resume_from or None)
    if ckpt:
        state = torch.load(Path(ckpt) / STATE_FILE, map_location="cpu", weights_only=False)
        core(model).load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"]) + 1
        budget_used_s = float(state.get("budget_used_s", 0.0))
        log.info("resuming from %s at epoch %d", ckpt, start_epoch)
    model = session.prepare(model.to(device))

    meter = Meter(budget_used_s=budget_used_s)
    budget = cfg.optim.time_budget_s
    prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
    progress = cfg.runtime.progress and rank == 0
    epochs_bar = _bar(session, progress, cfg.optim.epochs, "epochs", 0)
    if epochs_bar is not None:
        epochs_bar.update(start_epoch - 1)
    out_of_time = budget > 0 and budget_used_s >= budget
    for epoch in range(start_epoch, cfg.optim.epochs + 1):
        if out_of_time:
            break
        gen = torch.Generator(device=device).manual_seed(cfg.optim.seed * 1000 + epoch * 100 + rank)
        mine = shard_indices(len(train), rank, world, epoch=epoch, seed=cfg.optim.seed)
        steps = batched([train[i] for i in mine], cfg.data.batch_size)
        loss_sum = err_sum = count = 0.0
        model.train()
        all_reduce([0.0])  # barrier: every worker starts its training phase here
        bytes_before, server_before = reader.stats.bytes_read, _server_bytes(servers, rank)
        wait_before, patches_before = fetcher.io.wait_s, fetcher.io.patches
        meter.peak_mb = max(meter.peak_mb, memory.hwm_mb())  # before the reset forgets it
        step_memory = memory.StepMemory().start()
        future = prefetch.submit(views.batch, steps[0]) if cfg.data.prefetch else None
        bar = _bar(session, progress, len(steps), f"epoch {epoch}", 1)
        for k in range(len(steps)):
            start = time.perf_counter()
            if future is not None:
                batch = future.result()  # the low-res views were read while the previous step ran
                future = prefetch.submit(views.batch, steps[k + 1]) if k + 1 < len(steps) else None
            else:
                batch = views.batch(steps[k])
            fetcher.io.wait_s += time.perf_counter() - start
            batch = _to(batch, device)
            optimiser.zero_grad(set_to_none=True)
            loss, logits = train_forward(model, batch, fetcher, weights, gen)
            loss.backward()
            optimiser.step()
            took = time.perf_counter() - start
            meter.step_s += took
            meter.budget_used_s += took
            meter.samples += len(batch.image_ids)
            loss_sum += float(loss.detach()) * len(batch.image_ids)
            err_sum += int((logits.argmax(1) != batch.labels).sum())
            count += len(batch.image_ids)
            if bar is not None:
                bar.set_description(f"epoch {epoch} loss {loss_sum / count:.3f} err {err_sum / count:.3f}")
                bar.update(1)
            _maybe_fail(cfg.runtime, rank, epoch, k, len(steps))
            if budget > 0 and all_reduce([float(meter.budget_used_s >= budget)], op="max")[0] > 0:
                out_of_time = True  # every worker sees the same maximum, so all stop after this step
                log.info("optim.time_budget_s=%g reached after %d of %d steps of epoch %d", budget, k + 1,
                         len(steps), epoch)
                break
        if future is not None:
            future.result()
        meter.io_wait_s += fetcher.io.wait_s - wait_before
        meter.patches += fetcher.io.patches - patches_before
        epoch_mb = step_memory.stop()
        if epoch == start_epoch:
            meter.first_epoch_mb = epoch_mb
        else:
            meter.later_epochs_mb = max(meter.later_epochs_mb, epoch_mb)
        if bar is not None:
            bar.close()
        loss_sum, err_sum, count = all_reduce([loss_sum, err_sum, count])  # also a barrier: all finished training
        meter.local_bytes += reader.stats.bytes_read - bytes_before
        meter.server_bytes += _server_bytes(servers, rank) - server_before
        test_error = evaluate_split(model, test, views, fetcher, cfg, rank, world, epoch)
        metrics = {"epoch": epoch, "train_loss": loss_sum / count, "train_error": err_sum / count,
                   "test_error": test_error}
        tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
        if rank == 0:
            log.info("epoch %d: train loss %.4f, train error %.3f, test error (%s) %.3f", epoch,
                     metrics["train_loss"], metrics["train_error"], cfg.runtime.eval_mode, test_error)
            _log_attention(tracker, model, test[: cfg.data.n_attention_maps], views, fetcher, epoch)
            if epochs_bar is not None:
                epochs_bar.set_description(f"epochs (test error {test_error:.3f})")
                epochs_bar.update(1)
        with tempfile.TemporaryDirectory(prefix="gats-ckpt-") as folder:
            if rank == 0:
                torch.save({"model": core(model).state_dict(), "optimizer": optimiser.state_dict(), "epoch": epoch,
                            "classes": list(classes), "in_channels": train[0].channels,
                            "budget_used_s": meter.budget_used_s}, Path(folder) / STATE_FILE)
                (Path(folder) / "config.yaml").write_text(C.to_yaml(cfg))
                (Path(folder) / EPOCH_FILE).write_text(str(epoch))
            session.report(metrics, folder if rank == 0 else None)
    prefetch.shutdown()
    if epochs_bar is not None:
        epochs_bar.close()
    _log_run_metrics(tracker, meter, device)


def evaluate_split(model: nn.Module, examples, views: LowResViews, fetcher, cfg: C.TrainConfig, rank: int,
                   world: int, epoch: int = 0, mode: str | None = None) -> float:
    """Error over `examples` (this worker's slice, summed over workers) in the evaluation mode."""
    mine = shard_indices(len(examples), rank, world, shuffle=False, pad=False)
    device = next(core(model).parameters()).device
    gen = torch.Generator(device=device).manual_seed(10_000 + cfg.optim.seed * 1000 + epoch * 100 + rank)
    errors = count = 0
    model.eval()
    for chunk in batched([examples[i] for i in mine], cfg.data.batch_size):
        batch = _to(views.batch(chunk), device)
        logits = eval_logits(model, batch, fetcher, mode or cfg.runtime.eval_mode, gen)
        errors += int((logits.argmax(1) != batch.labels).sum())
        count += len(chunk)
    model.train()
    errors, count = all_reduce([errors, count])
    return errors / max(count, 1)


def _to(batch: Batch, device: torch.device) -> Batch:
    if device.type == "cpu":
        return batch
    return Batch(batch.image_ids, batch.labels.to(device), batch.low.to(device), batch.low_hw, batch.level0_hw)


def _bar(session: LocalSession | RaySession, enabled: bool, total: int, desc: str, position: int):
    """A progress bar shown by the driver: Ray's tqdm_ray from a Ray worker, plain tqdm in a local session."""
    if not enabled:
        return None
    if isinstance(session, RaySession):
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm

        return ray_tqdm(total=total, desc=desc, position=position)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, position=position, leave=position == 0)


def _maybe_fail(rt: C.RuntimeConfig, rank: int, epoch: int, k: int, n_steps: int) -> None:
    """Tests only: rank 0 dies once, halfway through epoch `fail_once_at_epoch`, leaving a marker file."""
    if rt.fail_once_at_epoch != epoch or rank != 0 or k != n_steps // 2 or Path(rt.fail_marker).exists():
        return
    Path(rt.fail_marker).write_text(f"killed at epoch {epoch}, step {k}\n")
    log.warning("runtime.fail_once_at_epoch: exiting on purpose (epoch %d, step %d)", epoch, k)
    os._exit(1)


def _log_attention(tracker: Tracker, model: nn.Module, examples, views: LowResViews, fetcher, epoch: int) -> None:
    if not examples or not tracker.run_id:
        return
    batch = views.batch(examples)
    maps = attention_maps(model, _to(batch, next(core(model).parameters()).device), fetcher)
    if maps is None:
        return
    with tempfile.TemporaryDirectory(prefix="gats-att-") as folder:
        for i, (image_id, att) in enumerate(zip(batch.image_ids, maps)):
            h, w = (int(v) for v in batch.low_hw[i])
            path = Path(folder) / f"{image_id}.png"
            save_heatmap(path, batch.low[i, :, :h, :w].numpy(), att, f"{image_id} epoch {epoch}")
            tracker.log_artifact(path, f"attention/epoch_{epoch}")


def _server_bytes(servers: Sequence[Any], rank: int) -> int:
    """Chunk bytes all patch servers have read so far (asked by rank 0 only; 0 elsewhere or without servers)."""
    if not servers or rank != 0:
        return 0
    import ray

    return sum(s.bytes_read for s in ray.get([h.stats.remote() for h in servers]))


def _log_run_metrics(tracker: Tracker, meter: Meter, device: torch.device) -> None:
    """Per-run measurements, aggregated over workers: time per sample (mean), throughput (sum), memory (max)."""
    step_s, samples, wait_s = all_reduce([meter.step_s, meter.samples, meter.io_wait_s])
    rates = all_reduce([meter.patches / max(meter.step_s, 1e-9), meter.samples / max(meter.step_s, 1e-9)])
    local_bytes = all_reduce([meter.local_bytes])[0]
    cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else -1.0
    step_mb = meter.later_epochs_mb if meter.later_epochs_mb >= 0 else meter.first_epoch_mb
    peak, step_mem, cuda, used = all_reduce([max(meter.peak_mb, memory.hwm_mb()), step_mb, cuda,
                                             meter.budget_used_s], op="max")
    if not tracker.run_id:
        return
    metrics = {
        "time_per_sample_ms": 1000 * step_s / max(samples, 1),
        "peak_rss_mb": peak,
        "step_memory_mb": step_mem,
        "bytes_read_per_sample": (local_bytes + meter.server_bytes) / max(samples, 1),
        "patches_per_s": rates[0],
        "io_wait_fraction": wait_s / max(step_s, 1e-9),
        "samples_per_s": rates[1],
        "train_time_s": used,
    }
    if cuda >= 0:
        metrics["cuda_max_allocated_mb"] = cuda
    tracker.log_metrics(metrics)
    if math.isfinite(metrics["time_per_sample_ms"]):
        log.info("run: %s", ", ".join(f"{k} {v:.3g}" for k, v in metrics.items()))
