"""The trainable modules of the training job, one per model kind, behind one small protocol (`TrainModule`).

    model = build_model(cfg.model, in_channels, n_classes)     a TrainModule: StreamingATS, MILModule, CNNModule or
                                                               NestedModule
    loss, logits = model(batch, fetcher, class_weights, generator)   the training forward (what DDP wraps)
    model.logits(batch, fetcher, mode, generator)              evaluation: sampled / topk / exact (/ exact_inner for
                                                               nested)
    model.attention_maps(batch, fetcher)                       per image (Ha, Wa) arrays for the heatmaps, or None
    model.explain(batch, fetcher, mode, top_k)                 probabilities, attention and top-k boxes (predict)
    model.core                                                 ATSModel, DeepMIL, CNNBaseline or NestedATSModel:
                                                               what is saved
    KINDS[cfg.model.name].view_scale(cfg.data)                 which pyramid level each kind looks at whole

`StreamingATS` is ATSModel's sampled training forward with the patch reads overlapped by feature computation: it
samples all B images (`ATSModel.plan`), fires every patch server's request at once, runs the feature net on
whichever micro-batch arrives first, and pools with `ATSModel.head`. Why not prefetch the next batch's patches:
they would be sampled from the attention before this step's update and weighed with the attention after it,
which biases the estimator (see loop.py).

Custom nets: `model.plugins` names modules that register nets with `ats_model.nets.register_attention/feature`;
`import_plugins` imports them, in every Ray worker before the model is built and in the driver and evaluation.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ats_model.ats import ATSModel, NoForegroundError, SamplePlan
from ats_model.baselines import CNNBaseline, DeepMIL
from ats_model.contracts import to_unit_float
from ats_model.geometry import cells_to_boxes
from ats_model.nested import topk_positions
from ats_model.nested_model import NestedATSModel, NestedAttention
from ats_model.nets import BandScaled, create_attention, create_feature, initialise
from pipeline.reader import PatchReader
from training import config as C
from training.data import (Batch, DirectFetcher, LowResViews, ServerFetcher, patch_read_args, patch_reader_fn,
                           region_reader_fn, to_device)

Fetcher = DirectFetcher | ServerFetcher


@dataclass(frozen=True, slots=True)
class Explanation:
    """One image's prediction and where the model looked, in level-0 pixels (what predict exports)."""

    probabilities: np.ndarray  # (n_classes,) float64
    attention: np.ndarray | None = None  # (Ha, Wa), None for models without attention
    origin_yx: tuple[float, float] = (0.0, 0.0)  # level-0 centre of cell (0, 0)
    step_yx: tuple[float, float] = (1.0, 1.0)  # level-0 pixels between cell centres
    boxes: np.ndarray | None = None  # (k, 4) level-0 (y0, x0, h, w) of the k most attended cells, rank 1 first
    box_attention: np.ndarray | None = None  # (k,)


class TrainModule(Protocol):
    """What the loop, evaluation, the heatmaps and predict need of a model, whatever its kind."""

    core: nn.Module

    def __call__(self, batch: Batch, fetcher: Fetcher, class_weights: Tensor | None,
                 generator: torch.Generator | None) -> tuple[Tensor, Tensor]: ...
    def logits(self, batch: Batch, fetcher: Fetcher, mode: str, generator: torch.Generator | None) -> Tensor: ...
    def attention_maps(self, batch: Batch, fetcher: Fetcher) -> list[np.ndarray] | None: ...
    def explain(self, batch: Batch, fetcher: Fetcher, mode: str, top_k: int,
                generator: torch.Generator | None) -> Explanation: ...


