"""The MLflow UI as a person meets it: a real `mlflow server`, a training run made by `driver.create_run` (tags,
params, config.yaml, the manifest as dataset input, a description) with two epochs of metrics and an attention
heatmap logged the way the training loop logs them, looked at in headless Chromium.

Chromium renders the single-page app (`--dump-dom` after a virtual-time budget, so the app's requests and timers
settle) and takes screenshots, kept in the test's tmp folder (`<tmp>/*.png`). Each page is opened in a fresh browser
profile: MLflow 3 keeps the "GenAI" / "Model training" sidebar switch per browser, so nothing carries over.
Skipped when no Chromium binary is found (Debian: `apt-get install chromium`)."""
from __future__ import annotations

import html.parser
import os
import re
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from training import config as C
from training import driver, tracking

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
CHROMIUM = os.environ.get("GATS_CHROMIUM") or next((p for p in map(shutil.which, BROWSERS) if p), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason=f"no Chromium binary ({', '.join(BROWSERS)} not on PATH, GATS_CHROMIUM unset): "
                             "install it (Debian: apt-get install -y chromium) to look at the MLflow UI")
BUDGET_MS = 60000  # virtual time for the app to load its data and draw charts (it runs fast: ~5 s real a page)
EPOCHS = {1: {"train_loss": 0.6875, "train_error": 0.5, "test_error": 0.375},
          2: {"train_loss": 0.4375, "train_error": 0.25, "test_error": 0.125}}


