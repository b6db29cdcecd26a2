"""Classification metrics over a whole evaluated split, in numpy alone (no torch, no scikit-learn at run time).

    m = classification_metrics(labels, probs, classes)       {"error", "balanced_accuracy", "auc", "recall_<class>"}
    cm = confusion_matrix(labels, preds, n_classes)          (K, K) int64, rows = true class, columns = predicted
    write_confusion(folder, "test", cm, classes)             folder/test.csv and folder/test.png
    mean_and_se([m1, m2, ...])                               each metric's mean over R passes, plus `<name>_se`
    metric_direction("val_auc")                              "max" (higher is better) or "min"

Definitions (each checked against scikit-learn in tests/training/test_metrics.py):
- `error`: the fraction of images whose predicted class (argmax) is not their label.
- `balanced_accuracy`: the mean per-class recall over the classes PRESENT in `labels` (sklearn's definition).
- `recall_<class>`: per class present in `labels`, the fraction of its images predicted as it; absent classes
  get no entry (a recall of nothing is undefined, not 0 or 1).
- `auc`: ROC AUC, exact, ties counted one half (the Mann-Whitney U statistic from average ranks). Two classes: the
  AUC of class 1's probability (sklearn's binary `roc_auc_score(labels, probs[:, 1])`). More: the unweighted mean
  of the one-vs-rest AUCs of the classes that have both positives and negatives in `labels`. NaN when no class
  does (e.g. every label the same): an undefined number is reported as such, never as 0.5.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

BASE_METRICS = ("error", "balanced_accuracy", "auc")  # per split, before the per-class recalls
_DIRECTIONS = {"error": "min", "loss": "min", "balanced_accuracy": "max", "auc": "max", "recall": "max"}
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def metric_key(class_name: str) -> str:
    """A class name as it appears in a metric name (MLflow allows letters, digits, _ . - only here)."""
    return _UNSAFE.sub("_", str(class_name)) or "_"


def metric_direction(name: str) -> str:
    """"min" or "max" for a metric name such as val_error, val_auc, val_recall_tumour or train_loss (the split
    prefix, when any, is ignored); raises ValueError for a name whose direction is unknown."""
    base = name.split("_", 1)[1] if name.split("_", 1)[0] in ("train", "val", "test") and "_" in name else name
    for stem, direction in _DIRECTIONS.items():
        if base == stem or (stem == "recall" and base.startswith("recall_") and len(base) > len("recall_")):
            return direction
    raise ValueError(f"Unknown metric {name!r}: expected <split>_<metric> with metric in "
                     f"{', '.join(BASE_METRICS)}, recall_<class> or loss.")


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values` (n,), ties given the mean of the ranks they span (scipy's rankdata 'average')."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])  # first index of each tie group
    ends = np.r_[starts[1:], len(values)]  # one past the last
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # mean of ranks start+1 .. end
    return ranks


def binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of `scores` (n,) for the boolean `positive` (n,): P(score+ > score-) + P(tie) / 2. NaN when either
    class is empty."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = average_ranks(np.asarray(scores, dtype=np.float64))
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0  # Mann-Whitney U of the positives
    return float(u / (n_pos * n_neg))


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> np.ndarray:
    """(K, K) int64 counts; row = true class, column = predicted class (scikit-learn's layout)."""
    labels, preds = np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    return np.bincount(labels * n_classes + preds, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def classification_metrics(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str],
                           preds: np.ndarray | None = None) -> dict[str, float]:
    """Metrics of one evaluated split: labels (n,) class indices, probs (n, K) class probabilities (softmax of the
    logits), classes the K class names. `preds` (n,) defaults to argmax(probs); the loop passes the argmax of the
    logits themselves so that `error` never depends on rounding in the softmax. Empty input: every value NaN."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n, k = len(labels), len(classes)
    if probs.shape != (n, k):
        raise ValueError(f"Expected probs of shape (n, K) = ({n}, {k}). Got {probs.shape}.")
    if n == 0:
        return {name: math.nan for name in BASE_METRICS}
    preds = probs.argmax(1) if preds is None else np.asarray(preds, dtype=np.int64)
    cm = confusion_matrix(labels, preds, k)
    support = cm.sum(1)  # (K,) images per true class
    present = np.flatnonzero(support)
    recalls = {int(c): cm[c, c] / support[c] for c in present}
    if k == 2:
        auc = binary_auc(labels == 1, probs[:, 1])
    else:
        per_class = [binary_auc(labels == c, probs[:, c]) for c in range(k)]
        defined = [a for a in per_class if not math.isnan(a)]
        auc = float(np.mean(defined)) if defined else math.nan
    out = {"error": int((preds != labels).sum()) / n,
           "balanced_accuracy": float(np.mean(list(recalls.values()))),
           "auc": auc}
    out.update({f"recall_{metric_key(classes[c])}": float(r) for c, r in recalls.items()})
    return out


def mean_and_se(passes: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Each metric's mean over R passes (R >= 1), and for R > 1 its standard error `<name>_se` = s / sqrt(R), with s
    the sample standard deviation (ddof = 1) over the passes. Keys missing from a pass are averaged over the passes
    that have them."""
    if not passes:
        raise ValueError("Expected at least one pass of metrics.")
    if len(passes) == 1:
        return dict(passes[0])
    names = list(dict.fromkeys(k for p in passes for k in p))
    out: dict[str, float] = {}
    for name in names:
        values = np.array([p[name] for p in passes if name in p], dtype=np.float64)
        out[name] = float(values.mean())
    for name in names:
        values = np.array([p[name] for p in passes if name in p], dtype=np.float64)
        out[f"{name}_se"] = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan
    return out


def prefixed(prefix: str, metrics: Mapping[str, float]) -> dict[str, float]:
    """{"error": ..} -> {"test_error": ..}."""
    return {f"{prefix}_{k}": float(v) for k, v in metrics.items()}


def write_confusion(folder: str | Path, name: str, matrix: np.ndarray, classes: Sequence[str]) -> list[Path]:
    """folder/<name>.csv (header `true\\predicted,<classes>`, one row per true class) and folder/<name>.png (counts
    drawn on a heatmap; matplotlib's Agg backend, no display needed). Returns both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    matrix = np.asarray(matrix, dtype=np.int64)
    csv_path, png_path = folder / f"{name}.csv", folder / f"{name}.png"
    lines = [",".join(["true\\predicted", *(_csv_cell(c) for c in classes)])]
    lines += [",".join([_csv_cell(c), *(str(int(v)) for v in row)]) for c, row in zip(classes, matrix)]
    csv_path.write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(classes)
    side = min(2.5 + 0.45 * k, 16)
    fig, ax = plt.subplots(figsize=(side, side), dpi=80)
    ax.imshow(matrix, cmap="Blues")
    if k <= 30:  # counts are unreadable beyond that; the CSV holds them
        top = matrix.max() if matrix.size else 0
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(j, i, str(int(v)), ha="center", va="center", fontsize=8,
                    color="white" if top and v > top / 2 else "black")
    ax.set_xticks(range(k), [str(c) for c in classes], rotation=90 if k > 8 else 0, fontsize=8)
    ax.set_yticks(range(k), [str(c) for c in classes], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{name}: {int(matrix.sum())} images", fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return [csv_path, png_path]


def _csv_cell(text: str) -> str:
    text = str(text)
    return '"' + text.replace('"', '""') + '"' if any(ch in text for ch in ',"\n') else text