def _plan(m: ATSModel, batch: Batch, mode: str, generator: torch.Generator | None) -> SamplePlan:
    """m.plan on the batch (masked by foreground when data.min_tissue > 0); a NoForegroundError names the images.
    The model plans in each image's patch frame (batch.frame_scale; data.patch_um_per_px) and the plan's boxes are
    level-0 boxes, as everywhere downstream."""
    try:
        plan = m.plan(batch.low, batch.level0_hw, batch.low_hw, low_scale=batch.frame_scale, mode=mode,
                      generator=generator, **batch.masking)
    except NoForegroundError as exc:
        images = [batch.image_ids[i] for i in exc.rows]
        raise NoForegroundError(f"Images {images[:5]}: {exc}", exc.rows) from None
    return dataclasses.replace(plan, boxes=batch.level0_boxes(plan.boxes))


def _classify(m: ATSModel, plan: SamplePlan, batch: Batch, fetcher: Fetcher) -> Tensor:
    """Read the plan's boxes (blocking) and pool their features: (B, n_classes) logits."""
    read = patch_reader_fn(fetcher, batch, m.config.patch_hw)
    pixels = to_device(read(batch.image_ids, plan.boxes), batch.low.device)  # (B, N, C, P, P)
    return m.head(plan, m.features(pixels)).logits


