"""training/metrics.py against scikit-learn on fixed arrays (ties, K = 2 and K = 4, a class absent from the labels),
the confusion artifacts, and the R-repeat mean and standard error of training/evaluation.py on a stub model."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from training import config as C
from training.evaluation import PASS_SEED_STRIDE, evaluate_split
from training.metrics import (average_ranks, binary_auc, classification_metrics, confusion_matrix, mean_and_se,
                              metric_direction, write_confusion)

# K = 2, with ties in the scores across classes (0.7 twice, 0.4 three times)
Y2 = np.array([0, 1, 1, 0, 1, 0, 1, 1, 0, 0])
P2_POS = np.array([0.2, 0.7, 0.4, 0.4, 0.9, 0.7, 0.4, 0.55, 0.1, 0.3])
P2 = np.stack([1 - P2_POS, P2_POS], 1)

# K = 4, class 2 absent from the labels (but predicted once), ties in class 0's and class 3's scores
Y4 = np.array([0, 0, 1, 3, 3, 1, 0, 3, 1, 0, 3, 1])
LOGITS4 = np.array([[2.0, 0.1, 0.0, 0.1], [1.0, 1.0, 0.3, 0.0], [0.0, 2.0, 0.0, 0.5], [0.5, 0.0, 0.0, 0.5],
                    [0.0, 0.0, 1.5, 1.0], [2.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 1.0], [0.0, 0.2, 0.0, 3.0],
                    [0.0, 1.2, 0.0, 0.0], [2.0, 0.1, 0.0, 0.1], [0.0, 0.5, 0.0, 0.5], [0.3, 0.3, 0.0, 0.9]])
P4 = np.exp(LOGITS4) / np.exp(LOGITS4).sum(1, keepdims=True)
CLASSES4 = ["a", "b", "c", "d"]


def test_ranks_average_ties():
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0])).tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]


def test_binary_auc_with_ties_matches_sklearn():
    assert binary_auc(Y2 == 1, P2_POS) == pytest.approx(skm.roc_auc_score(Y2, P2_POS), abs=1e-12)
    assert math.isnan(binary_auc(np.ones(3, bool), np.array([0.1, 0.2, 0.3])))  # no negatives: undefined
    assert binary_auc(np.array([True, False]), np.array([0.5, 0.5])) == 0.5  # a tie counts one half


def test_two_classes_match_sklearn():
    m = classification_metrics(Y2, P2, ["neg", "pos"])
    pred = P2.argmax(1)
    assert m["error"] == pytest.approx(1 - skm.accuracy_score(Y2, pred), abs=1e-15)
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(Y2, pred), abs=1e-12)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(Y2, P2[:, 1]), abs=1e-12)
    recalls = skm.recall_score(Y2, pred, average=None, labels=[0, 1])
    assert (m["recall_neg"], m["recall_pos"]) == pytest.approx(tuple(recalls), abs=1e-12)


def test_four_classes_with_an_absent_class_match_sklearn():
    m = classification_metrics(Y4, P4, CLASSES4)
    pred = P4.argmax(1)
    assert 2 in pred and 2 not in Y4
    assert m["error"] == pytest.approx(1 - skm.accuracy_score(Y4, pred), abs=1e-15)
    with pytest.warns(UserWarning):  # sklearn warns about the predicted class absent from y_true, and ignores it
        assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(Y4, pred), abs=1e-12)
    present = [0, 1, 3]
    ovr = [skm.roc_auc_score(Y4 == c, P4[:, c]) for c in present]  # macro one-vs-rest over the present classes
    assert m["auc"] == pytest.approx(np.mean(ovr), abs=1e-12)
    recalls = skm.recall_score(Y4, pred, labels=present, average=None)
    assert [m[f"recall_{CLASSES4[c]}"] for c in present] == pytest.approx(list(recalls), abs=1e-12)
    assert "recall_c" not in m  # no recall for a class with no images
    # with every class present, the same as sklearn's own macro one-vs-rest
    y_all = np.r_[Y4, 2]
    p_all = np.r_[P4, [[0.1, 0.1, 0.7, 0.1]]]
    assert classification_metrics(y_all, p_all, CLASSES4)["auc"] == pytest.approx(
        skm.roc_auc_score(y_all, p_all, multi_class="ovr", average="macro"), abs=1e-12)


def test_preds_override_the_argmax_and_undefined_values_are_nan():
    preds = np.zeros(len(Y2), dtype=np.int64)
    assert classification_metrics(Y2, P2, ["0", "1"], preds=preds)["error"] == pytest.approx(np.mean(Y2 != 0))
    one_class = classification_metrics(np.zeros(3, np.int64), np.full((3, 2), 0.5), ["0", "1"])
    assert math.isnan(one_class["auc"]) and one_class["balanced_accuracy"] == 1.0
    empty = classification_metrics(np.zeros(0, np.int64), np.zeros((0, 2)), ["0", "1"])
    assert all(math.isnan(v) for v in empty.values())
    with pytest.raises(ValueError, match="shape"):
        classification_metrics(Y2, P4[:10], ["0", "1"])


def test_confusion_matrix_matches_sklearn_and_is_written(tmp_path):
    pred = P4.argmax(1)
    cm = confusion_matrix(Y4, pred, 4)
    assert cm.dtype == np.int64 and cm.shape == (4, 4)
    assert np.array_equal(cm, skm.confusion_matrix(Y4, pred, labels=range(4)))
    csv_path, png_path = write_confusion(tmp_path, "test", cm, ["a", "b,c", "c", "d"])
    lines = csv_path.read_text().splitlines()
    assert lines[0] == 'true\\predicted,a,"b,c",c,d' and len(lines) == 5
    assert [int(v) for v in lines[1].split(",")[1:]] == cm[0].tolist()
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mean_and_standard_error():
    passes = [{"error": 0.25, "auc": 0.5}, {"error": 0.5, "auc": 0.75}, {"error": 0.75, "auc": 1.0}]
    out = mean_and_se(passes)
    assert out["error"] == pytest.approx(0.5) and out["auc"] == pytest.approx(0.75)
    assert out["error_se"] == pytest.approx(np.std([0.25, 0.5, 0.75], ddof=1) / math.sqrt(3))
    assert mean_and_se(passes[:1]) == passes[0]  # one pass: no _se


def test_directions():
    assert [metric_direction(n) for n in ("val_error", "train_loss", "val_auc", "val_balanced_accuracy",
                                          "val_recall_tumour")] == ["min", "min", "max", "max", "max"]
    with pytest.raises(ValueError, match="Unknown metric"):
        metric_direction("val_speed")


class StubNet(torch.nn.Module):
    """Logits = noise drawn from the evaluation generator: each pass's answers depend only on its seed."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    @property
    def core(self) -> torch.nn.Module:
        return self

    def logits(self, batch, fetcher, mode, generator):
        return torch.randn(len(batch.labels), 3, generator=generator)


