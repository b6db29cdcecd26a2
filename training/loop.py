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

Each epoch: train on this worker's shard; `val_*` and `test_*` metrics (training/metrics.py) of the validation set
(the manifest's `data.val_split`, or `data.val_fraction` of train carved by training.data.load_splits; none
otherwise) and the test split in the configured mode, each worker evaluating its slice, the answers gathered
(training/evaluation.py); a checkpoint (model + optimiser + the selection history) reported by rank 0 with the
metrics and `selection_score`; rank 0 logs the metrics and attention heatmaps of fixed test images to MLflow. The
run tracks its selected epoch (training/selection.py: best `optim.select_metric`, else the last) and, with
`optim.patience`, stops early (every worker computes the same selection from the same gathered metrics). At the end
rank 0 logs the per-run measurements, `selected_epoch`, `selected_test_<metric>` and that epoch's confusion matrices.
With `optim.time_budget_s`, training stops at the first step that ends past the budget (seconds of training steps,
evaluation excluded, summed over resumed attempts; all workers stop at the same step), then evaluates as usual.

The loop reads top to bottom as `setup` (data, model, optimiser, fetcher), `restore` (the newest checkpoint),
`run_epoch` (training steps), `evaluate_epoch`, `save` (checkpoint + report), `log_run_metrics`, `log_selected`.
`on_step`, an optional callable in the loop config, is called after every training step (tests use it to kill a
worker).

