"""The attention-sampling model (ATS): look at a low-resolution view, read a few full-resolution patches.

    low-res view (B, C, h, w) -> attention net -> softmax over K cells (optionally smoothed)
      -> sample N cells -> level-0 boxes (geometry) -> read(image_ids, boxes) -> (B, N, C, P, P)
      -> feature net -> expected() -> linear classifier

Compute and memory depend on N and the patch size, not on the image. The U-N baseline is this model with the
"uniform" attention net. Evaluation modes: "sampled" (as trained), "topk" (deterministic, renormalised) and
"exact" (every cell; only where it fits the memory budget).

Foreground masks: given `tissue` (B, h, w), the foreground share of each view pixel (pipeline.masks, resampled to
the view), cells whose patch holds less than `min_tissue` foreground get logit -inf: attention, sampling and the
estimator then run over the allowed cells only (the estimate stays unbiased for the attention-weighted mean over
them), and an image without any allowed cell is a NoForegroundError.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from ats_model.contracts import PatchReadFn, check_attention_net, check_feature_net
from ats_model.estimator import ESTIMATORS, expected, topk_average
from ats_model.geometry import cell_fractions, cells_to_boxes
from ats_model.sampling import sample

MODES = ("sampled", "topk", "exact")  # evaluation modes; training samples


class ExactEvaluationTooLargeError(MemoryError):
    """Exact evaluation would read every cell's patch at once, more than the configured budget."""


class NoForegroundError(ValueError):
    """An image of the batch has fewer attention cells with enough foreground than the draw needs."""

    def __init__(self, message: str, rows: Sequence[int]) -> None:
        super().__init__(message)
        self.rows = tuple(rows)  # batch positions of the images concerned


@dataclass(frozen=True, slots=True)
class ATSConfig:
    n_patches: int = 10
    patch_hw: tuple[int, int] = (50, 50)
    replace: bool = False
    estimator: str = "unordered"  # for replace=False: "unordered" (lower variance) or "ordered"
    baseline: bool = False  # subtract a running mean of the pooled features in the attention gradient
    baseline_momentum: float = 0.9
    smoothing: float = 0.0  # e in a (1 - e) + e / K
    entropy_lambda: float = 0.01
    exact_budget_mb: float = 2048.0

    def __post_init__(self) -> None:
        if self.n_patches < 1:
            raise ValueError(f"Expected n_patches >= 1. Got {self.n_patches}.")
        if len(self.patch_hw) != 2 or min(self.patch_hw) < 1:
            raise ValueError(f"Expected patch_hw = (h, w) with positive sizes. Got {self.patch_hw}.")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"Expected estimator in {ESTIMATORS}. Got {self.estimator!r}.")
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"Expected smoothing in [0, 1). Got {self.smoothing}.")
        if self.entropy_lambda < 0:
            raise ValueError(f"Expected entropy_lambda >= 0. Got {self.entropy_lambda}.")
        if not 0.0 <= self.baseline_momentum < 1.0:
            raise ValueError(f"Expected baseline_momentum in [0, 1). Got {self.baseline_momentum}.")


@dataclass(frozen=True)
class ATSOutput:
    logits: Tensor  # (B, n_classes)
    attention: Tensor  # (B, Ha, Wa) probabilities, as sampled from (smoothed if configured)
    indices: Tensor  # (B, N) flat cell indices, in draw order
    boxes: Tensor  # (B, N, 4) level-0 (y0, x0, h, w)
    entropy: Tensor  # (B,) entropy of the unsmoothed attention, for the regulariser


@dataclass(frozen=True)
class SamplePlan:
    """What `ATSModel.plan` decided: the cells to read and everything `head` needs to pool them."""

    attention: Tensor  # (B, K) probabilities the cells were drawn from (smoothed if configured)
    indices: Tensor  # (B, N) flat cell indices, in draw order
    boxes: Tensor  # (B, N, 4) level-0 (y0, x0, h, w)
    entropy: Tensor  # (B,) entropy of the unsmoothed attention
    grid_hw: tuple[int, int]
    mode: str