class StubViews:
    def batch(self, chunk):
        return SimpleNamespace(labels=torch.tensor([e.label for e in chunk]), to=lambda device: self.batch(chunk))


def _stub_examples(n: int):
    return [SimpleNamespace(label=i % 3) for i in range(n)]


def test_repeated_sampled_evaluation_is_the_mean_of_seeded_passes_with_its_standard_error():
    examples = _stub_examples(10)
    cfg = C.TrainConfig().replace(data={"batch_size": 4}, runtime={"eval_repeats": 3})
    out = evaluate_split(StubNet(), examples, StubViews(), None, cfg, 0, 1, epoch=2, classes=["x", "y", "z"])
    base = 10_000 + 0 * 1000 + 2 * 100 + 0  # today's seed of pass 0: the R = 1 answer is unchanged
    passes = []
    for r in range(3):
        gen = torch.Generator().manual_seed(base + r * PASS_SEED_STRIDE)
        logits = torch.cat([torch.randn(len(c), 3, generator=gen) for c in (examples[:4], examples[4:8], examples[8:])])
        labels = np.array([e.label for e in examples])
        passes.append(classification_metrics(labels, torch.softmax(logits.double(), 1).numpy(), ["x", "y", "z"]))
    for name in ("error", "balanced_accuracy", "auc"):
        values = [p[name] for p in passes]
        assert out.metrics[name] == pytest.approx(np.mean(values))
        assert out.metrics[f"{name}_se"] == pytest.approx(np.std(values, ddof=1) / math.sqrt(3))
    assert len({p["error"] for p in passes}) > 1  # the passes really differ
    one = evaluate_split(StubNet(), examples, StubViews(), None, cfg.replace(runtime={"eval_repeats": 1}), 0, 1,
                         epoch=2, classes=["x", "y", "z"])
    assert one.metrics == pytest.approx(passes[0]) and "error_se" not in one.metrics
    assert out.confusion.sum() == 10 and np.array_equal(out.confusion, one.confusion)  # pass 0's
    topk = evaluate_split(StubNet(), examples, StubViews(), None, cfg, 0, 1, epoch=2, mode="topk",
                          classes=["x", "y", "z"])
    assert "error_se" not in topk.metrics  # deterministic modes make one pass


class ByImageNet(StubNet):
    """Logits fixed per image (no randomness): any split of the work must give the same answers."""

    def logits(self, batch, fetcher, mode, generator):
        ids = batch.ids.double()[:, None]  # (B, 1)
        return torch.cat([torch.sin(ids), torch.cos(3 * ids), torch.sin(7 * ids)], 1)  # (B, 3)


class IdViews(StubViews):
    def batch(self, chunk):
        return SimpleNamespace(labels=torch.tensor([e.label for e in chunk]), ids=torch.tensor([e.i for e in chunk]),
                               to=lambda device: self.batch(chunk))


def test_gathered_slices_in_any_rank_order_give_the_one_worker_metrics(monkeypatch):
    from training import evaluation

    examples = [SimpleNamespace(label=(i * 5) % 3, i=i) for i in range(7)]
    cfg = C.TrainConfig().replace(data={"batch_size": 2})
    whole = evaluate_split(ByImageNet(), examples, IdViews(), None, cfg, 0, 1, classes=["x", "y", "z"])
    slices = []
    monkeypatch.setattr(evaluation, "gather", lambda obj: slices.append(obj) or [obj])
    for rank in range(2):
        evaluate_split(ByImageNet(), examples, IdViews(), None, cfg, rank, 2, classes=["x", "y", "z"])
    assert [s[0] for s in slices] == [[0, 2, 4, 6], [1, 3, 5]]
    monkeypatch.setattr(evaluation, "gather", lambda obj: slices[::-1])  # what all_gather_object would hand back
    both = evaluate_split(ByImageNet(), examples, IdViews(), None, cfg, 0, 2, classes=["x", "y", "z"])
    assert both.metrics == whole.metrics and np.array_equal(both.confusion, whole.confusion)
    assert whole.confusion.sum() == 7