Step memory (`step_memory_mb`): per epoch, training.memory resets the RSS high-water mark after returning free heap to the
OS, and the training phase's high-water mark minus the RSS at its start is that epoch's figure; the run reports the
largest over epochs after the first (the first also holds the growth of the low-res view cache) when there are any.
"""
from __future__ import annotations

import logging
import math
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ats_model.ats import ATSModel

from training import checkpoint
from training import config as C
from training import memory
from training.data import (DirectFetcher, Example, InMemoryImages, LowResViews, ServerFetcher, batched,
                           class_weights, load_splits, pooled_band_stats, shard_indices, with_band_scaling)
from training.evaluation import evaluate_split
from training.metrics import prefixed
from training.models import KINDS, autocast, build_model, core, import_plugins, low_res_views, unwrap
from training.objects import Annotated, annotated, attention_on_objects
from training.logs import configure_logging
from training.selection import History, check_selectable, log_selected, selection_score
from training.session import RaySession, Session, all_reduce
from training.tracking import Tracker, save_heatmap, tracker_for

log = logging.getLogger("gats.train")
StepHook = Callable[[int, int, int, int], None]  # (epoch, step index, steps in the epoch, rank)


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


@dataclass
class Worker:
    """Everything one worker holds for the run; made by `setup`."""

    cfg: C.TrainConfig
    session: Session
    device: torch.device
    tracker: Tracker
    reader: Any  # pipeline.reader.PatchReader
    servers: list[Any]
    train: list[Example]
    val: list[Example]  # empty: no validation set
    test: list[Example]
    classes: tuple[str, ...]
    views: LowResViews
    fetcher: DirectFetcher | ServerFetcher
    weights: torch.Tensor | None
    model: nn.Module
    optimiser: torch.optim.Optimizer
    meter: Meter = field(default_factory=Meter)
    history: History = field(default_factory=History)
    objects: list[Annotated] = field(default_factory=list)  # rank 0: test images with recorded objects (metric)
    start_epoch: int = 1
    prefetch: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="prefetch"))

    @property
    def rank(self) -> int:
        return self.session.rank

    def close(self) -> None:
        self.prefetch.shutdown(wait=True)
        self.fetcher.close()


def train_loop(loop_config: dict[str, Any], session: Session | None = None) -> None:
    """Entry point per worker. loop_config: {"config": TrainConfig.to_dict(), "run_id": str, "servers": [handles],
    "run_dir": str, "on_step": optional StepHook}."""
    session = session or RaySession(loop_config.get("run_dir", ""))
    configure_logging(logging.INFO if session.rank == 0 else logging.WARNING,
                      "%(asctime)s rank%(process)d %(name)s: %(message)s")
    w = setup(C.from_dict(loop_config["config"]), session, loop_config.get("run_id", ""),
              loop_config.get("servers") or [])
    on_step: StepHook | None = loop_config.get("on_step")
    try:
        restore(w, session.latest() or (w.cfg.runtime.resume_from or None))
        w.model = session.prepare(w.model.to(w.device))
        progress = _Progress(w, w.cfg.optim.epochs)
        budget = w.cfg.optim.time_budget_s
        for epoch in range(w.start_epoch, w.cfg.optim.epochs + 1):
            if budget > 0 and w.meter.budget_used_s >= budget:
                break
            if w.history.selection().stop:  # patience already spent (a resumed run)
                break
            metrics = run_epoch(w, epoch, progress, on_step)
            confusion = evaluate_epoch(w, epoch, metrics)
            if w.rank == 0 and w.objects:
                metrics["attention_on_objects"] = attention_on_objects(w.model, w.objects, w.views, w.device)
            selected = w.history.add(metrics, confusion)
            w.tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
            if w.rank == 0:
                log.info("epoch %d: train loss %.4f, train error %.3f, %stest error (%s) %.3f", epoch,
                         metrics["train_loss"], metrics["train_error"],
                         f"val error {metrics['val_error']:.3f}, " if "val_error" in metrics else "",
                         w.cfg.runtime.eval_mode, metrics["test_error"])
                log_attention(w, epoch)
                progress.epoch_done(metrics["test_error"])
            save(w, epoch, {**metrics, "selection_score": selection_score(metrics, w.cfg.optim.select_metric)})
            if all_reduce([float(selected.stop)], op="max")[0] > 0:
                log.info("optim.patience=%d: no better %s for %d epochs; stopping after epoch %d (selected: %d)",
                         w.cfg.optim.patience, w.cfg.optim.select_metric, selected.since_best, epoch, selected.epoch)
                break
        progress.close()
        log_run_metrics(w)
        log_selected(w.tracker, w.history, w.classes)
    finally:
        w.close()


def setup(cfg: C.TrainConfig, session: Session, run_id: str, servers: Sequence[Any]) -> Worker:
    """Data (manifest splits, views, the patch fetcher), the model (plugins imported first) and its optimiser."""
    from pipeline.reader import PatchReader

    if cfg.runtime.torch_threads:
        torch.set_num_threads(cfg.runtime.torch_threads)
    torch.manual_seed(cfg.optim.seed)
    kind = KINDS[cfg.model.name]
    reader = PatchReader(cfg.data.root)
    splits = load_splits(cfg.data, cfg.optim.seed)
    train, val, test, classes = splits.train, splits.val, splits.test, splits.classes
    if cfg.model.band_scaled is None:  # the driver decides it before the run; train_loop called directly lands here
        cfg, why = with_band_scaling(cfg, train, session.latest() or cfg.runtime.resume_from or None)
        if session.rank == 0:
            log.info("model.band_scaled=%s (%s)", str(cfg.model.band_scaled).lower(), why)
    check_selectable(cfg, bool(splits.val), classes)
    views = low_res_views(reader, cfg)
    if cfg.data.in_memory:  # every pixel this worker can need, read once before training (patch servers unused)
        images = InMemoryImages(reader, [e.image_id for e in train + val + test] if kind.reads_patches else [])
        for part in batched(train + val + test, 64):
            views.batch(part)
        fetcher: DirectFetcher | ServerFetcher = DirectFetcher(images)
        log.info("data.in_memory: %.0f MB of level-0 pixels and %d low-res views in RAM", images.nbytes / 2**20,
                 len(views.cache))
    elif servers:
        from pipeline.serving import PatchClient

        fetcher = ServerFetcher(PatchClient(servers))
    else:
        fetcher = DirectFetcher(reader)
    device = session.device()
    weights = class_weights(train, len(classes)).to(device) if cfg.optim.class_weighted else None
    import_plugins(cfg.model.plugins)
    stats = pooled_band_stats(train, cfg.data.root) if cfg.model.band_scaled else None
    if stats and session.rank == 0:
        log.info("model.band_scaled: per-band mean %s, std %s over %d training images",
                 [round(v, 4) for v in stats[0]], [round(v, 4) for v in stats[1]], len(train))
    model = build_model(cfg.model, train[0].channels, len(classes), stats)
    if cfg.runtime.channels_last and isinstance(model.core, ATSModel):
        model.core.use_channels_last()
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    tracker = tracker_for(session.rank, cfg.runtime.tracking_uri, run_id)
    if stats:  # what the nets are scaled by, next to the config's params in the MLflow UI
        tracker.log_params({"band_mean": [round(v, 6) for v in stats[0]], "band_std": [round(v, 6) for v in stats[1]]})
    objects = annotated(test, classes, reader) if session.rank == 0 and cfg.model.name in ("ats", "uniform") else []
    return Worker(cfg, session, device, tracker, reader, list(servers), train, val, test, classes, views, fetcher,
                  weights, model, optimiser,  # type: ignore[arg-type]
                  history=History(cfg.optim.select_metric, cfg.optim.patience), objects=objects)


def restore(w: Worker, folder: str | None) -> None:
    """Model, optimiser, next epoch and spent time budget from a checkpoint folder (nothing when None)."""
    if not folder:
        return
    ckpt = checkpoint.load(folder)
    w.model.core.load_state_dict(ckpt.model)
    w.optimiser.load_state_dict(ckpt.optimizer)
    w.start_epoch = ckpt.epoch + 1
    w.meter.budget_used_s = ckpt.budget_used_s
    w.history = History.load(folder, w.cfg.optim.select_metric, w.cfg.optim.patience)
    log.info("resuming from %s at epoch %d", folder, w.start_epoch)


def run_epoch(w: Worker, epoch: int, progress: _Progress, on_step: StepHook | None) -> dict[str, float]:
    """This worker's training steps of one epoch; {"epoch", "train_loss", "train_error"} summed over workers."""
    cfg, meter, fetcher, rank = w.cfg, w.meter, w.fetcher, w.rank
    gen = torch.Generator(device=w.device).manual_seed(cfg.optim.seed * 1000 + epoch * 100 + rank)
    mine = shard_indices(len(w.train), rank, w.session.world, epoch=epoch, seed=cfg.optim.seed)
    steps = batched([w.train[i] for i in mine], cfg.data.batch_size)
    budget = cfg.optim.time_budget_s
    loss_sum = err_sum = count = 0.0
    w.model.train()
    all_reduce([0.0])  # barrier: every worker starts its training phase here
    bytes_before, server_before = w.reader.stats.bytes_read, _server_bytes(w.servers, rank)
    wait_before, patches_before = fetcher.io.wait_s, fetcher.io.patches
    meter.peak_mb = max(meter.peak_mb, memory.hwm_mb())  # before the reset forgets it
    step_memory = memory.StepMemory().start()
    future = w.prefetch.submit(w.views.batch, steps[0]) if cfg.data.prefetch else None
    bar = progress.epoch_bar(epoch, len(steps))
    for k in range(len(steps)):
        start = time.perf_counter()
        if future is not None:
            batch = future.result()  # the low-res views were read while the previous step ran
            future = w.prefetch.submit(w.views.batch, steps[k + 1]) if k + 1 < len(steps) else None
        else:
            batch = w.views.batch(steps[k])
        fetcher.io.wait_s += time.perf_counter() - start
        batch = batch.to(w.device)
        w.optimiser.zero_grad(set_to_none=True)
        with autocast(w.device, cfg.runtime.precision):
            loss, logits = w.model(batch, fetcher, w.weights, gen)
        loss.backward()
        if cfg.optim.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(w.model.parameters(), cfg.optim.clip_grad_norm)
        w.optimiser.step()
        took = time.perf_counter() - start
        meter.step_s += took
        meter.budget_used_s += took
        meter.samples += len(batch.image_ids)
        loss_sum += float(loss.detach()) * len(batch.image_ids)
        err_sum += int((logits.argmax(1) != batch.labels).sum())
        count += len(batch.image_ids)
        progress.step(bar, f"epoch {epoch} loss {loss_sum / count:.3f} err {err_sum / count:.3f}")
        if on_step is not None:
            on_step(epoch, k, len(steps), rank)
        if budget > 0 and all_reduce([float(meter.budget_used_s >= budget)], op="max")[0] > 0:
            log.info("optim.time_budget_s=%g reached after %d of %d steps of epoch %d", budget, k + 1, len(steps),
                     epoch)  # every worker sees the same maximum, so all stop after this step
            break
    if future is not None:
        future.result()
    meter.io_wait_s += fetcher.io.wait_s - wait_before
    meter.patches += fetcher.io.patches - patches_before
    epoch_mb = step_memory.stop()
    if epoch == w.start_epoch:
        meter.first_epoch_mb = epoch_mb
    else:
        meter.later_epochs_mb = max(meter.later_epochs_mb, epoch_mb)
    progress.close_bar(bar)
    loss_sum, err_sum, count = all_reduce([loss_sum, err_sum, count])  # also a barrier: all finished training
    meter.local_bytes += w.reader.stats.bytes_read - bytes_before
    meter.server_bytes += _server_bytes(w.servers, rank) - server_before
    return {"epoch": epoch, "train_loss": loss_sum / count, "train_error": err_sum / count,
            "elapsed_train_s": all_reduce([meter.budget_used_s], op="max")[0]}


