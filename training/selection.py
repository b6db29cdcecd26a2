"""Model selection: which epoch a run reports, and when to stop early; pure functions over the epochs' metrics.

    sel = select_epoch(history, "val_error", patience=3)      Selection(epoch, stop) over [{"epoch": 1, ...}, ...]
    selection_score(metrics, "val_auc")                       one number, higher is better (what Ray Train keeps)
    h = History("val_error", 3); h.add(metrics, confusion)   what the loop keeps, saved beside each checkpoint
    log_selected(tracker, h, classes)                         the run's headline: selected_epoch, selected_test_*

`optim.select_metric` names the metric (val_error: lower is better; val_auc, val_balanced_accuracy, val_recall_<c>:
higher is better; training.metrics.metric_direction knows each). The selected epoch is the FIRST epoch with the best
value (a NaN value is the worst); with no metric it is the last epoch. With `optim.patience` = p > 0 training stops
after p epochs in a row without a strict improvement. Every worker computes the same selection from the same
gathered metrics, so every worker stops at the same epoch.

The history (every epoch's metrics, and the confusion matrices of the selected epoch) is written as
`selection.json` into each checkpoint folder before training.checkpoint.save writes its `epoch.txt` (so a complete
checkpoint always has it), and read back on resume: a run restarted after a failure selects over all its epochs.
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from training import config as C
from training.metrics import metric_direction, metric_key, write_confusion

HISTORY_FILE = "selection.json"
log = logging.getLogger("gats.train")


@dataclass(frozen=True, slots=True)
class Selection:
    epoch: int  # the selected epoch (0: no epoch yet)
    stop: bool  # patience is exhausted: train no further epoch
    since_best: int  # epochs after the selected one


def selection_score(metrics: Mapping[str, float], metric: str) -> float:
    """Higher is better: the metric (negated when lower is better); -inf when it is NaN or missing. With no metric
    the epoch itself (the latest is the selected one)."""
    if not metric:
        return float(metrics["epoch"])
    value = float(metrics.get(metric, math.nan))
    if math.isnan(value):
        return -math.inf
    return value if metric_direction(metric) == "max" else -value


def select_epoch(history: Sequence[Mapping[str, float]], metric: str, patience: int = 0) -> Selection:
    """The selected epoch of `history` (the per-epoch metric dicts, each with "epoch", in epoch order): the first
    with the best `selection_score`, and whether `patience` > 0 epochs have passed since it without improvement."""
    if not history:
        return Selection(0, False, 0)
    best_i = 0
    for i in range(1, len(history)):
        if selection_score(history[i], metric) > selection_score(history[best_i], metric):
            best_i = i
    since = len(history) - 1 - best_i
    return Selection(int(history[best_i]["epoch"]), bool(metric) and patience > 0 and since >= patience, since)


def check_selectable(cfg: C.TrainConfig, has_val: bool, classes: Sequence[str]) -> None:
    """optim.select_metric on validation needs a validation set, and val_recall_<class> a class of that name."""
    metric = cfg.optim.select_metric
    if metric.startswith("val_") and not has_val:
        raise C.ConfigError(f"optim.select_metric={metric} needs a validation set: the manifest has no "
                            f"{cfg.data.val_split!r} rows; set data.val_fraction=0.2 to carve one from train.")
    keys = [metric_key(c) for c in classes]
    if metric.startswith("val_recall_") and metric[len("val_recall_"):] not in keys:
        raise C.ConfigError(f"optim.select_metric={metric} names no class; the classes are {', '.join(keys)}: "
                            f"e.g. val_recall_{keys[-1]}.")


@dataclass
class History:
    """The epochs' metrics of one run (all attempts), and the confusion matrices {split: (K, K)} of its selected
    epoch."""

    metric: str = ""
    patience: int = 0
    epochs: list[dict[str, float]] = field(default_factory=list)
    confusion: dict[str, list[list[int]]] = field(default_factory=dict)

    def add(self, metrics: Mapping[str, float], confusion: Mapping[str, np.ndarray]) -> Selection:
        """Record one epoch (replacing a record of the same epoch from a failed attempt); returns the selection."""
        epoch = int(metrics["epoch"])
        self.epochs = [m for m in self.epochs if int(m["epoch"]) < epoch] + [dict(metrics)]
        sel = self.selection()
        if sel.epoch == epoch:
            self.confusion = {k: np.asarray(v).astype(int).tolist() for k, v in confusion.items()}
        return sel

    def selection(self) -> Selection:
        return select_epoch(self.epochs, self.metric, self.patience)

    def selected(self) -> dict[str, float]:
        """The selected epoch's metrics ({} before any epoch)."""
        epoch = self.selection().epoch
        return next((m for m in self.epochs if int(m["epoch"]) == epoch), {})

    def save(self, folder: str | Path) -> None:
        data = {"metric": self.metric, "epochs": self.epochs, "confusion": self.confusion}
        (Path(folder) / HISTORY_FILE).write_text(json.dumps(data, indent=1))

    @classmethod
    def load(cls, folder: str | Path | None, metric: str, patience: int) -> History:
        """The history saved in a checkpoint folder (an empty one when there is none); the selection rule is the
        current config's (the saved confusion matrices are kept only when the saved run selected by the same one)."""
        path = Path(folder) / HISTORY_FILE if folder else None
        if path is None or not path.is_file():
            return cls(metric, patience)
        data: dict[str, Any] = json.loads(path.read_text())
        confusion = dict(data.get("confusion", {})) if data.get("metric", "") == metric else {}
        return cls(metric, patience, [dict(m) for m in data.get("epochs", [])], confusion)


def log_selected(tracker: Any, history: History, classes: Sequence[str]) -> None:
    """At the end of a run (a no-op without an MLflow run, i.e. on every rank but 0): `selected_epoch`,
    `selected_test_<metric>` for each test metric of that epoch, and its confusion matrices as
    `confusion/<split>.csv` and `.png`."""
    chosen = history.selected()
    if not chosen or not tracker.run_id:
        return
    tracker.log_metrics({"selected_epoch": chosen["epoch"],
                         **{f"selected_{k}": v for k, v in chosen.items() if k.startswith("test_")}})
    with tempfile.TemporaryDirectory(prefix="gats-confusion-") as folder:
        for split, matrix in history.confusion.items():
            for path in write_confusion(folder, split, np.asarray(matrix), classes):
                tracker.log_artifact(path, "confusion")
    log.info("selected epoch %d (%s): test error %.3f", chosen["epoch"], history.metric or "the last",
             chosen.get("test_error", math.nan))
