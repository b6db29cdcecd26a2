"""Validation splits, grouped splits and model selection: carving is deterministic, disjoint and never splits a group;
a manifest that puts a group in two splits is refused by name; the best epoch and early stopping as pure functions;
and one tiny LocalSession run (resumed once) whose logged `selected_epoch` is the argmin of its logged val_error."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.manifest import ManifestRow, write_manifest
from tests.training.test_loop import tiny_config
from training import config as C
from training.data import GroupLeakError, carve, examples_of, load_split, load_splits
from training.loop import train_loop
from training.selection import HISTORY_FILE, History, Selection, select_epoch, selection_score
from training.session import LocalSession


def test_carving_by_fraction_is_deterministic_and_disjoint_from_train(tiny_data):
    data = tiny_config(tiny_data, data={"val_fraction": 0.25, "max_test": 0}).data
    a, b = load_splits(data, seed=0), load_splits(data, seed=0)
    assert a == b and a.val_source == "carved" and len(a.val) == 3  # round(0.25 * 12)
    everything, _ = load_split(tiny_data, "train")
    assert {e.image_id for e in a.train}.isdisjoint(e.image_id for e in a.val)
    assert sorted(e.image_id for e in a.train + a.val) == sorted(e.image_id for e in everything)
    assert load_splits(data, seed=1).val != a.val  # the seed decides which images
    assert examples_of(data, "val", 0)[0] == a.val and examples_of(data, "train", 0)[0] == a.train  # evaluation's
    capped = load_splits(C.DataConfig(**{**{f: getattr(data, f) for f in data.__slots__}, "max_train": 2}), seed=0)
    assert capped.val == a.val and capped.train == a.train[:2]  # caps apply after carving
    assert load_splits(C.DataConfig(root=tiny_data), seed=0).val == []  # no val rows, no fraction: no validation


@settings(max_examples=200, deadline=None)
@given(groups=st.lists(st.sampled_from(["", "p1", "p2", "p3", "p4", "p5", "site-a"]), min_size=2, max_size=40),
       fraction=st.floats(0.01, 0.6), seed=st.integers(0, 2**31))
def test_grouped_carving_never_splits_a_group(groups, fraction, seed):
    try:
        train, val = carve(groups, fraction, seed)
    except ValueError as exc:  # every unit would have to go to validation
        assert "leaves no training image" in str(exc)
        return
    assert sorted(train + val) == list(range(len(groups))) and val and train
    for g in set(groups) - {""}:
        members = {i for i, x in enumerate(groups) if x == g}
        assert members <= set(train) or members <= set(val), g
    assert carve(groups, fraction, seed) == (train, val)  # deterministic
    # short of the target only when every unit left in train would overshoot it by at least as much
    short = max(1, round(fraction * len(groups))) - len(val)
    if short > 0:
        sizes = {g: groups.count(g) for g in set(groups) - {""}}
        assert all(sizes.get(groups[i], 1) >= 2 * short for i in train)


def test_ungrouped_carving_takes_single_images():
    groups = ["p1"] * 8 + ["p2"] * 2
    assert len(carve(groups, 0.3, 0, grouped=False)[1]) == 3
    assert carve(groups, 0.3, 0)[1] == [8, 9]  # the whole of p2: nearer 3 images than p1's 8
    assert carve(groups, 0.5, 0)[1] == [8, 9]  # p1 alone would leave no training image
    assert len(carve(["a", "b", "b", "c", "c", "c"], 0.01, 0)[1]) == 1  # at least one unit: the smallest
    with pytest.raises(ValueError, match="leaves no training image"):
        carve(["p1"] * 4, 0.5, 0)


def _row(image_id: str, split: str, group: str, label: str = "0") -> ManifestRow:
    return ManifestRow(image_id, f"/r/{image_id}.zarr", f"/s/{image_id}.png", label, split, 10, 10, 1, "uint8", 1,
                       ((1.0, 1.0),), group=group)


def test_a_group_in_two_manifest_splits_is_refused_by_name(tmp_path):
    root = str(tmp_path)
    write_manifest(root, [_row("a", "train", "patient-7"), _row("b", "test", "patient-7", "1"),
                          _row("c", "train", "patient-1"), _row("d", "test", "", "1"), _row("e", "train", "")])
    with pytest.raises(GroupLeakError, match=r"'patient-7' in test, train.*data.grouped=false") as info:
        load_split(root, "train")
    assert isinstance(info.value, ValueError) and "patient-1" not in str(info.value)
    with pytest.raises(GroupLeakError):
        load_splits(C.DataConfig(root=root), 0)
    assert [e.group for e in load_split(root, "train", grouped=False)[0]] == ["patient-7", "patient-1", ""]


def test_csv_groups_reach_the_manifest_and_a_leak_is_refused(tmp_path):
    """path,label,split,group through pipeline.ingest: the group is stored per image, and training refuses it."""
    from pipeline.ingest import WriteOptions, ingest_sources
    from pipeline.manifest import read_manifest
    from tests.pipeline.files import rgb, write_png

    for i in range(3):
        write_png(tmp_path / f"i{i}.png", rgb(40, 40, seed=i))
    (tmp_path / "list.csv").write_text("path,label,split,group\ni0.png,a,train,p1\ni1.png,b,test,p1\n"
                                       "i2.png,b,train,\n")
    root = str(tmp_path / "root")
    report = ingest_sources(root, [str(tmp_path / "list.csv")], options=WriteOptions(chunk=32, min_size=16))
    assert report.complete, report.summary()
    assert [(r.image_id, r.group) for r in read_manifest(root)[0]] == [("i0", "p1"), ("i1", "p1"), ("i2", "")]
    with pytest.raises(GroupLeakError, match="'p1' in test, train"):
        load_split(root, "train")


def test_best_epoch_patience_and_direction_as_pure_functions():
    errors = [0.5, 0.4, 0.45, 0.4, 0.42, 0.3]
    history = [{"epoch": i + 1, "val_error": e, "val_auc": 1 - e} for i, e in enumerate(errors)]
    assert select_epoch(history[:5], "val_error").epoch == 2  # the first of the tied best (epochs 2 and 4)
    assert select_epoch(history[:5], "val_auc").epoch == 2 and select_epoch(history, "val_auc").epoch == 6  # max
    assert select_epoch(history, "val_error") == Selection(6, False, 0)
    assert select_epoch(history, "").epoch == 6  # no metric: the last epoch
    assert select_epoch([], "val_error").epoch == 0
    # patience 2: epochs 3 and 4 do not improve on epoch 2 -> stop after epoch 4
    stops = [select_epoch(history[:n], "val_error", patience=2).stop for n in range(1, 7)]
    assert stops == [False, False, False, True, True, False]
    assert not any(select_epoch(history[:n], "", patience=2).stop for n in range(1, 7))
    with_nan = [{"epoch": 1, "val_auc": math.nan}, {"epoch": 2, "val_auc": 0.6}, {"epoch": 3, "val_auc": math.nan}]
    assert select_epoch(with_nan, "val_auc").epoch == 2  # NaN is never the best
    assert selection_score(with_nan[0], "val_auc") == -math.inf
    assert selection_score(history[1], "val_error") == -0.4 and selection_score(history[1], "") == 2.0


def test_history_keeps_the_selected_epochs_confusion_and_round_trips(tmp_path):
    h = History("val_error", 1)
    h.add({"epoch": 1, "val_error": 0.5}, {"val": np.eye(2, dtype=np.int64)})
    h.add({"epoch": 2, "val_error": 0.6}, {"val": np.ones((2, 2), dtype=np.int64)})
    assert h.selection().epoch == 1 and h.selection().stop and h.confusion == {"val": [[1, 0], [0, 1]]}
    h.save(tmp_path)
    back = History.load(tmp_path, "val_error", 1)
    assert back.epochs == h.epochs and back.confusion == h.confusion
    assert History.load(tmp_path, "val_auc", 0).confusion == {}  # another rule: its selection is not this one
    back.add({"epoch": 2, "val_error": 0.1}, {"val": np.zeros((2, 2), dtype=np.int64)})  # epoch 2 redone
    assert [m["epoch"] for m in back.epochs] == [1, 2] and back.selection().epoch == 2


def test_tiny_run_logs_the_argmin_of_its_val_error_as_selected_epoch(tiny_data, tmp_path, local_tracking):
    """3 epochs with patience 1, in two attempts (2 epochs, then resumed to 3; an attempt that finds the patience
    spent trains nothing): the selection spans both attempts."""
    from mlflow.tracking import MlflowClient

    from training.tracking import MlflowTracker

    cfg = tiny_config(tiny_data, data={"val_fraction": 0.25, "max_train": 4},
                      optim={"epochs": 2, "select_metric": "val_error", "patience": 1},
                      runtime={"tracking_uri": local_tracking})
    run = MlflowTracker.create(local_tracking, "select", "select")
    train_loop({"config": cfg.to_dict(), "run_id": run.run_id}, LocalSession(tmp_path))
    assert (tmp_path / "epoch_0002" / HISTORY_FILE).is_file()
    session = LocalSession(tmp_path)
    train_loop({"config": cfg.replace(optim={"epochs": 3}).to_dict(), "run_id": run.run_id}, session)

    client = MlflowClient(local_tracking)
    val = [(m.step, m.value) for m in sorted(client.get_metric_history(run.run_id, "val_error"), key=lambda m: m.step)]
    epochs_run = [s for s, _ in val]
    values = [v for _, v in val]
    assert epochs_run == list(range(1, len(val) + 1)) and len(val) in (2, 3)
    assert all(3 * v == round(3 * v) for v in values)  # wrong answers over the 3 carved validation images
    history = [{"epoch": s, "val_error": v} for s, v in val]
    # patience 1: training stopped after the first epoch that did not improve, or ran all 3
    stopped = [n for n in (1, 2) if select_epoch(history[:n], "val_error", 1).stop]
    assert len(val) == (stopped[0] if stopped else 3)
    metrics = client.get_run(run.run_id).data.metrics
    assert metrics["selected_epoch"] == 1 + int(np.argmin(values))
    chosen = int(metrics["selected_epoch"])
    test = {m.step: m.value for m in client.get_metric_history(run.run_id, "test_error")}
    assert metrics["selected_test_error"] == test[chosen]
    assert {"selected_test_auc", "selected_test_balanced_accuracy"} <= set(metrics)
    assert [r["selection_score"] for r in session.reports] == [-v for v in values[2:]]  # the resumed attempt's
    artifacts = {a.path for a in client.list_artifacts(run.run_id, "confusion")}
    assert artifacts == {"confusion/val.csv", "confusion/val.png", "confusion/test.csv", "confusion/test.png"}


def test_selecting_on_validation_without_a_validation_set_names_the_fix(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, optim={"select_metric": "val_auc"})
    with pytest.raises(C.ConfigError, match="data.val_fraction=0.2"):
        train_loop({"config": cfg.to_dict(), "run_id": ""}, LocalSession(tmp_path))
    cfg = tiny_config(tiny_data, data={"val_fraction": 0.25}, optim={"select_metric": "val_recall_cat"})
    with pytest.raises(C.ConfigError, match="val_recall_9"):
        train_loop({"config": cfg.to_dict(), "run_id": ""}, LocalSession(tmp_path))