class _Text(html.parser.HTMLParser):
    """The visible text of a DOM dump: script and style contents dropped, runs of whitespace collapsed."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        self._skip += tag in ("script", "style")

    def handle_endtag(self, tag: str) -> None:
        self._skip -= tag in ("script", "style") and self._skip > 0

    def handle_data(self, data: str) -> None:
        if not self._skip and data.strip():
            self.parts.append(data.strip())


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    """One headless Chromium run in its own process group (stopped whole if it hangs) and a throwaway profile."""
    cmd = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage", "--hide-scrollbars",
           "--no-first-run", f"--user-data-dir={profile}", "--window-size=1400,900",
           f"--virtual-time-budget={BUDGET_MS}", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += "\n(timed out after 180 s)"
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def look(url: str, folder: Path, name: str) -> tuple[str, str]:
    """Open `url` like a person would (a fresh profile): (page title, visible text); one Chromium run saves
    `<name>.png` (what the 1400x900 window shows) and `<name>.html` (the DOM) in `folder`."""
    shot = folder / f"{name}.png"
    done = _chromium(["--dump-dom", f"--screenshot={shot}", url], folder / f".profile-{name}")
    assert done.returncode == 0 and "<html" in done.stdout, f"chromium failed on {url}:\n{done.stderr[-2000:]}"
    assert shot.is_file() and shot.stat().st_size > 10_000, f"no screenshot of {url}:\n{done.stderr[-2000:]}"
    (folder / f"{name}.html").write_text(done.stdout)
    parser = _Text()
    parser.feed(done.stdout)
    title = done.stdout.split("<title>", 1)[-1].split("</title>", 1)[0]
    return title, re.sub(r" ([,;:.)])", r"\1", " ".join(parser.parts))  # "train , tested" -> "train, tested"


@pytest.fixture()
def training_run(mlflow_server, tiny_data, tmp_path):
    """A run as `jobs/train.py` makes it, with the metrics and one heatmap that rank 0 logs in two epochs."""
    from pipeline.reader import PatchReader

    cfg = driver.resolve(C.from_dict({
        "data": {"root": tiny_data},
        "model": {"n_patches": 5},
        "optim": {"epochs": 2},
        "runtime": {"tracking_uri": mlflow_server, "experiment": f"ui-{uuid.uuid4().hex[:8]}",
                    "storage_path": str(tmp_path / "ray"), "num_workers": 1, "num_patch_servers": 1}}))
    run = driver.create_run(cfg)
    for epoch, metrics in EPOCHS.items():
        run.log_metrics(metrics, step=epoch)
    reader = PatchReader(tiny_data)
    image_id = _first_test_image(tiny_data)
    low = reader.low_res(image_id, level=reader.info(image_id).levels - 1)
    attention = [[(i * 7 + j) % 5 / 10 for j in range(6)] for i in range(6)]
    png = tmp_path / f"{image_id}.png"
    tracking.save_heatmap(png, low, attention, f"{image_id} epoch 1")
    run.log_artifact(png, "attention/epoch_1")
    run.finish()
    experiment_id = run.client.get_run(run.run_id).info.experiment_id
    return cfg, run, experiment_id, image_id


def _first_test_image(root: str) -> str:
    from pipeline.manifest import read_manifest

    rows, _ = read_manifest(root)
    return next(r.image_id for r in rows if r.split == "test" and r.status == "complete")


def test_the_experiment_opens_on_the_runs_table_with_the_dataset_and_the_run_shows_metrics_and_heatmaps(
        training_run, mlflow_server, tmp_path):
    cfg, run, experiment_id, image_id = training_run
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment(experiment_id)
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.MODEL_TRAINING
    digest = tracking.manifest_checksum(cfg.data.root).removeprefix("sha256:")[:8]
    dataset = f"{Path(cfg.data.root).name} ({digest})"  # how the UI names a dataset input: "mnist (1a2b3c4d)"
    metric_names = sorted(EPOCHS[2])

    # (a) the experiment, by the address this project prints (tracking.experiment_url; MLflow 3.17's UI takes the
    # view from its sidebar switch or ?workflowType=, not from the kind tag): the runs table, the run, its dataset
    title, text = look(tracking.experiment_url(mlflow_server, experiment_id), tmp_path, "experiment")
    assert title.startswith("Runs - "), f"the experiment did not open on its runs table: {title!r}\n{text[:1500]}"
    assert "Traces 0" not in text and "Token Usage" not in text, text[:1500]  # not the GenAI overview
    assert "Run Name" in text and "Dataset" in text and cfg.runtime.run_name in text, text[:1500]
    assert f"{dataset} training" in text, f"no dataset {dataset!r} (context training) in the table:\n{text[:1500]}"

    # ... and its charts (the runs table shows metric columns only once a person picks them, MLflow 3's default)
    charts = f"{mlflow_server}/#/experiments/{experiment_id}/runs?{tracking.ML_VIEW}&compareRunsMode=CHART"
    title, text = look(charts, tmp_path, "experiment-charts")
    assert f"Model metrics ({len(metric_names)})" in text, text[:1500]
    for name in metric_names:
        assert f"{cfg.runtime.run_name} ({name})" in text, f"no chart of {name}:\n{text[:1500]}"

    # (b) the run: description, the latest value of every metric, the dataset with its context
    title, text = look(tracking.experiment_url(mlflow_server, experiment_id, run.run_id), tmp_path, "run")
    assert title.startswith(f"Run {run.run_id}") and cfg.runtime.run_name in text, f"{title!r}\n{text[:2000]}"
    assert "ATS-5: attention sampling, 5 patches per image" in text, text[:2000]
    assert "images: train 12, test 6; 10 classes" in text, text[:2000]
    assert f"data: {cfg.data.root} (sha256:" in text and "trained on train, tested on test; 2 epochs" in text
    assert f"Metrics ({len(metric_names)})" in text, text[:2000]
    for name, value in EPOCHS[2].items():
        assert f"{name} {value:g}" in text, f"no {name} = {value:g} on the run page:\n{text[:2000]}"
    assert f"Datasets {dataset} training" in text, text[:2000]

    # ... and its artifacts: the heatmap of epoch 1, opened where the training loop logged it
    path = f"attention/epoch_1/{image_id}.png"
    url = (f"{mlflow_server}/#/experiments/{experiment_id}/runs/{run.run_id}/artifacts/{path}"
           f"?{tracking.ML_VIEW}")
    title, text = look(url, tmp_path, "heatmap")
    for item in ("attention", "epoch_1", f"{image_id}.png", "config.yaml"):
        assert item in text, f"{item!r} not in the artifact tree:\n{text[:2000]}"
    assert f'<img alt="{path}" src="blob:' in (tmp_path / "heatmap.html").read_text(), "the heatmap is not shown"
