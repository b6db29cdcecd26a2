"""Predict with a trained model on ingested images (a manifest split) or on image files: the library behind
jobs/predict.py.

    report = predict("path/to/checkpoint_x" | RUN_ID, "out/", data=ROOT, options=PredictOptions(split="test"))
    report = predict(model, "out/", images=["slide.svs", "tiles/"])      ingested first into out/pyramids

Writes into OUT, each file under a temporary name and renamed when complete:
    predictions.parquet          image_id, source, predicted, prob_<class>..., label, mode, model (once, at the end)
    geojson/<image_id>.geojson   top-K attention boxes + attention-mass contours, level-0 px (pipeline.exports)
    heatmaps/<image_id>.png      the low-res view with the attention overlaid
    heatmaps/<image_id>.zarr     the attention as an OME-NGFF 0.5 image placed over the slide

Cost per image (ats/uniform): the low-res view, the attention net, and N (sampled/topk) patch reads; never the whole
slide. Deep MIL reads its whole grid by construction (its attention is exported on that grid); the CNN has no
attention, so it gets predictions only. Bad input raises before anything is written: `PredictInputError` (model,
split, source list), pipeline.exports.OutputFolderError (out folder) or training.checkpoint.CheckpointError;
a bad image becomes an `ImageFailure` and the others go on. Progress is reported through callbacks; nothing draws.
"""
from __future__ import annotations

import io
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ats_model.ats import MODES, ExactEvaluationTooLargeError
from pipeline import exports
from pipeline.exports import DEFAULT_MASSES, AttentionGrid, check_output_folder
from pipeline.ingest import DEFAULT_LABEL
from pipeline.manifest import ManifestRow
from training import checkpoint
from training import config as C
from training.data import DirectFetcher, Example, LowResViews
from training.models import TrainModule, low_res_views
from training.secrets import redact

log = logging.getLogger("gats.predict")
PREDICTIONS_FILE = "predictions.parquet"
SPLIT_ALL = "all"
NO_LABEL = ("", DEFAULT_LABEL)  # manifest labels that mean "not known"


class PredictInputError(ValueError):
    """The model, data, sources or out folder given cannot be used; the message names the fix. Nothing was written."""


class SplitNotFoundError(PredictInputError):
    """The manifest has no image in the requested split."""


@dataclass(frozen=True, slots=True)
class PredictOptions:
    """How to predict; the single definition of the defaults. mode: sampled | topk | exact (ATSModel's evaluation
    modes). top_k: attention boxes exported per image (0: the model's n_patches). split: a manifest split or "all".
    masses: attention-mass levels drawn as contours. force: write into a non-empty out folder. seed: sampled mode.
    mask, nodata: the foreground mask that images given as files get at ingest (pipeline.masks; a model trained with
    data.min_tissue > 0 needs one). mpp: micrometres per pixel of files that record none (a model trained with
    data.patch_um_per_px or view_um_per_px needs each image's resolution)."""

    mode: str = "topk"
    top_k: int = 0
    split: str = "test"
    masses: tuple[float, ...] = DEFAULT_MASSES
    force: bool = False
    seed: int = 0
    mask: str | None = None
    nodata: float | None = None
    mpp: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise PredictInputError(f"Expected mode in {MODES}. Got {self.mode!r}: pass --mode topk.")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise PredictInputError(f"Expected top_k an integer >= 0 (0: the model's n_patches). Got {self.top_k!r}.")
        if not self.masses or not all(0 < m < 1 for m in self.masses):
            raise PredictInputError(f"Expected attention masses in (0, 1). Got {self.masses}: e.g. 0.5 0.9.")


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A trained model ready to predict: the module (eval mode), its config, class order and a printable name."""

    module: TrainModule
    config: C.TrainConfig
    classes: tuple[str, ...]
    in_channels: int
    name: str  # the run id or the checkpoint folder, credentials redacted


@dataclass(frozen=True, slots=True)
class ImagePrediction:
    """One image's answer and the files written for it."""

    image_id: str
    source: str
    predicted: str
    probabilities: tuple[float, ...]  # in the model's class order
    label: str | None
    seconds: float  # view + attention + patch reads + nets (exports excluded)
    outputs: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ImageFailure:
    """An image that got no prediction, and why."""

    image_id: str
    source: str
    reason: str


