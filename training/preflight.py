"""Checks a training config against its data before Ray starts or an MLflow run exists (jobs/train.py runs them).

Each failure is one `ConfigError` whose message names the fix; the entry point prints it and exits 2, in about a
second, instead of failing inside a Ray worker after a FAILED run has been created. What is checked:

- the data ROOT holds a readable manifest;
- the train and test splits hold complete images (when every row of a split failed, the first errors are quoted),
  and each of them still has its pyramid under ROOT/images (one listing, not one request per image);
- the patch fits the images (`model.patch_hw` no larger than the smallest image; `data.allow_padding` allows it);
- without replacement (or with `runtime.eval_mode=topk`), `model.n_patches` does not exceed the attention cells of
  the smallest low-res view;
- nested model: `model.nested.fine_downsample` is the exact factor of a level of every image's pyramid, a region is
  whole store chunks of that level (the chunk of the first image's pyramid: one metadata read), and without
  `outer_replace` `model.nested.n_regions` does not exceed the drawable regions of the smallest image (the model's
  own masks on a blank coarse view: regions inside the image, seen by a coarse cell, with a valid position);
- with `model.band_scaled`, every training image has per-band statistics in the manifest;
- with `data.min_tissue` > 0, every image used has a stored foreground mask (the manifest's tissue_fraction);
- with `data.view_um_per_px` / `data.patch_um_per_px` (or the m_per_px forms), every image used has a resolution
  (the manifest's mpp) that serves them: patches are never enlarged (pipeline.resolution);
- a resume target is a complete, safely loadable checkpoint with epochs left to train.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from training import config as C
from training.secrets import redact


def preflight(cfg: C.TrainConfig) -> None:
    """Raise ConfigError naming the fix when `cfg` cannot train on its data (see the module docstring)."""
    rows, _ = _manifest(cfg.data.root)
    train = _complete(rows, cfg.data.train_split, cfg.data.root)
    used = train + _complete(rows, cfg.data.test_split, cfg.data.root)
    _check_pyramids_exist(used, cfg.data.root)
    from training.models import KINDS

    kind = KINDS[cfg.model.name]
    scales = _check_resolution(used, cfg.data) if cfg.data.view_resolution or cfg.data.patch_resolution else {}
    if kind.reads_patches and not cfg.data.allow_padding:
        _check_patch_fits(used, cfg.model.patch_hw, scales)
    if cfg.model.name == "nested":
        _check_nested(used, cfg, kind.view_scale(cfg.data))
    elif cfg.model.name in C.SAMPLED_MODELS and (not cfg.model.replace or cfg.runtime.eval_mode == "topk"):
        _check_cells(used, cfg, kind.view_scale(cfg.data))
    if cfg.model.band_scaled:
        _check_band_stats(train, cfg.data.root)
    if cfg.data.min_tissue > 0:
        _check_masks(used, cfg.data.root)
    if cfg.runtime.resume_from:
        _check_resume(cfg.runtime.resume_from, cfg.optim.epochs)


def _check_band_stats(train: Sequence, root: str) -> None:
    """The training split's complete rows (ManifestRows serve as Examples) have poolable band statistics."""
    from training.data import pooled_band_stats

    try:
        pooled_band_stats(train, root)
    except ValueError as exc:
        raise C.ConfigError(redact(str(exc))) from None


def _check_masks(rows: Sequence, root: str) -> None:
    """data.min_tissue > 0 needs a stored foreground mask (the manifest's tissue_fraction) on every image used."""
    missing = [r.image_id for r in rows if r.tissue_fraction is None]
    if missing:
        raise C.ConfigError(
            f"data.min_tissue > 0 masks attention by foreground, but {len(missing)} image(s) of --data "
            f"{redact(root)} have no stored mask (e.g. {missing[:3]}). Re-ingest them with jobs/ingest.py --mask "
            "tissue (H&E), --mask nodata --nodata VALUE or --mask alpha (rasters), or --mask-dir DIR, plus --force; "
            "or set data.min_tissue=0.")


def _manifest(root: str):
    from pipeline.errors import PipelineError
    from pipeline.manifest import read_manifest

    try:
        return read_manifest(root)
    except (PipelineError, OSError, ValueError, KeyError) as exc:
        raise C.ConfigError(f"Cannot read the manifest of --data {redact(root)} ({type(exc).__name__}: "
                            f"{redact(str(exc))}). Make one with jobs/ingest.py --out ROOT, or check the path "
                            "(and AWS_ENDPOINT_URL for s3://).") from None