def save(w: Worker, epoch: int, metrics: dict[str, float]) -> None:
    """Rank 0 writes the checkpoint (the selection history first: checkpoint.save writes epoch.txt last); every
    worker reports (Ray Train needs every rank's report)."""
    with tempfile.TemporaryDirectory(prefix="gats-ckpt-") as folder:
        if w.rank == 0:
            w.history.save(folder)
            checkpoint.save(folder, config=w.cfg, model=core(w.model).state_dict(),
                            optimizer=w.optimiser.state_dict(), epoch=epoch, classes=w.classes,
                            in_channels=w.train[0].channels, budget_used_s=w.meter.budget_used_s)
        w.session.report(metrics, folder if w.rank == 0 else None)


def evaluate_epoch(w: Worker, epoch: int, metrics: dict[str, float]) -> dict[str, Any]:
    """Validation (when there is a validation set) and test metrics of this epoch into `metrics` (`val_*`,
    `test_*`); returns their confusion matrices {"val": (K, K), "test": (K, K)}."""
    confusion = {}
    for stream, (name, examples) in enumerate((("test", w.test), ("val", w.val))):  # test: stream 0, as always
        if examples:
            result = evaluate_split(w.model, examples, w.views, w.fetcher, w.cfg, w.rank, w.session.world, epoch,
                                    classes=w.classes, stream=stream)
            metrics.update(prefixed(name, result.metrics))
            confusion[name] = result.confusion
    return confusion


