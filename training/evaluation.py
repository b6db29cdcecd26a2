"""Evaluate a model on a split: per-image class probabilities gathered over the workers, then the metrics of
training/metrics.py. The loop calls `evaluate_split` every epoch; jobs/evaluate.py calls `evaluate_modes`.

    result = evaluate_split(model, examples, views, fetcher, cfg, rank, world, epoch, classes=classes)
    result.metrics                                            {"error", "balanced_accuracy", "auc", "recall_<c>", ..}
    result.confusion                                          (K, K) int64, rows = true class
    model, ckpt = checkpoint.load_model(folder)               a checkpoint folder written by training
    model, cfg = load_from_run(run_id, tracking_uri)          the `model/` checkpoint logged with an MLflow run
    results = evaluate_modes(model, cfg, "test", ["sampled", "topk"])     {mode: Evaluation}
    metrics = evaluate(model, cfg, "test", ["sampled", "topk"])           {mode: metrics dict}

Each worker evaluates its slice of the split (no padding) and the per-image labels, predictions and probabilities
(softmax of the logits, float64) are gathered to every worker (`gather`: torch.distributed.all_gather_object when a
process group is initialised, the identity otherwise) and put back in split order, so every worker computes the
same metrics, bit for bit, whatever the number of workers. `error` is the argmax of the logits against the labels,
exactly the value the loop always reported (same samples: the generator of each worker's pass is seeded as before).

`runtime.eval_repeats` = R > 1 in sampled mode (ATS and U-N; other kinds and modes are deterministic: one pass):
R passes with different deterministic seeds (pass 0 is the R = 1 pass), each metric the mean over the passes and
`<name>_se` its standard error (sample std / sqrt(R)); the confusion matrix is pass 0's.

Neither load unpickles code: the weights are loaded with `weights_only=True` and the model is rebuilt from its
config by the model registry. Patches are read in this process through a PatchReader (no Ray).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from training import checkpoint
from training import config as C
from training.data import DirectFetcher, Example, LowResViews, batched, examples_of, shard_indices
from training.metrics import classification_metrics, confusion_matrix, mean_and_se
from training.models import TrainModule, autocast, low_res_views, unwrap

PASS_SEED_STRIDE = 1_000_003  # pass r > 0 of a repeated evaluation: the pass-0 seed + r * this (a prime)
STREAM_SEED_STRIDE = 2_000_000_011  # stream s (1: validation) + s * this, so val and test never share draws


@dataclass(frozen=True, slots=True)
class Evaluation:
    metrics: dict[str, float]
    confusion: np.ndarray  # (K, K) int64, rows = true class, columns = predicted


def gather(obj: Any) -> list[Any]:
    """Every worker's `obj`, in rank order (torch.distributed.all_gather_object); [obj] without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def repeats_for(cfg: C.TrainConfig, mode: str) -> int:
    """How many passes an evaluation in `mode` makes: runtime.eval_repeats for sampled ATS / U-N, else 1."""
    return cfg.runtime.eval_repeats if mode == "sampled" and cfg.model.name in C.SAMPLED_MODELS else 1


def evaluate_split(model: nn.Module, examples: Sequence[Example], views: LowResViews, fetcher, cfg: C.TrainConfig,
                   rank: int, world: int, epoch: int = 0, mode: str | None = None,
                   classes: Sequence[str] | None = None, stream: int = 0) -> Evaluation:
    """Metrics over `examples` (each worker evaluates its slice; the answers are gathered) in the evaluation mode.
    `classes`: the class names (default "0", "1", ...: the metric names `recall_<class>` use them). `stream`: 0 for
    the test split (its seeds are the ones test_error always had), another number for another split."""
    mode = mode or cfg.runtime.eval_mode
    mine = shard_indices(len(examples), rank, world, shuffle=False, pad=False)
    net = unwrap(model)
    device = next(net.core.parameters()).device
    seed = 10_000 + cfg.optim.seed * 1000 + epoch * 100 + rank + stream * STREAM_SEED_STRIDE
    passes, confusion = [], None
    model.eval()
    try:
        for r in range(repeats_for(cfg, mode)):
            gen = torch.Generator(device=device).manual_seed(seed + r * PASS_SEED_STRIDE)
            labels, preds, probs = [], [], []
            for chunk in batched([examples[i] for i in mine], cfg.data.batch_size):
                batch = views.batch(chunk).to(device)
                with autocast(device, cfg.runtime.precision):
                    logits = net.logits(batch, fetcher, mode, gen).float()  # (B, K)
                labels.append(batch.labels.cpu().numpy())
                preds.append(logits.argmax(1).cpu().numpy())
                probs.append(torch.softmax(logits.double(), 1).cpu().numpy())
            y, yhat, prob = _in_split_order(gather((mine, labels, preds, probs)), len(classes or ()))
            names = [str(c) for c in (classes if classes is not None else range(prob.shape[1]))]
            passes.append(classification_metrics(y, prob, names, preds=yhat))  # an empty split: every value NaN
            confusion = confusion_matrix(y, yhat, len(names)) if confusion is None else confusion
    finally:
        model.train()
    return Evaluation(mean_and_se(passes), confusion)  # type: ignore[arg-type]


def _in_split_order(parts: Sequence[tuple], n_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every worker's (indices, [labels], [preds], [probs]) -> labels (n,), preds (n,), probs (n, K) ordered by
    example index, whatever the number of workers and the order of their answers."""
    parts = [p for p in parts if p[0]]
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, n_classes))
    order = np.argsort(np.concatenate([np.asarray(p[0], np.int64) for p in parts]), kind="stable")
    y, yhat, prob = (np.concatenate([a for p in parts for a in p[j]])[order] for j in (1, 2, 3))
    return y, yhat, prob


def load_from_run(run_id: str, tracking_uri: str) -> tuple[TrainModule, C.TrainConfig]:
    """(model, config) of an MLflow training run, from the checkpoint folder it logged as `model/`."""
    model, ckpt = checkpoint.load_model_from_run(run_id, tracking_uri)
    return model, ckpt.config


def evaluate_modes(model: TrainModule, cfg: C.TrainConfig, split: str, modes: Sequence[str], max_n: int = 0
                   ) -> tuple[dict[str, Evaluation], tuple[str, ...]]:
    """({mode: Evaluation}, class names) of `model` on `split` of cfg.data.root; the train and validation splits
    are the ones training used (a carved validation set is carved again, the same way)."""
    from pipeline.reader import PatchReader

    torch.manual_seed(cfg.optim.seed)
    reader = PatchReader(cfg.data.root)
    examples, classes = examples_of(cfg.data, split, cfg.optim.seed, max_n)
    views, fetcher = low_res_views(reader, cfg), DirectFetcher(reader)
    try:
        return {mode: evaluate_split(model, examples, views, fetcher, cfg, 0, 1, mode=mode,  # type: ignore[arg-type]
                                     classes=classes) for mode in modes}, classes
    finally:
        fetcher.close()


def evaluate(model: TrainModule, cfg: C.TrainConfig, split: str, modes: Sequence[str], max_n: int = 0
             ) -> dict[str, dict[str, float]]:
    """{mode: metrics dict} of `model` on `split` of cfg.data.root."""
    return {mode: e.metrics for mode, e in evaluate_modes(model, cfg, split, modes, max_n)[0].items()}