def _complete(rows: Sequence, split: str, root: str) -> list:
    in_split = [r for r in rows if r.split == split]
    complete = [r for r in in_split if r.status == "complete"]
    if complete:
        return complete
    if in_split:
        errors = "; ".join(f"{r.image_id}: {r.error}" for r in in_split[:3])
        raise C.ConfigError(f"Every one of the {len(in_split)} images of split {split!r} in {redact(root)} failed to "
                            f"ingest (first: {errors}). Fix or drop those sources and re-run jobs/ingest.py.")
    splits = sorted({r.split for r in rows})
    raise C.ConfigError(f"No images in split {split!r} of {redact(root)} (its splits: {', '.join(splits) or 'none'}). "
                        "Set data.train_split / data.test_split to one of those, or ingest that split.")


def _check_pyramids_exist(rows: Sequence, root: str) -> None:
    from pipeline.errors import PipelineError
    from pipeline.storage import IMAGES_DIR, Storage

    try:
        stored = set(Storage(root).listdir(IMAGES_DIR))
    except (PipelineError, OSError) as exc:
        raise C.ConfigError(f"Cannot list {redact(root)}/{IMAGES_DIR} ({type(exc).__name__}: {redact(str(exc))}). "
                            "Check the path (and AWS_ENDPOINT_URL for s3://).") from None
    missing = [r.image_id for r in rows if f"{r.image_id}.zarr" not in stored]
    if missing:
        raise C.ConfigError(
            f"{len(missing)} images marked complete in the manifest of {redact(root)} have no pyramid under "
            f"{IMAGES_DIR}/ (first: {', '.join(missing[:3])}): they were deleted or moved after ingest. Re-run "
            "jobs/ingest.py with the same sources (it rewrites only what is missing), or `gats-verify ROOT --repair` "
            "to mark them failed and train without them.")


def _check_resolution(rows: Sequence, data: C.DataConfig) -> dict[str, float]:
    """data.view_um_per_px / patch_um_per_px: every image used has a resolution (manifest mpp) that serves them
    (pipeline.resolution, as LowResViews); each image's patch scale (level-0 px per patch px), 1 without."""
    from pipeline import resolution
    from pipeline.errors import ResolutionError

    view, patch = data.view_resolution, data.patch_resolution
    scales = {}
    try:
        for row in rows:
            if view:
                resolution.require_mpp(row.mpp, row.image_id, view.knob)
            scales[row.image_id] = resolution.patch_scale(row.mpp, patch, row.image_id) if patch else 1.0
    except ResolutionError as exc:
        raise C.ConfigError(redact(str(exc))) from None
    return scales


def _check_patch_fits(rows: Sequence, patch_hw: tuple[int, int], scales: dict[str, float]) -> None:
    """The patch (model.patch_hw pixels of the patch frame: scales[image] level-0 px each) fits every image."""
    small = min(rows, key=lambda r: min(r.height, r.width) / scales.get(r.image_id, 1.0))
    scale = scales.get(small.image_id, 1.0)
    if patch_hw[0] * scale > small.height or patch_hw[1] * scale > small.width:
        at = f" at data.patch_um_per_px ({scale:g} level-0 px per patch px)" if scale != 1.0 else ""
        raise C.ConfigError(
            f"model.patch_hw={list(patch_hw)}{at} is larger than image {small.image_id} ({small.height}x{small.width} "
            "px): its patches would be mostly fill. Lower model.patch_hw, or set data.allow_padding=true to train "
            "anyway.")


def _view_hw(row, scale: float, data: C.DataConfig | None = None) -> tuple[int, int, tuple[float, float]]:
    """(h, w, factor) of the pyramid level a view reads, as LowResViews picks it: nearest `scale`, or nearest
    data.view_um_per_px when set."""
    from pipeline import resolution

    view = data.view_resolution if data else None
    level = (resolution.view_level(row.downsamples, row.mpp, view, row.image_id) if view
             else resolution.nearest_level(row.downsamples, scale))
    fy, fx = row.downsamples[level]
    return math.ceil(row.height / fy - 1e-9), math.ceil(row.width / fx - 1e-9), (float(fy), float(fx))


