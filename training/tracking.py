"""Experiment tracking: MLflow on rank 0 (and the driver), a do-nothing tracker everywhere else.

Where runs go: `$MLFLOW_TRACKING_URI` when set (e.g. an `mlflow server`), else a local SQLite store at an absolute
path in the project folder, `sqlite:///<project>/.gats/mlflow.db`, with artifacts under `<project>/.gats/mlartifacts`.
The project folder is NOT the working directory (under `ray job submit --working-dir .` that is a temporary copy):
it is `$GATS_HOME`, else the source folder of the editable install (pip's direct_url.json), else this file's parent.
The driver resolves the URI once and passes it to the workers in the config, so every process writes to one store.

The driver creates the run (params = the flattened config, tags, `config.yaml`, data ROOT and manifest checksum);
rank 0 attaches to it by id and logs the per-epoch metrics, attention maps and per-run measurements; the driver logs
the final model as a weights-only checkpoint folder (`model/`: state.pt + config.yaml + epoch.txt, loaded with
`training.checkpoint.load_model`, never by unpickling code). Every param, tag and text artifact passes through
`training.secrets.redact` here, the one choke point, so `user:password@` in a URI is never recorded.
"""
from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Protocol
from urllib.parse import unquote, urlparse

from training.secrets import redact, redact_value

_SUPPRESS_URL = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"
EPOCH_METRICS = ("train_loss", "train_error", "test_error")
RUN_METRICS = ("time_per_sample_ms", "peak_rss_mb", "step_memory_mb", "cuda_max_allocated_mb",
               "bytes_read_per_sample", "patches_per_s", "io_wait_fraction", "samples_per_s", "train_time_s")


def project_dir() -> Path:
    """The project folder (absolute): $GATS_HOME, else the editable install's source folder, else the repo root."""
    if os.environ.get("GATS_HOME"):
        return Path(os.environ["GATS_HOME"]).expanduser().resolve()
    try:
        text = metadata.distribution("gigapixel-ats").read_text("direct_url.json")
        url = json.loads(text or "{}").get("url", "")
        if url.startswith("file://"):
            path = Path(unquote(urlparse(url).path))
            if (path / "pyproject.toml").is_file():
                return path
    except (metadata.PackageNotFoundError, ValueError):
        pass
    return Path(__file__).resolve().parents[1]


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else sqlite:///<project>/.gats/mlflow.db (the folder is created)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    folder = project_dir() / ".gats"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def default_artifact_root(tracking_uri: str) -> str | None:
    """Artifacts next to a local SQLite store; a server decides its own (None)."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def ui_command(tracking_uri: str) -> str:
    """How to look at the runs: `mlflow ui` over a local store, the server's address otherwise."""
    if tracking_uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {tracking_uri}"
    return f"open {redact(tracking_uri)} in a browser"


def manifest_checksum(root: str) -> str:
    """sha256 of ROOT/manifest.parquet's bytes: which exact dataset a run saw."""
    from pipeline.manifest import MANIFEST_KEY
    from pipeline.storage import Storage

    return "sha256:" + hashlib.sha256(Storage(root).read_bytes(MANIFEST_KEY)).hexdigest()


class Tracker(Protocol):
    run_id: str

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...


class NullTracker:
    """What every rank but 0 gets: accepts everything, logs nothing."""

    run_id = ""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass


class MlflowTracker:
    """Logs to one existing MLflow run by id through MlflowClient (no global active-run state)."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri)

    @classmethod
    def create(cls, tracking_uri: str, experiment: str, run_name: str, tags: Mapping[str, str] = {}) -> MlflowTracker:
        """A new run in `experiment` (created with a project-local artifact folder when the store is local)."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            from mlflow.exceptions import MlflowException

            try:
                experiment_id = client.create_experiment(experiment, default_artifact_root(tracking_uri))
            except MlflowException:  # another process created it first
                experiment_id = client.get_experiment_by_name(experiment).experiment_id
        else:
            experiment_id = found.experiment_id
        run = client.create_run(experiment_id, run_name=redact(run_name),
                                tags={k: redact(str(v)) for k, v in tags.items()})
        return cls(tracking_uri, run.info.run_id)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(redact_value(v))[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, redact(text), artifact_file)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, redact(str(v)))

    def finish(self, status: str = "FINISHED") -> None:
        """End the run. MLflow prints "View run ... at <tracking URI>" for a server; when that URI carries
        credentials its print is suppressed and the link is printed here with them redacted."""
        if redact(self.tracking_uri) == self.tracking_uri:
            self.client.set_terminated(self.run_id, status)
            return
        previous = os.environ.get(_SUPPRESS_URL)
        os.environ[_SUPPRESS_URL] = "true"
        try:
            self.client.set_terminated(self.run_id, status)
        finally:
            if previous is None:
                os.environ.pop(_SUPPRESS_URL, None)
            else:
                os.environ[_SUPPRESS_URL] = previous
        experiment = self.client.get_run(self.run_id).info.experiment_id
        print(f"View run at: {redact(self.tracking_uri.rstrip('/'))}/#/experiments/{experiment}/runs/{self.run_id}")

    def log_checkpoint(self, folder: str | Path, name: str = "model") -> None:
        """A checkpoint folder (training.checkpoint: weights-only state.pt, config.yaml, epoch.txt) as `name/`.
        Its config.yaml is already redacted by checkpoint.save; state.pt holds tensors and plain values only."""
        self.client.log_artifacts(self.run_id, str(folder), name)


def tracker_for(rank: int, tracking_uri: str, run_id: str) -> Tracker:
    """MLflow on rank 0 when there is a run to log to, a NullTracker elsewhere."""
    if rank == 0 and run_id:
        return MlflowTracker(tracking_uri, run_id)
    return NullTracker()


def save_heatmap(path: Path, low: Any, attention: Any, title: str) -> None:
    """A PNG with two panels: the low-res view (C, h, w) and the attention map (Ha, Wa) over the same extent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    image = np.asarray(low, dtype=np.float32)  # (C, h, w)
    image = image.mean(0) if image.shape[0] != 3 else image.transpose(1, 2, 0)  # -> (h, w) or (h, w, 3)
    h, w = image.shape[:2]
    fig, (left, right) = plt.subplots(1, 2, figsize=(6, 3.2), dpi=80)
    left.imshow(image, cmap="gray", extent=(0, w, h, 0))
    left.set_title("low-res view", fontsize=8)
    shown = right.imshow(np.asarray(attention, dtype=np.float32), cmap="inferno", extent=(0, w, h, 0),
                         interpolation="nearest")
    right.set_title("attention", fontsize=8)
    fig.colorbar(shown, ax=right, fraction=0.046, pad=0.04)
    for ax in (left, right):
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
