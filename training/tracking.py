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
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence
from urllib.parse import unquote, urlparse

from training.secrets import redact, redact_value

_SUPPRESS_URL = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"
# Per epoch (step = epoch). Also per epoch: `test_recall_<class>` for each class present in the test split; the
# same `val_*` names (VAL_METRICS, val_recall_<class>) when there is a validation set; with runtime.eval_repeats
# R > 1 in sampled mode each of these is the mean over R samplings and `<name>_se` its standard error.
# elapsed_train_s: training-step seconds up to this epoch's end (the time budget's clock, carried across resumes),
# the x axis of time-to-accuracy plots; attention_on_objects (ats, uniform; images with recorded objects only):
# training/objects.py.
EPOCH_METRICS = ("train_loss", "train_error", "test_error", "test_balanced_accuracy", "test_auc", "elapsed_train_s")
VAL_METRICS = ("val_error", "val_balanced_accuracy", "val_auc")
# Once per run, at the end (rank 0). selected_epoch: optim.select_metric's best epoch, else the last one;
# selected_test_<metric>: each test_* metric of that epoch (recalls and _se included); artifacts
# confusion/<split>.csv and .png (split: val, test) of that epoch.
RUN_METRICS = ("time_per_sample_ms", "peak_rss_mb", "step_memory_mb", "cuda_max_allocated_mb",
               "bytes_read_per_sample", "patches_per_s", "io_wait_fraction", "samples_per_s", "train_time_s",
               "selected_epoch", "selected_test_error", "selected_test_balanced_accuracy", "selected_test_auc")


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


# What MLflow's UI reads. The experiment kind: MLflow 3 sets "genai_development" on its GenAI demo experiment
# (mlflow/demo/generators/traces.py); "custom_model_development" is its UI's "Machine learning" kind (the ExperimentKind
# enum of the UI bundle), whose experiments open on the runs table. The UI of MLflow 3.17 no longer reads the tag to
# pick the view (workflow-based navigation): it opens every experiment in the view of its sidebar switch, "GenAI"
# (the default, traces) or "Model training" (runs), kept per browser, or of the address's ?workflowType=; ML_VIEW.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
ML_VIEW = "workflowType=machine_learning"
NOTE_TAG = "mlflow.note.content"


def ui_command(tracking_uri: str) -> str:
    """How to look at the runs: `mlflow ui` over a local store, the server's address otherwise (MLflow 3's UI opens
    experiments in its GenAI view until "Model training" is picked in its sidebar: see ML_VIEW)."""
    if tracking_uri.startswith("sqlite:"):
        return f'mlflow ui --backend-store-uri {tracking_uri}  (then "Model training" in the sidebar)'
    return f'open {redact(tracking_uri)} in a browser  (then "Model training" in the sidebar)'


def experiment_url(tracking_uri: str, experiment_id: str, run_id: str = "") -> str:
    """The UI address of an experiment (its runs table) or of one run, in the model-training view, redacted."""
    page = f"/#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{redact(tracking_uri.rstrip('/'))}{page}?{ML_VIEW}"


def manifest_checksum(root: str) -> str:
    """sha256 of ROOT/manifest.parquet's bytes: which exact dataset a run saw."""
    from pipeline.manifest import MANIFEST_KEY
    from pipeline.storage import Storage

    return "sha256:" + hashlib.sha256(Storage(root).read_bytes(MANIFEST_KEY)).hexdigest()


def dataset_summary(root: str, rows: Sequence[Any], classes: Sequence[str], checksum: str) -> dict[str, Any]:
    """What a run records about its dataset: ROOT (credentials redacted), the manifest checksum, and the number of
    complete images per split, per class and per split and class (failed rows only counted)."""
    done = [r for r in rows if r.status == "complete"]
    per_split = Counter(r.split for r in done)
    return {
        "root": redact(root), "checksum": checksum, "images": len(done),
        "failed": len(rows) - len(done), "classes": list(classes),
        "splits": {s: per_split[s] for s in sorted(per_split, key=_split_order)},
        "per_class": {c: n for c, n in sorted(Counter(r.label for r in done).items())},
        "per_split_class": {s: dict(sorted(Counter(r.label for r in done if r.split == s).items()))
                            for s in sorted(per_split, key=_split_order)},
    }


def _split_order(split: str) -> tuple[int, str]:
    from pipeline.manifest import SPLITS

    return (SPLITS.index(split) if split in SPLITS else len(SPLITS), split)  # train, val, test, then the others


def model_title(name: str, n_patches: int, nested: tuple[int, int] = (0, 0)) -> str:
    """"ATS-10: attention sampling, 10 patches per image", "U-10: ...", "Deep MIL: ...", "CNN: ...", "Nested ATS
    8x4: ..." (`nested` = regions, patches per region)."""
    return {"ats": f"ATS-{n_patches}: attention sampling, {n_patches} patches per image",
            "uniform": f"U-{n_patches}: uniform sampling, {n_patches} patches per image",
            "deepmil": "Deep MIL: gated attention over every patch of a grid",
            "cnn": "CNN on the downsampled image",
            "nested": f"Nested ATS {nested[0]}x{nested[1]}: {nested[0]} regions, then {nested[1]} patches in each",
            }.get(name, name)