def log_attention(w: Worker, epoch: int) -> None:
    """Rank 0: heatmaps of the first `data.n_attention_maps` test images, as MLflow artifacts."""
    examples = w.test[: w.cfg.data.n_attention_maps]
    if not examples or not w.tracker.run_id:
        return
    batch = w.views.batch(examples)
    net = unwrap(w.model)
    maps = net.attention_maps(batch.to(w.device), w.fetcher)
    if maps is None:
        return
    with tempfile.TemporaryDirectory(prefix="gats-att-") as folder:
        for i, (example, att) in enumerate(zip(examples, maps)):
            h, w_ = (int(v) for v in batch.low_hw[i])
            fy, fx = (float(v) for v in batch.low_scale[i])  # level-0 px per view px
            own = w.classes[example.label]
            marks = [(y0 / fy, x0 / fx, bh / fy, bw / fx, str(c) == own)
                     for y0, x0, bh, bw, c in w.reader.info(example.image_id).objects]
            path = Path(folder) / f"{example.image_id}.png"
            save_heatmap(path, batch.low[i, :, :h, :w_].numpy(), att, f"{example.image_id} epoch {epoch}", marks)
            np.save(path.with_suffix(".npy"), np.asarray(att, dtype=np.float32))  # the map itself, for figures
            w.tracker.log_artifact(path, f"attention/epoch_{epoch}")
            w.tracker.log_artifact(path.with_suffix(".npy"), f"attention/epoch_{epoch}")