class StreamingATS(nn.Module):
    """ATS (and U-N): the training forward streams patch reads into the feature net (see the module docstring)."""

    def __init__(self, ats: ATSModel) -> None:
        super().__init__()
        self.ats = ats

    @property
    def core(self) -> ATSModel:
        return self.ats

    def forward(self, batch: Batch, fetcher: Fetcher, class_weights: Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        m = self.ats
        plan = _plan(m, batch, "sampled", generator)
        pending = fetcher.submit(batch.image_ids, plan.boxes.cpu().numpy(),  # every server's request at once
                                 **patch_read_args(batch, m.config.patch_hw))
        positions, parts = [], []
        while pending:
            ready, pending = fetcher.wait_any(pending)
            for p in ready:  # features of whichever micro-batch arrived first
                pixels = to_device(to_unit_float(fetcher.result(p)), batch.low.device)  # (b, N, C, P, P)
                parts.append(m.features(pixels))  # (b, N, D)
                positions += p.positions
        order = torch.argsort(torch.tensor(positions))
        features = torch.cat(parts)[order]  # (B, N, D) in batch order
        out = m.head(plan, features)
        return m.loss(out, batch.labels, class_weights), out.logits

    @torch.no_grad()
    def logits(self, batch: Batch, fetcher: Fetcher, mode: str, generator: torch.Generator | None = None) -> Tensor:
        return _classify(self.ats, _plan(self.ats, batch, mode, generator), batch, fetcher)

    @torch.no_grad()
    def attention_maps(self, batch: Batch, fetcher: Fetcher) -> list[np.ndarray]:
        return list(self.ats.attention_map(batch.low, batch.low_hw, low_scale=batch.frame_scale,
                                           **batch.masking).cpu().numpy())  # (B, Ha, Wa)

    @torch.no_grad()
    def explain(self, batch: Batch, fetcher: Fetcher, mode: str, top_k: int,
                generator: torch.Generator | None = None) -> Explanation:
        """The first image of `batch`: probabilities in `mode`; the unsmoothed attention and its top-k cells' boxes
        (exactly the boxes topk mode reads; top_k 0: n_patches)."""
        m = self.ats
        plan = _plan(m, batch, mode, generator)
        logits = _classify(m, plan, batch, fetcher)  # (B, n_classes)
        attention = (plan.attention[0].reshape(plan.grid_hw) if m.config.smoothing == 0  # what was sampled from
                     else m.attention_map(batch.low, batch.low_hw, low_scale=batch.frame_scale,
                                          **batch.masking)[0])  # (Ha, Wa) unsmoothed
        k = min(top_k or m.config.n_patches, int((attention > 0).sum()))
        top, cells = torch.topk(attention.flatten(), k)  # (k,) each, largest first
        boxes = batch.level0_boxes(cells_to_boxes(cells[None], plan.grid_hw, batch.frame_scale[:1],
                                                  m.config.patch_hw, m.attention_net.grid))[0]  # (k, 4) level-0
        factor, spec = batch.low_scale[0].tolist(), m.attention_net.grid
        return Explanation(_probabilities(logits), attention.cpu().numpy(),
                           tuple(o * f for o, f in zip(spec.offset_yx, factor)),  # type: ignore[arg-type]
                           tuple(s * f for s, f in zip(spec.stride_yx, factor)),  # type: ignore[arg-type]
                           boxes.cpu().numpy(), top.cpu().numpy())


class MILModule(nn.Module):
    """Deep MIL over every grid patch, reading through the same fetchers (blocking reads, chunked by DeepMIL)."""

    def __init__(self, mil: DeepMIL) -> None:
        super().__init__()
        self.mil = mil

    @property
    def core(self) -> DeepMIL:
        return self.mil

    def forward(self, batch: Batch, fetcher: Fetcher, class_weights: Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        logits = self.mil(batch.image_ids, batch.level0_hw, patch_reader_fn(fetcher)).logits
        return F.cross_entropy(logits, batch.labels, weight=class_weights), logits

    @torch.no_grad()
    def logits(self, batch: Batch, fetcher: Fetcher, mode: str, generator: torch.Generator | None = None) -> Tensor:
        return self.mil(batch.image_ids, batch.level0_hw, patch_reader_fn(fetcher)).logits  # deterministic

    @torch.no_grad()
    def attention_maps(self, batch: Batch, fetcher: Fetcher) -> list[np.ndarray]:
        out = self.mil(batch.image_ids, batch.level0_hw, patch_reader_fn(fetcher))
        return [a[: int(g[0]), : int(g[1])].cpu().numpy() for a, g in zip(out.attention, out.grid_hw)]

    @torch.no_grad()
    def explain(self, batch: Batch, fetcher: Fetcher, mode: str, top_k: int,
                generator: torch.Generator | None = None) -> Explanation:
        """The first image of `batch`: its grid attention and top-k grid patches (top_k >= 1); deterministic."""
        mil = self.mil
        out = mil(batch.image_ids[:1], batch.level0_hw[:1], patch_reader_fn(fetcher))
        my, mx = (int(v) for v in out.grid_hw[0])
        attention = out.attention[0, :my, :mx]  # (My, Mx)
        k = min(max(top_k, 1), attention.numel())
        top, cells = torch.topk(attention.flatten(), k)  # row-major, as mil.boxes
        boxes = mil.boxes(tuple(int(v) for v in batch.level0_hw[0]))[0][cells.cpu()]  # (k, 4) level-0
        # cell i spans [i s, i s + P): its centre is at i s + P / 2
        return Explanation(_probabilities(out.logits), attention.cpu().numpy(),
                           tuple(p / 2 for p in mil.patch_hw), tuple(float(v) for v in mil.stride_hw),  # type: ignore
                           boxes.numpy(), top.cpu().numpy())


class CNNModule(nn.Module):
    """The CNN baseline on the whole image at `data.cnn_scale` (its view); reads no patches."""

    def __init__(self, cnn: CNNBaseline) -> None:
        super().__init__()
        self.cnn = cnn

    @property
    def core(self) -> CNNBaseline:
        return self.cnn

    def forward(self, batch: Batch, fetcher: Fetcher, class_weights: Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        logits = self.cnn(batch.low)
        return F.cross_entropy(logits, batch.labels, weight=class_weights), logits

    @torch.no_grad()
    def logits(self, batch: Batch, fetcher: Fetcher, mode: str, generator: torch.Generator | None = None) -> Tensor:
        return self.cnn(batch.low)

    def attention_maps(self, batch: Batch, fetcher: Fetcher) -> None:
        return None

    @torch.no_grad()
    def explain(self, batch: Batch, fetcher: Fetcher, mode: str, top_k: int,
                generator: torch.Generator | None = None) -> Explanation:
        return Explanation(_probabilities(self.cnn(batch.low[:1])))  # no attention to show


class NestedModule(nn.Module):
    """Nested ATS (issue 14): M regions drawn on the coarse view (`batch.low`, the data.low_scale level;
    `batch.low_scale` its exact factor), each distinct drawn region read whole at the fine level through the fetcher
    (`region_reader_fn`: the level whose exact factor is model.nested.fine_downsample), N patches per region read at
    level 0 (`patch_reader_fn`). Reads block (no streaming as in StreamingATS: the fine net needs its regions before
    positions exist). `run_totals` sums what the training forwards report per sample times the batch size
    (regions_per_sample, attention_px_per_sample); the loop logs them per sample at the end of the run."""

    def __init__(self, nested: NestedATSModel) -> None:
        super().__init__()
        self.nested = nested
        self.run_totals = {"regions_per_sample": 0.0, "attention_px_per_sample": 0.0}

    @property
    def core(self) -> NestedATSModel:
        return self.nested

    def _run(self, batch: Batch, fetcher: Fetcher, mode: str, generator: torch.Generator | None):
        return self.nested(batch.low, region_reader_fn(fetcher), patch_reader_fn(fetcher), batch.image_ids,
                           batch.level0_hw, coarse_scale=batch.low_scale, coarse_hw=batch.low_hw, mode=mode,
                           generator=generator)

    def forward(self, batch: Batch, fetcher: Fetcher, class_weights: Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        out = self._run(batch, fetcher, "sampled", generator)
        for name in self.run_totals:
            self.run_totals[name] += float(getattr(out, name)) * len(batch.image_ids)
        return self.nested.loss(out, batch.labels, class_weights), out.logits

    @torch.no_grad()
    def logits(self, batch: Batch, fetcher: Fetcher, mode: str, generator: torch.Generator | None = None) -> Tensor:
        return self._run(batch, fetcher, mode, generator).logits  # sampled | topk | exact_inner | exact

    def _top(self, batch: Batch, fetcher: Fetcher) -> NestedAttention:
        """What topk mode reads, without reading patches (NestedATSModel.attention)."""
        return self.nested.attention(batch.low, region_reader_fn(fetcher), batch.image_ids, batch.level0_hw,
                                     coarse_scale=batch.low_scale, coarse_hw=batch.low_hw)

    @torch.no_grad()
    def attention_maps(self, batch: Batch, fetcher: Fetcher) -> list[np.ndarray]:
        """Per image, on its view's pixels (h, w): the region attention A_r of the region each pixel lies in; inside
        the top-M regions (the ones topk mode reads) the joint attention A_r b^r_p of the fine position the pixel
        lies in, times the region's valid positions (so its mean over the region is still A_r)."""
        layout, top = self.nested.config.layout, self._top(batch, fetcher)
        grid, regions, cells = top.region_grid, top.regions, top.cells
        attention, fine, spec = top.region_attention.double().cpu(), top.fine_attention.double().cpu(), cells.spec
        maps = []
        for i in range(len(batch.image_ids)):
            centres = [(torch.arange(int(n), dtype=torch.float64) + 0.5) * float(f)
                       for n, f in zip(batch.low_hw[i], batch.low_scale[i])]  # level-0 centres of view px (h,), (w,)
            rc = [torch.div(c, r, rounding_mode="floor").long().clamp(max=g - 1)
                  for c, r, g in zip(centres, layout.region_px, grid)]  # region row (h,), column (w,)
            region = rc[0][:, None] * grid[1] + rc[1][None, :]  # (h, w) region id of each view px
            out = attention[i][region]  # (h, w)
            for k in range(regions.regions.shape[1]):
                r = int(regions.regions[i, k])
                if int(regions.targets[i, k]) == 0:
                    continue
                origin = layout.origins(torch.tensor(r), grid).double()  # (2,) level-0
                pos = [((c - o) / layout.downsample + layout.halo - off) / st
                       for c, o, off, st in zip(centres, origin, spec.offset_yx, spec.stride_yx)]  # crop cells
                pos = [(torch.floor(p + 0.5).long() - first).clamp(0, n - 1)
                       for p, first, n in zip(pos, cells.first_yx, cells.hw)]  # (h,), (w,) position row, column
                b = fine[i, k].reshape(cells.hw)  # (Py, Px)
                joint = attention[i, r] * b[pos[0][:, None], pos[1][None, :]] * int((b > 0).sum())  # (h, w)
                out = torch.where(region == r, joint, out)
            maps.append(out.float().numpy())
        return maps

    @torch.no_grad()
    def explain(self, batch: Batch, fetcher: Fetcher, mode: str, top_k: int,
                generator: torch.Generator | None = None) -> Explanation:
        """The first image of `batch`: probabilities in `mode`; the unsmoothed region attention on the region grid
        (cell (i, j) is region (i, j), centred in it); the top_k boxes among those topk mode reads (top M regions,
        top N positions in each), ranked by the joint attention A_r b^r_p (top_k 0: all of them)."""
        one = Batch(batch.image_ids[:1], batch.labels[:1], batch.low[:1], batch.low_hw[:1], batch.level0_hw[:1],
                    batch.low_scale[:1])
        probabilities = _probabilities(self._run(one, fetcher, mode, generator).logits)
        cfg = self.nested.config
        top = self._top(one, fetcher)
        attention, grid, regions, fine, cells = (top.region_attention, top.region_grid, top.regions,
                                                 top.fine_attention, top.cells)
        positions = topk_positions(fine, regions)  # (1, M, L)
        boxes = cells.boxes(cfg.layout, regions.regions, positions.positions, grid, cfg.patch_hw)[0]  # (M, L, 4)
        joint = (attention[0].gather(0, regions.regions[0])[:, None] * fine[0].gather(1, positions.positions[0])
                 * positions.mask()[0])  # (M, L)
        k = min(top_k or joint.numel(), int((joint > 0).sum()))
        top, order = torch.topk(joint.flatten(), k)  # (k,) each, largest first
        return Explanation(probabilities, attention[0].reshape(grid).cpu().numpy(),
                           (cfg.region_px[0] / 2, cfg.region_px[1] / 2),
                           (float(cfg.region_px[0]), float(cfg.region_px[1])),
                           boxes.reshape(-1, 4)[order].cpu().numpy(), top.cpu().numpy())


def _probabilities(logits: Tensor) -> np.ndarray:
    return torch.softmax(logits[0].double(), dim=0).cpu().numpy()  # (n_classes,)


Stats = tuple[Sequence[float], Sequence[float]]


def _scaled(cfg: C.ModelConfig, net: nn.Module, in_channels: int, stats: Stats | None) -> nn.Module:
    """`net` reading band-scaled input when model.band_scaled (stats None: placeholders a checkpoint overwrites)."""
    if not cfg.band_scaled:
        return net
    mean, std = stats if stats is not None else ([0.0] * in_channels, [1.0] * in_channels)
    return BandScaled(net, mean, std)


def _feature(cfg: C.ModelConfig, in_channels: int, stats: Stats | None) -> nn.Module:
    kw: dict[str, Any] = {} if cfg.feature_net == "resnet_small" else {"out_dim": cfg.feature_dim}
    return _scaled(cfg, create_feature(cfg.feature_net, in_channels, **kw), in_channels, stats)


def _ats(cfg: C.ModelConfig, in_channels: int, n_classes: int, stats: Stats | None) -> nn.Module:
    attention = create_attention("uniform" if cfg.name == "uniform" else cfg.attention_net, in_channels)
    return StreamingATS(ATSModel(_scaled(cfg, attention, in_channels, stats), _feature(cfg, in_channels, stats),
                                 n_classes, cfg.ats_config()))


def _nested(cfg: C.ModelConfig, in_channels: int, n_classes: int, stats: Stats | None) -> nn.Module:
    coarse = _scaled(cfg, create_attention(cfg.nested.coarse_net or cfg.attention_net, in_channels), in_channels,
                     stats)
    fine = _scaled(cfg, create_attention(cfg.nested.fine_net or cfg.attention_net, in_channels), in_channels, stats)
    return NestedModule(NestedATSModel(coarse, fine, _feature(cfg, in_channels, stats), n_classes,
                                       cfg.nested_config()))


def _mil(cfg: C.ModelConfig, in_channels: int, n_classes: int, stats: Stats | None) -> nn.Module:
    stride = tuple(cfg.mil_stride or p for p in cfg.patch_hw)
    return MILModule(DeepMIL(_feature(cfg, in_channels, stats), n_classes, cfg.patch_hw, stride, hidden=cfg.mil_hidden))


def _cnn(cfg: C.ModelConfig, in_channels: int, n_classes: int, stats: Stats | None) -> nn.Module:
    return CNNModule(CNNBaseline(in_channels, n_classes, width=cfg.cnn_width, stages=cfg.cnn_stages))


@dataclass(frozen=True, slots=True)
class ModelKind:
    """How to build one model kind, which pyramid level it reads whole, and whether it reads level-0 patches."""

    build: Callable[[C.ModelConfig, int, int, Stats | None], nn.Module]
    view_scale: Callable[[C.DataConfig], float]
    reads_patches: bool = True


KINDS: dict[str, ModelKind] = {
    "ats": ModelKind(_ats, lambda d: d.low_scale),
    "uniform": ModelKind(_ats, lambda d: d.low_scale),
    "deepmil": ModelKind(_mil, lambda d: 1e-9),  # never looks at a view: read the coarsest level, the cheapest
    "cnn": ModelKind(_cnn, lambda d: d.cnn_scale, reads_patches=False),
    "nested": ModelKind(_nested, lambda d: d.low_scale),  # the coarse view; regions and patches through the fetcher
}
assert set(KINDS) == set(C.MODELS), "training.config.MODELS and training.models.KINDS name the same kinds"


def low_res_views(reader: PatchReader, cfg: C.TrainConfig) -> LowResViews:
    """The views a model of cfg.model.name looks at (its kind's view scale), with foreground masks when
    data.min_tissue > 0."""
    return LowResViews(reader, KINDS[cfg.model.name].view_scale(cfg.data), cfg.data.min_tissue,
                       view=cfg.data.view_resolution, patch=cfg.data.patch_resolution)


def build_model(cfg: C.ModelConfig, in_channels: int, n_classes: int,
                band_stats: Stats | None = None) -> TrainModule:
    """The trainable module for `cfg.name` (plugins must be imported first: `import_plugins`). With
    model.band_scaled every net reads its input scaled by `band_stats` (mean, std per band: data.pooled_band_stats of
    the training split); None builds placeholders that loading a checkpoint's state dict overwrites."""
    module = KINDS[cfg.name].build(cfg, in_channels, n_classes, band_stats)
    initialise(module, cfg.init)  # model.init: the layers' starting weights (a checkpoint's state dict overwrites)
    return module  # type: ignore[return-value]


def autocast(device: torch.device, precision: str):
    """The forward's precision context: bf16 autocast for runtime.precision=bf16 (on CUDA, or on a CPU for the
    tests), else a no-op."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def unwrap(model: nn.Module) -> TrainModule:
    """The TrainModule inside a DistributedDataParallel wrapper (the model itself without one)."""
    return getattr(model, "module", model)


def core(model: nn.Module) -> nn.Module:
    """The model without DDP and training wrappers: ATSModel, DeepMIL, CNNBaseline or NestedATSModel (what is saved
    and logged)."""
    return unwrap(model).core


def import_plugins(modules: Sequence[str]) -> None:
    """Import the `model.plugins` modules (they register custom nets); a missing one is a ConfigError naming the fix."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise C.ConfigError(
                f"Cannot import model.plugins module {name!r}: {exc}. Make it importable in every process that "
                "trains: install it (pip install -e .) or keep it in the working directory that `ray job submit "
                "--working-dir .` uploads.") from exc