@dataclass(frozen=True, slots=True)
class PredictReport:
    """What one prediction run did; `ok` when every image got a prediction."""

    out: str
    model: str
    mode: str
    classes: tuple[str, ...]
    predictions: tuple[ImagePrediction, ...]
    failures: tuple[ImageFailure, ...]
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.failures and bool(self.predictions)

    def summary(self) -> str:
        """A few lines for a person: counts, where the outputs are, notes, one line per failed image naming why."""
        n = len(self.predictions) + len(self.failures)
        lines = [f"{len(self.predictions)}/{n} images predicted ({self.mode}) with {self.model} into {self.out}"]
        lines += [f"note: {note}" for note in self.notes]
        if self.failures:
            lines.append(f"{len(self.failures)} failed:")
            lines += [f"  {f.image_id} ({f.source}): {f.reason}" for f in self.failures]
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class _Inference:
    probabilities: np.ndarray  # (n_classes,)
    view: np.ndarray  # (C, h, w) float32 in [0, 1]
    view_factor: tuple[float, float]
    grid: AttentionGrid | None = None
    boxes: np.ndarray | None = None  # (K, 4) top-K level-0 boxes, rank 1 first
    box_attention: np.ndarray | None = None  # (K,)


# --- inputs ----------------------------------------------------------------------------------------------------------

def load_model(ref: str, tracking_uri: str | None = None) -> LoadedModel:
    """A checkpoint folder (when `ref` is an existing folder) or the `model/` checkpoint of an MLflow run."""
    if Path(ref).is_dir():
        module, ckpt = checkpoint.load_model(ref)  # CheckpointError for a folder that is not one
        name = redact(str(Path(ref).resolve()))
    else:
        from training.tracking import default_tracking_uri

        module, ckpt = checkpoint.load_model_from_run(ref, tracking_uri or default_tracking_uri())
        name = redact(ref)
    module.eval()  # type: ignore[attr-defined]
    return LoadedModel(module, ckpt.config, tuple(ckpt.classes), ckpt.in_channels, name)


def manifest_rows(root: str, split: str) -> list[ManifestRow]:
    """The manifest rows of `split` ("all": every split), failed ones included (they become failures)."""
    from pipeline.errors import ImageNotFoundError
    from pipeline.manifest import read_manifest

    try:
        rows, _ = read_manifest(root)
    except ImageNotFoundError as exc:
        raise PredictInputError(str(exc)) from None
    chosen = rows if split == SPLIT_ALL else [r for r in rows if r.split == split]
    if not chosen:
        present = ", ".join(sorted({r.split for r in rows})) or "none"
        raise SplitNotFoundError(f"No images in split {split!r} of {redact(root)} (splits there: {present}): pass "
                                 f"--split with one of them, or --split {SPLIT_ALL}.")
    return chosen


# --- inference -------------------------------------------------------------------------------------------------------

def _infer(loaded: LoadedModel, views: LowResViews, fetcher: DirectFetcher, row: ManifestRow,
           options: PredictOptions, generator: torch.Generator) -> _Inference:
    """One image: its view, the model's class probabilities and, where the model has attention, the attention grid and
    its top-K level-0 boxes (for ATS exactly the boxes topk mode reads): `TrainModule.explain`, whatever the kind."""
    batch = views.batch([Example(row.image_id, -1, int(row.height), int(row.width), int(row.channels))])
    view, factor = batch.low[0].numpy(), tuple(float(f) for f in batch.low_scale[0])
    top_k = options.top_k or loaded.config.model.n_patches
    e = loaded.module.explain(batch, fetcher, options.mode, top_k, generator)
    if e.attention is None:
        return _Inference(e.probabilities, view, factor)
    grid = AttentionGrid(e.attention, e.origin_yx, e.step_yx)
    return _Inference(e.probabilities, view, factor, grid, e.boxes, e.box_attention)