def log_run_metrics(w: Worker) -> None:
    """Per-run measurements, aggregated over workers: time per sample (mean), throughput (sum), memory (max); for
    the nested model also `regions_per_sample` and `attention_px_per_sample`, the mean over the run's training
    samples (what its training forwards report, `NestedModule.run_totals`)."""
    meter, tracker = w.meter, w.tracker
    step_s, samples, wait_s = all_reduce([meter.step_s, meter.samples, meter.io_wait_s])
    rates = all_reduce([meter.patches / max(meter.step_s, 1e-9), meter.samples / max(meter.step_s, 1e-9)])
    local_bytes = all_reduce([meter.local_bytes])[0]
    cuda = torch.cuda.max_memory_allocated(w.device) / 2**20 if w.device.type == "cuda" else -1.0
    step_mb = meter.later_epochs_mb if meter.later_epochs_mb >= 0 else meter.first_epoch_mb
    peak, step_mem, cuda, used = all_reduce([max(meter.peak_mb, memory.hwm_mb()), step_mb, cuda,
                                             meter.budget_used_s], op="max")
    totals: dict[str, float] = getattr(unwrap(w.model), "run_totals", {})  # nested: regions, attention px
    per_sample = dict(zip(totals, all_reduce(list(totals.values())))) if totals else {}
    if not tracker.run_id or samples == 0:  # an attempt that trained nothing (resumed after its last epoch)
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
        **{name: total / max(samples, 1) for name, total in per_sample.items()},  # regions_per_sample, ...
    }
    if cuda >= 0:
        metrics["cuda_max_allocated_mb"] = cuda
    tracker.log_metrics(metrics)
    if math.isfinite(metrics["time_per_sample_ms"]):
        log.info("run: %s", ", ".join(f"{k} {v:.3g}" for k, v in metrics.items()))


def _server_bytes(servers: Sequence[Any], rank: int) -> int:
    """Chunk bytes all patch servers have read so far (asked by rank 0 only; 0 elsewhere or without servers)."""
    if not servers or rank != 0:
        return 0
    import ray

    return sum(s.bytes_read for s in ray.get([h.stats.remote() for h in servers]))


class _Progress:
    """Rank 0's progress: tqdm bars on a terminal (Ray's tqdm_ray from a Ray worker, shown by the driver), nothing
    otherwise (the per-epoch log line says the same without carriage-return frames in log files)."""

    def __init__(self, w: Worker, epochs: int) -> None:
        self.enabled = w.cfg.runtime.progress and w.rank == 0 and (w.session.is_ray or sys.stderr.isatty())
        self.is_ray = w.session.is_ray
        self.epochs = self._bar(epochs, "epochs", 0)
        if self.epochs is not None:
            self.epochs.update(w.start_epoch - 1)

    def _bar(self, total: int, desc: str, position: int):
        if not self.enabled:
            return None
        if self.is_ray:
            from ray.experimental.tqdm_ray import tqdm as ray_tqdm

            return ray_tqdm(total=total, desc=desc, position=position)
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, position=position, leave=position == 0)

    def epoch_bar(self, epoch: int, steps: int):
        return self._bar(steps, f"epoch {epoch}", 1)

    @staticmethod
    def step(bar, description: str) -> None:
        if bar is not None:
            bar.set_description(description)
            bar.update(1)

    @staticmethod
    def close_bar(bar) -> None:
        if bar is not None:
            bar.close()

    def epoch_done(self, test_error: float) -> None:
        if self.epochs is not None:
            self.epochs.set_description(f"epochs (test error {test_error:.3f})")
            self.epochs.update(1)

    def close(self) -> None:
        self.close_bar(self.epochs)
