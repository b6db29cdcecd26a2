"""benchmarks/mnist_figures.py: the time-to-accuracy table reads each run's error at a budget from the last epoch
that ended before it, and the curves come from MLflow's per-epoch history."""
from __future__ import annotations

from benchmarks.mnist_figures import curve, table


def test_table_takes_the_last_epoch_before_each_mark_and_leaves_unreached_marks_empty():
    points = [(10.0, 0.9), (20.0, 0.5), (59.5, 0.2), (70.0, 0.1)]
    row = table({"ats10": points}).splitlines()[2]
    # 15 min: epoch at 10; 30: at 20; 60: at 59.5; 120: the run stopped at 70 min, so no value; best 0.1 at 70
    assert row == "| ats10 | 4 | 0.900 | 0.500 | 0.200 | - | 0.100 (70) |"


def test_curve_pairs_each_epochs_error_with_its_training_seconds(tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("x"))
    for epoch, (seconds, error) in enumerate([(60, 0.8), (150, 0.4)], start=1):
        client.log_metric(run.info.run_id, "test_error", error, step=epoch)
        client.log_metric(run.info.run_id, "elapsed_train_s", seconds, step=epoch)
    client.log_metric(run.info.run_id, "test_error", 0.3, step=3)  # an epoch without its time: left out
    assert curve(client, run.info.run_id) == [(1.0, 0.8), (2.5, 0.4)]