def run_note(title: str, summary: Mapping[str, Any], lines: Sequence[str] = ()) -> str:
    """The run's description (markdown, the `mlflow.note.content` tag): the title, the data ROOT (redacted) and its
    checksum, the split sizes, then `lines`."""
    splits = ", ".join(f"{s} {n}" for s, n in summary["splits"].items()) or "none"
    failed = f" ({summary['failed']} failed)" if summary.get("failed") else ""
    return "\n".join([f"**{title}**", "",
                      f"- data: `{redact(summary['root'])}` ({summary['checksum'][:19]}...)",
                      f"- images: {splits}{failed}; {len(summary['classes'])} classes",
                      *(f"- {line}" for line in lines)])


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
        """A new run in `experiment` (created with a project-local artifact folder when the store is local), which
        is tagged a model-training experiment (EXPERIMENT_KIND_TAG) unless it already says what kind it is."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            from mlflow.exceptions import MlflowException

            try:
                experiment_id = client.create_experiment(experiment, default_artifact_root(tracking_uri),
                                                         tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
                found = client.get_experiment(experiment_id)
            except MlflowException:  # another process created it first
                found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id
        if EXPERIMENT_KIND_TAG not in found.tags:  # made before this tag, or by hand: a model-training experiment
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
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

    def set_note(self, text: str) -> None:
        """The run's description, shown in the UI (markdown): the `mlflow.note.content` tag."""
        self.set_tags({NOTE_TAG: text})

    def log_dataset(self, root: str, rows: Sequence[Any], classes: Sequence[str], checksum: str,
                    context: str = "training") -> dict[str, Any]:
        """The manifest as the run's dataset input (the UI's Datasets column and the run page): named after ROOT's
        last folder, digest = the manifest checksum's first 8 hex digits, source = ROOT (redacted), context
        `training` or `evaluation`; rows: image_id, label, split, height, width of the complete images; profile:
        `dataset_summary`. Returns the summary."""
        import warnings

        import mlflow.data
        import pandas as pd
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        summary = dataset_summary(root, rows, classes, checksum)
        shown = summary["root"]
        frame = pd.DataFrame([{"image_id": r.image_id, "label": r.label, "split": r.split, "height": r.height,
                               "width": r.width} for r in rows if r.status == "complete"],
                             columns=["image_id", "label", "split", "height", "width"])
        where = urlparse(shown) if "://" in shown else None  # s3://bucket/prefix: "prefix"; s3://bucket: "bucket"
        name = (Path(where.path.rstrip("/")).name or where.hostname if where else Path(shown).name) or "dataset"
        with warnings.catch_warnings():  # MLflow's hints (two "local" sources match a path; integer columns)
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(shown)  # a folder: "local", s3://: "s3"
            dataset = mlflow.data.from_pandas(frame, source=source, name=name,
                                              digest=checksum.removeprefix("sha256:")[:8], targets="label")
            d = dataset.to_dict()  # the schema is inferred here
        entity = Dataset(name=d["name"], digest=d["digest"], source_type=d["source_type"], source=d["source"],
                         schema=d["schema"], profile=json.dumps({**json.loads(d["profile"]), **summary}))
        self.client.log_inputs(self.run_id, [DatasetInput(entity, [InputTag(MLFLOW_DATASET_CONTEXT, context)])])
        return summary

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
        print(f"View run at: {experiment_url(self.tracking_uri, experiment, self.run_id)}")

    def log_checkpoint(self, folder: str | Path, name: str = "model") -> None:
        """A checkpoint folder (training.checkpoint: weights-only state.pt, config.yaml, epoch.txt) as `name/`.
        Its config.yaml is already redacted by checkpoint.save; state.pt holds tensors and plain values only."""
        self.client.log_artifacts(self.run_id, str(folder), name)


def open_run(cfg: Any, tracking_uri: str, *, experiment: str, run_name: str, kind: str, context: str,
             tags: Mapping[str, str] = {}, params: Mapping[str, Any] = {}, note: Sequence[str] = ()) -> MlflowTracker:
    """A new run for a job on `cfg` (a training.config.TrainConfig) and its data ROOT: tags (gats.kind, gats.model,
    gats.data_root, then `tags`), params (the whole config flattened with credentials stripped, the manifest's
    checksum, then `params`), config.yaml, the manifest as the run's dataset input (`context`: training or
    evaluation) and a description (the model, the data, then the `note` lines). The run is ended FAILED when any of
    that fails."""
    from pipeline.manifest import read_manifest
    from training import config as C
    from training.secrets import redact_config

    run = MlflowTracker.create(tracking_uri, experiment, run_name, tags={
        "gats.kind": kind, "gats.model": cfg.model.name, "gats.data_root": cfg.data.root, **tags})
    try:
        shown = redact_config(cfg)
        checksum = manifest_checksum(cfg.data.root)
        run.log_params({**C.flatten(shown), "data.manifest_checksum": checksum, **params})
        run.log_text(C.to_yaml(shown), "config.yaml")
        summary = run.log_dataset(cfg.data.root, *read_manifest(cfg.data.root), checksum, context=context)
        run.set_note(run_note(model_title(cfg.model.name, cfg.model.n_patches,
                                         (cfg.model.nested.n_regions, cfg.model.nested.n_patches_per_region)),
                             summary, note))
    except BaseException:
        run.finish("FAILED")
        raise
    return run


def tracker_for(rank: int, tracking_uri: str, run_id: str) -> Tracker:
    """MLflow on rank 0 when there is a run to log to, a NullTracker elsewhere."""
    if rank == 0 and run_id:
        return MlflowTracker(tracking_uri, run_id)
    return NullTracker()


def save_heatmap(path: Path, low: Any, attention: Any, title: str, marks: Sequence[tuple[float, ...]] = ()) -> None:
    """A PNG with two panels: the low-res view (C, h, w) and the attention map (Ha, Wa) over the same extent;
    `marks` (y0, x0, h, w, own) in view pixels outline known objects on both, red where `own` (the label's class),
    cyan otherwise (the paper's Figure 3 marks the digits so)."""
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
        for y0, x0, bh, bw, own in marks:
            ax.add_patch(plt.Rectangle((x0, y0), bw, bh, fill=False, linewidth=0.8,
                                       edgecolor="red" if own else "cyan"))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