def masked_entropy(attention: Tensor, log_attention: Tensor) -> Tensor:
    """-sum a log a over the positions with a > 0; zero-attention (masked) positions contribute 0, not NaN."""
    positive = attention > 0
    safe_log = log_attention.masked_fill(~positive, 0.0)
    return -(attention * safe_log).sum(1)


class ATSModel(nn.Module):
    def __init__(self, attention: nn.Module, feature: nn.Module, n_classes: int, config: ATSConfig = ATSConfig()):
        super().__init__()
        check_attention_net(attention)
        check_feature_net(feature)
        if n_classes < 1:
            raise ValueError(f"Expected n_classes >= 1. Got {n_classes}.")
        self.attention_net = attention
        self.feature_net = feature
        self.classifier = nn.Linear(feature.out_dim, n_classes)
        self.config = config
        # Running mean of the pooled features: the optional constant baseline of the attention gradient.
        self.register_buffer("feature_mean", torch.zeros(feature.out_dim))
        self.register_buffer("feature_mean_steps", torch.zeros((), dtype=torch.long))
        self.channels_last = False  # use_channels_last

    def attention_logits(self, low: Tensor, low_hw: Tensor, *, tissue: Tensor | None = None,
                         min_tissue: float = 0.0, low_scale: Tensor | float | None = None) -> Tensor:
        """(B, C, h, w) -> (B, Ha, Wa) logits; cells whose centre falls outside an image's own low-res size
        (padding in a batch of mixed sizes) are masked with -inf, and with `tissue` (B, h, w) so are the cells whose
        patch holds less than `min_tissue` foreground (`low_scale` as in `plan`, needed then)."""
        logits = self.attention_net(low)  # (B, Ha, Wa)
        if tissue is not None and min_tissue > 0:
            if low_scale is None:
                raise ValueError("Masking cells by tissue needs low_scale, the view's exact level factor.")
            share = cell_fractions(tissue, tuple(logits.shape[-2:]), low_scale, self.config.patch_hw,
                                   self.attention_net.grid)  # (B, Ha, Wa)
            logits = logits.masked_fill(share.to(logits.device) < min_tissue, -math.inf)
        b, ha, wa = logits.shape
        grid = self.attention_net.grid
        # A cell is valid when its whole footprint (centre +- stride/2) lies inside the image's own view: the cells
        # an unpadded view of that image would have produced.
        ys = grid.offset_yx[0] + grid.stride_yx[0] * (torch.arange(ha, device=low.device) + 0.5)  # (Ha,) far edge
        xs = grid.offset_yx[1] + grid.stride_yx[1] * (torch.arange(wa, device=low.device) + 0.5)  # (Wa,)
        hw = low_hw.to(low.device)
        valid = (ys[None, :, None] <= hw[:, 0, None, None]) & (xs[None, None, :] <= hw[:, 1, None, None])
        return logits.masked_fill(~valid, -math.inf)

    def attention_map(self, low: Tensor, low_hw: Tensor | None = None, *, tissue: Tensor | None = None,
                      min_tissue: float = 0.0, low_scale: Tensor | float | None = None) -> Tensor:
        """(B, C, h, w) -> (B, Ha, Wa) attention probabilities (unsmoothed), 0 on masked cells; what heatmaps show."""
        if low_hw is None:
            low_hw = torch.tensor(low.shape[-2:], dtype=torch.long).expand(low.shape[0], 2)
        logits_map = self.attention_logits(low, low_hw, tissue=tissue, min_tissue=min_tissue,
                                           low_scale=low_scale)  # (B, Ha, Wa)
        return torch.softmax(logits_map.flatten(1), dim=1).reshape(logits_map.shape)  # (B, K) -> (B, Ha, Wa)

    def plan(
        self,
        low: Tensor,
        level0_hw: Tensor,
        low_hw: Tensor | None = None,
        *,
        low_scale: Tensor | float | None = None,
        mode: str = "sampled",
        generator: torch.Generator | None = None,
        tissue: Tensor | None = None,
        min_tissue: float = 0.0,
    ) -> SamplePlan:
        """Attention on the low-res view and the cells (and level-0 boxes) to read, for the given mode.

        low (B, C, h, w) float in [0, 1]; level0_hw (B, 2) full-resolution sizes; low_hw (B, 2) each image's own
        low-res size inside the (possibly padded) batch tensor, default the tensor's size; low_scale (B, 2) or a
        number: level-0 pixels per low-res pixel, the view's exact factor (a pyramid level's stored d^l, or the
        factor an in-memory view was pooled with). Without it the factor is taken as level0_hw / low_hw, which is
        exact only when the view's sides divide the image's (otherwise boxes drift toward the far edge).
        tissue (B, h, w) and min_tissue: the foreground mask on the view and the share a cell's patch needs (0: no
        masking); see the module docstring."""
        cfg = self.config
        if mode not in MODES:
            raise ValueError(f"Expected mode in {MODES}. Got {mode!r}.")
        b = low.shape[0]
        if low_hw is None:
            low_hw = torch.tensor(low.shape[-2:], dtype=torch.long).expand(b, 2)
        if low_scale is None:
            low_scale = torch.as_tensor(level0_hw, dtype=torch.float64) / low_hw.to(torch.float64)  # (B, 2)
        logits_map = self.attention_logits(low, low_hw, tissue=tissue, min_tissue=min_tissue,
                                           low_scale=low_scale)  # (B, Ha, Wa)
        grid_hw = tuple(logits_map.shape[-2:])
        logits = logits_map.flatten(1)  # (B, K)
        if tissue is not None and min_tissue > 0:
            self._check_allowed(logits, mode, min_tissue)
        log_attention = torch.log_softmax(logits, dim=1)  # (B, K)
        attention = log_attention.exp()
        entropy = masked_entropy(attention, log_attention)  # (B,)
        if cfg.smoothing > 0:
            valid = torch.isfinite(logits)
            k_valid = valid.sum(1, keepdim=True)  # (B, 1)
            attention = (attention * (1 - cfg.smoothing) + cfg.smoothing / k_valid) * valid
            log_attention = torch.log(attention)  # sample from the smoothed distribution, or the estimate is biased

        n = cfg.n_patches
        if mode == "exact":
            indices = torch.nonzero(torch.ones_like(logits[0], dtype=torch.bool)).flatten().expand(b, -1)
            self._check_exact_budget(low.shape[1], indices.shape[1] * b)
        elif mode == "topk":
            indices = torch.topk(attention.detach(), n, dim=1).indices  # (B, N)
        else:
            indices = sample(log_attention.detach(), n, replace=cfg.replace, generator=generator)  # (B, N)
        boxes = cells_to_boxes(indices, grid_hw, low_scale, cfg.patch_hw, self.attention_net.grid)
        return SamplePlan(attention, indices, boxes, entropy, grid_hw, mode)  # type: ignore[arg-type]

    def features(self, patches: Tensor) -> Tensor:
        """(B, N, C, P, P) pixels -> (B, N, D) L2-normalised features (in channels-last memory after
        `use_channels_last`)."""
        b, n = patches.shape[:2]
        x = patches.flatten(0, 1)  # (B*N, C, P, P)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.feature_net(x)  # (B*N, C, P, P) -> (B*N, D)
        return features.reshape(b, n, -1)  # (B*N, D) -> (B, N, D)

    def use_channels_last(self, enabled: bool = True) -> ATSModel:
        """Run the feature net in channels-last (NHWC) memory: the patches and the conv weights. On CPUs the
        oneDNN convolutions run 1.3-1.5x faster so (docs/benchmarks.md, "Where a CPU step goes"); the values are
        the same up to float rounding. Returns self."""
        self.channels_last = enabled
        self.feature_net.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        return self

    def head(self, plan: SamplePlan, features: Tensor) -> ATSOutput:
        """Pool the planned cells' features (B, N, D) as the plan's mode says, then classify."""
        cfg, attention, indices = self.config, plan.attention, plan.indices
        if plan.mode == "exact":
            pooled = (attention.unsqueeze(-1) * features).sum(1)  # (B, D) = sum_i a_i f_i
        elif plan.mode == "topk":
            pooled = topk_average(attention, indices, features)  # (B, D)
        else:
            mu = self.feature_mean if cfg.baseline and int(self.feature_mean_steps) > 0 else None
            pooled = expected(attention, indices, features, replace=cfg.replace, estimator=cfg.estimator, baseline=mu)
            if cfg.baseline and self.training:
                self._update_feature_mean(pooled.detach())  # after use: mu never depends on the current sample
        logits_out = self.classifier(pooled)  # (B, n_classes)
        b = attention.shape[0]
        return ATSOutput(logits_out, attention.reshape(b, *plan.grid_hw), indices, plan.boxes, plan.entropy)

    def forward(
        self,
        low: Tensor,
        read: PatchReadFn,
        image_ids: Sequence,
        level0_hw: Tensor,
        low_hw: Tensor | None = None,
        *,
        low_scale: Tensor | float | None = None,
        mode: str = "sampled",
        generator: torch.Generator | None = None,
        tissue: Tensor | None = None,
        min_tissue: float = 0.0,
    ) -> ATSOutput:
        """plan (attention, cells, boxes) -> read the boxes -> features -> head. Arguments as in `plan`."""
        plan = self.plan(low, level0_hw, low_hw, low_scale=low_scale, mode=mode, generator=generator, tissue=tissue,
                         min_tissue=min_tissue)
        patches = read(image_ids, plan.boxes).to(low.device)  # (B, N, C, P, P)
        return self.head(plan, self.features(patches))

    def loss(self, out: ATSOutput, targets: Tensor, class_weights: Tensor | None = None) -> Tensor:
        """Cross-entropy minus the entropy regulariser (paper Eq. 21)."""
        ce = nn.functional.cross_entropy(out.logits, targets, weight=class_weights)
        return ce - self.config.entropy_lambda * out.entropy.mean()

    @torch.no_grad()
    def _update_feature_mean(self, pooled: Tensor) -> None:
        m = self.config.baseline_momentum if int(self.feature_mean_steps) > 0 else 0.0
        self.feature_mean.mul_(m).add_(pooled.mean(0), alpha=1 - m)  # (D,)
        self.feature_mean_steps += 1

    def _check_allowed(self, logits: Tensor, mode: str, min_tissue: float) -> None:
        """Every image needs an allowed cell, and as many as the draw takes when it samples without replacement."""
        needed = self.config.n_patches if mode == "sampled" and not self.config.replace else 1
        allowed = torch.isfinite(logits).sum(1)  # (B,)
        rows = [int(i) for i in torch.nonzero(allowed < needed).flatten()]
        if rows:
            fewest = int(allowed[rows].min())
            raise NoForegroundError(
                f"{len(rows)} image(s) of the batch have {fewest} attention cell(s) whose patch holds >= "
                f"{min_tissue:g} foreground, and the draw needs {needed}. Lower data.min_tissue, lower "
                "model.n_patches, use model.replace=true, or leave images with so little tissue out.", rows)

    def _check_exact_budget(self, channels: int, n_patches: int) -> None:
        h, w = self.config.patch_hw
        needed_mb = n_patches * channels * h * w * 4 / 2**20
        if needed_mb > self.config.exact_budget_mb:
            raise ExactEvaluationTooLargeError(
                f"Exact evaluation needs {n_patches} patches ({needed_mb:.0f} MB of pixels), over the budget of "
                f"{self.config.exact_budget_mb:.0f} MB. Use mode='topk' or 'sampled', a smaller batch, or raise "
                f"ATSConfig.exact_budget_mb."
            )