def _check_nested(rows: Sequence, cfg: C.TrainConfig, scale: float) -> None:
    from pipeline.errors import PipelineError
    from pipeline.pyramid import open_pyramid
    from pipeline.reader import level_for_factor

    nested = cfg.model.nested
    for row in rows:
        try:
            level_for_factor(row.downsamples, nested.fine_downsample, row.image_id)
        except ValueError as exc:
            raise C.ConfigError(f"model.nested.fine_downsample={nested.fine_downsample}: {exc}") from None
    try:
        chunk = open_pyramid(cfg.data.root, rows[0].image_id).info.chunk
    except (PipelineError, OSError) as exc:
        raise C.ConfigError(f"Cannot open the pyramid of {rows[0].image_id} under {redact(cfg.data.root)} "
                            f"({type(exc).__name__}: {redact(str(exc))}). Check the path, or re-run jobs/ingest.py."
                            ) from None
    layout = cfg.model.nested_config().layout
    try:
        layout.check_chunk_aligned(chunk)
    except ValueError as exc:
        raise C.ConfigError(f"model.nested.region_px={list(nested.region_px)}: {exc} Set model.nested.region_px to "
                            f"a multiple of {nested.fine_downsample * chunk}.") from None
    if nested.outer_replace:
        return
    row = min(rows, key=lambda r: r.height * r.width)
    regions = _drawable_regions(cfg.model, row, scale)
    if nested.n_regions > regions:
        raise C.ConfigError(
            f"model.nested.n_regions={nested.n_regions} but the smallest image ({row.image_id}, {row.height}x"
            f"{row.width} px) has {regions} drawable regions of {list(nested.region_px)} level-0 px (seen by the "
            f"coarse view at data.low_scale={cfg.data.low_scale}), and sampling without replacement draws distinct "
            f"regions. Lower model.nested.n_regions to <= {regions}, use a smaller model.nested.region_px, or set "
            "model.nested.outer_replace=true.")


def _drawable_regions(model: C.ModelConfig, row, scale: float) -> int:
    """The regions NestedATSModel leaves unmasked for this image: its region logits on a blank coarse view."""
    from training.models import build_model

    h, w, factor = _view_hw(row, scale)
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # building the nets draws weights: keep the RNG
        nested = build_model(model, int(row.channels), 2).core
        view = torch.zeros(1, int(row.channels), h, w)  # (1, C, h, w)
        try:
            cells = nested.region_cells(view)
            logits, _ = nested.region_logits(view, torch.tensor([[row.height, row.width]]),
                                             torch.tensor([factor], dtype=torch.float64), torch.tensor([[h, w]]),
                                             cells)  # (1, R)
        except ValueError as exc:  # a net's "view too small", a region without a fine cell
            raise C.ConfigError(f"model.nested: {exc}") from None
    return int(torch.isfinite(logits).sum())


def _check_cells(rows: Sequence, cfg: C.TrainConfig, scale: float) -> None:
    """n_patches against the attention cells of the smallest view (the net run once on zeros of that size)."""
    row = min(rows, key=lambda r: math.prod(_view_hw(r, scale, cfg.data)[:2]))
    h, w, _ = _view_hw(row, scale, cfg.data)
    cells = _attention_cells(cfg.model, int(row.channels), h, w)
    if cfg.model.n_patches > cells:
        why = "topk evaluation reads" if cfg.model.replace else "sampling without replacement draws"
        view = cfg.data.view_resolution
        at, finer = ((view.setting(view.mpp), f"lower {view.knob}") if view
                     else (f"data.low_scale={cfg.data.low_scale}", "raise data.low_scale"))
        raise C.ConfigError(
            f"model.n_patches={cfg.model.n_patches} but the smallest view ({row.image_id}, {h}x{w} px at {at}) has "
            f"{cells} attention cells, and {why} distinct cells. Lower model.n_patches to <= {cells}, {finer}, or "
            "use model.replace=true with a sampled runtime.eval_mode.")


def _attention_cells(model: C.ModelConfig, channels: int, h: int, w: int) -> int:
    from ats_model.nets import create_attention

    with torch.random.fork_rng(devices=[]), torch.no_grad():  # building a net draws weights: leave the RNG as it was
        net = create_attention("uniform" if model.name == "uniform" else model.attention_net, channels)
        try:
            return int(net(torch.zeros(1, channels, h, w)).shape[-2:].numel())
        except ValueError as exc:  # the net's own "view too small" message
            raise C.ConfigError(f"{exc}") from None


def _check_resume(folder: str, epochs: int) -> None:
    from training import checkpoint

    try:
        state = checkpoint.load_state(folder)
    except checkpoint.CheckpointError as exc:
        raise C.ConfigError(str(exc)) from None
    done = int(state["epoch"])
    if done >= epochs:
        raise C.ConfigError(f"--resume {redact(folder)} has already trained {done} epochs and optim.epochs is "
                            f"{epochs}: nothing is left to train. Raise --epochs above {done}.")