def save_overlay(path: Path, view: np.ndarray, factor_yx: tuple[float, float], level0_hw: tuple[int, int],
                 grid: AttentionGrid, boxes: np.ndarray, title: str) -> Path:
    """A PNG of the low-res view (C, h, w) with the attention overlaid and the top-K boxes outlined, axes in level-0
    pixels, a colour bar; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    image = view.mean(0) if view.shape[0] != 3 else view.transpose(1, 2, 0)  # (h, w) or (h, w, 3)
    (h, w), (fy, fx), (h0, w0) = view.shape[1:], factor_yx, level0_hw
    fig, ax = plt.subplots(figsize=(5.5, max(2.5, min(9.0, 4.5 * h0 / w0))), dpi=100)
    ax.imshow(image, cmap="gray", extent=(0, w * fx, h * fy, 0), interpolation="nearest", vmin=0, vmax=1)
    shown_values = np.ma.masked_less(grid.values, 0.01 * grid.values.max())  # near-zero attention: the view shows
    shown = ax.imshow(shown_values, cmap="inferno", alpha=0.6, extent=grid.extent_xy(), interpolation="nearest",
                      vmin=0, vmax=grid.values.max())
    for y0, x0, bh, bw in np.asarray(boxes).reshape(-1, 4):
        ax.add_patch(Rectangle((x0, y0), bw, bh, fill=False, edgecolor="cyan", linewidth=0.8))
    ax.set_xlim(0, w0)
    ax.set_ylim(h0, 0)
    ax.set_xlabel("x (level-0 px)", fontsize=8)
    ax.set_ylabel("y (level-0 px)", fontsize=8)
    ax.tick_params(labelsize=7)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04).set_label("attention", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")  # tick labels and axis titles never clipped
    plt.close(fig)
    return exports.write_atomic(path, buf.getvalue())


def _export(out: Path, row: ManifestRow, inf: _Inference, predicted: str, prob: float, options: PredictOptions,
            loaded: LoadedModel, mpp: float | None) -> tuple[str, ...]:
    if inf.grid is None:
        return ()
    image_id = row.image_id
    paths = [exports.write_geojson(out / "geojson" / f"{image_id}.geojson", inf.grid, inf.boxes, inf.box_attention,
                                   options.masses),
             save_overlay(out / "heatmaps" / f"{image_id}.png", inf.view, inf.view_factor,
                          (int(row.height), int(row.width)), inf.grid, inf.boxes,
                          f"{image_id}: {predicted} (p = {prob:.3f})"),
             exports.write_attention_zarr(out / "heatmaps" / f"{image_id}.zarr", inf.grid, name=image_id, mpp=mpp,
                                          extra_attrs={"model": loaded.name, "mode": options.mode,
                                                       "predicted": predicted})]
    return tuple(str(p) for p in paths)


# --- the run ---------------------------------------------------------------------------------------------------------

def predict(model: str | LoadedModel, out: str | os.PathLike[str], *, data: str | None = None,
            images: Sequence[str] = (), options: PredictOptions = PredictOptions(), tracking_uri: str | None = None,
            on_start: Callable[[int], None] | None = None,
            on_image: Callable[[ImagePrediction | ImageFailure], None] | None = None,
            on_ingest_start: Callable[[int], None] | None = None,
            on_ingest_image: Callable[[object], None] | None = None) -> PredictReport:
    """Predict every image of `data`'s split, or of `images` (ingested into OUT/pyramids first), into OUT."""
    if (data is None) == (not images):
        raise PredictInputError("Give either data=ROOT (--data) or images=[files or folders] (--images), not both.")
    out_dir = check_output_folder(out, options.force)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, tracking_uri)
    if data is not None:
        root, rows = data, manifest_rows(data, options.split)
    else:
        from pipeline.errors import PipelineError
        from pipeline.ingest import source_tasks

        root, rows = str(out_dir / "pyramids"), []
        try:
            tasks = source_tasks([str(i) for i in images], label=DEFAULT_LABEL, split="test", fill=None)
        except PipelineError as exc:  # a bad folder or CSV header, a missing CSV
            raise PredictInputError(str(exc)) from None
        write = _ingest_options(loaded, options)
    out_dir.mkdir(parents=True, exist_ok=True)  # every input checked: from here on, only per-image failures
    if data is None:
        from pipeline.ingest import run_ingest

        classes = sorted({t.label for t in tasks if t.error is None and t.label})
        report = run_ingest(root, tasks, classes, options=write,
                            on_start=on_ingest_start, on_image=on_ingest_image)
        rows = [o.row for o in report.outcomes]
    return _predict_rows(loaded, root, rows, out_dir, options, on_start, on_image)


def _ingest_options(loaded: LoadedModel, options: PredictOptions):
    """How files given to predict are ingested; PredictInputError when the model needs masks and none is asked for."""
    from pipeline.ingest import WriteOptions

    if loaded.config.data.min_tissue > 0 and options.mask is None:
        raise PredictInputError(
            f"The model samples only cells whose patch is >= {loaded.config.data.min_tissue:g} foreground "
            "(data.min_tissue), so the images need masks: pass --mask tissue (H&E), --mask nodata --nodata VALUE "
            "or --mask alpha (rasters).")
    try:
        return WriteOptions(min_size=8, patch_size=1, mask=options.mask, nodata=options.nodata, mpp=options.mpp)
    except ValueError as exc:
        raise PredictInputError(str(exc)) from None


def _predict_rows(loaded: LoadedModel, root: str, rows: Sequence[ManifestRow], out: Path, options: PredictOptions,
                  on_start: Callable[[int], None] | None,
                  on_image: Callable[[ImagePrediction | ImageFailure], None] | None) -> PredictReport:
    from pipeline.reader import PatchReader

    def done(result: ImagePrediction | ImageFailure) -> None:
        (predictions if isinstance(result, ImagePrediction) else failures).append(result)
        if on_image is not None:
            on_image(result)

    kind, classes = loaded.config.model.name, loaded.classes
    reader = PatchReader(root)
    views, fetcher = low_res_views(reader, loaded.config), DirectFetcher(reader)
    generator = torch.Generator().manual_seed(options.seed)
    predictions: list[ImagePrediction] = []
    failures: list[ImageFailure] = []
    if on_start is not None:
        on_start(len(rows))
    try:
        for row in rows:
            if row.status != "complete":
                done(ImageFailure(row.image_id, redact(row.source), f"not ingested: {row.error}"))
                continue
            if row.channels != loaded.in_channels:
                done(ImageFailure(row.image_id, redact(row.source), f"the image has {row.channels} channels and the "
                                  f"model expects {loaded.in_channels}: use a model trained on such images."))
                continue
            try:
                start = time.perf_counter()
                inf = _infer(loaded, views, fetcher, row, options, generator)
                seconds = time.perf_counter() - start
                best = int(np.argmax(inf.probabilities))
                outputs = _export(out, row, inf, classes[best], float(inf.probabilities[best]), options, loaded,
                                  reader.info(row.image_id).mpp)
                label = None if row.label in NO_LABEL else row.label
                done(ImagePrediction(row.image_id, redact(row.source), classes[best],
                                     tuple(map(float, inf.probabilities)), label, seconds, outputs))
            except ExactEvaluationTooLargeError as exc:  # a MemoryError subclass that names its fix
                done(ImageFailure(row.image_id, redact(row.source), str(exc)))
            except MemoryError:
                raise  # the machine, not this image
            except Exception as exc:  # one unreadable image must not stop the others; it is named in the summary
                log.warning("%s failed: %s: %s", row.image_id, type(exc).__name__, exc)
                done(ImageFailure(row.image_id, redact(row.source), redact(f"{type(exc).__name__}: {exc}")))
            finally:
                views.cache.pop(row.image_id, None)  # one view at a time in memory
    finally:
        fetcher.close()
    exports.write_predictions(out / PREDICTIONS_FILE, [
        {"image_id": p.image_id, "source": p.source, "predicted": p.predicted, "probabilities": p.probabilities,
         "label": p.label} for p in predictions], classes, mode=options.mode, model=loaded.name)
    notes = () if kind in ("ats", "uniform", "deepmil", "nested") else (
        f"the {kind} model has no attention: predictions only, no GeoJSON or heatmaps.",)
    return PredictReport(str(out), loaded.name, options.mode, classes, tuple(predictions), tuple(failures), notes)
