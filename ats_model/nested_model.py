"""NestedATSModel: coarse attention picks regions, fine attention inside each drawn region picks patches.

    coarse view (B, C, hc, wc) -> coarse net -> cell logits -> log-sum-exp per region -> A over R regions
      -> draw M regions (nested.draw_regions) -> read_regions(distinct drawn regions, halo) at the fine level
      -> fine net, once per distinct (image, region), batched (U, C, h, w) -> halo cropped back -> b per region
      -> draw N positions per slot (nested.draw_positions) -> level-0 boxes (geometry.RegionCells)
      -> read_patches (PatchReadFn) -> feature net -> nested_expected -> linear classifier

Pixels are read only through the two callbacks (the pipeline owns I/O): `RegionReadFn` returns fine-level crops of
regions, `PatchReadFn` (contracts.py) level-0 patches. Memory depends on M, N, the region and the patch size, not on
the image. Evaluation modes as in nested.py: "sampled" (optionally the mean of `n_draws` independent draws),
"topk", "exact_inner" and "exact" (the last two check `exact_budget_mb` before reading anything).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

from ats_model.contracts import PatchReadFn, check_attention_net, check_feature_net
from ats_model.geometry import RegionCells, RegionLayout, cells_to_regions
from ats_model.nested import (
    NESTED_MODES, NestedSampling, PositionDraw, RegionDraw, all_positions, check_budget, draw_positions,
    draw_regions, entropy, exact_inner_expected, nested_entropy, nested_exact, nested_expected, nested_topk_average,
    smoothed_attention, topk_positions, topk_regions, valid_regions,
)


@runtime_checkable
class RegionReadFn(Protocol):
    """read(image_ids (one per region), boxes (U, 4) level-0 (y0, x0, h, w), downsample) -> pixels
    (U, C, h / downsample, w / downsample) float32 in [0, 1] at the level of that downsample, fill outside the image."""

    def __call__(self, image_ids: Sequence, boxes: Tensor, downsample: int) -> Tensor: ...


@dataclass(frozen=True, slots=True)
class NestedATSConfig:
    sampling: NestedSampling = NestedSampling()
    region_px: tuple[int, int] = (4096, 4096)  # level-0 px per region
    fine_downsample: int = 16  # level-0 px per fine-attention px (the fine level's exact factor)
    halo: int = 0  # fine px of context around a region for the fine net; positions stay inside the region
    patch_hw: tuple[int, int] = (256, 256)  # level-0 px
    entropy_lambda: float = 0.01
    exact_budget_mb: float = 2048.0

    def __post_init__(self) -> None:
        self.layout  # validates the region geometry (ValueError naming the fix)
        if len(self.patch_hw) != 2 or min(self.patch_hw) < 1:
            raise ValueError(f"Expected patch_hw = (h, w) with positive sizes. Got {self.patch_hw}.")
        if self.entropy_lambda < 0:
            raise ValueError(f"Expected entropy_lambda >= 0. Got {self.entropy_lambda}.")

    @property
    def layout(self) -> RegionLayout:
        return RegionLayout(tuple(self.region_px), self.fine_downsample, self.halo)  # type: ignore[arg-type]


@dataclass(frozen=True)
class NestedATSOutput:
    logits: Tensor  # (B, n_classes)
    region_attention: Tensor  # (B, Ry, Rx) A, as the regions were drawn from (smoothed if configured)
    regions: RegionDraw  # slots (B', M); B' = B * n_draws
    positions: PositionDraw  # (B', M, L)
    slot_attention: Tensor  # (B', M, Py, Px) b of each slot's region (heatmaps inside the drawn regions)
    boxes: Tensor  # (B', M, L, 4) level-0 patch boxes; the columns of positions.mask() were read
    entropy: Tensor  # (B,) the regulariser's value (an unbiased estimate of H(q) in the sampled modes)
    regions_per_sample: float  # distinct regions through the fine net, per image
    attention_px_per_sample: float  # coarse + fine attention input pixels, per image


@dataclass(frozen=True)
class NestedAttention:
    """What the model attends to, without reading a patch (heatmaps, explanations, predict): the unsmoothed region
    attention, the top-M regions by it (the ones "topk" mode reads) and the unsmoothed fine attention inside each."""

    region_attention: Tensor  # (B, R) A, row-major on the region grid
    region_grid: tuple[int, int]  # (Ry, Rx)
    regions: RegionDraw  # (B, M) the top-M regions, largest A first
    fine_attention: Tensor  # (B, M, P) b of each top region's positions (0 where invalid)
    cells: RegionCells  # where the P positions of a region lie (RegionCells.hw = (Py, Px))


def _pool_regions(cell_logits: Tensor, cell_region: Tensor, n_regions: int) -> Tensor:
    """Region logits = log-sum-exp of the cell logits inside each region (A_r = the cells' softmax mass there).
    cell_logits (B, K), cell_region (B, K) with -1 outside the grid -> (B, R); a region without cells is -inf."""
    index = cell_region.clamp_min(0)  # (B, K)
    logits = cell_logits.masked_fill(cell_region < 0, -math.inf)  # (B, K)
    top = torch.full((logits.shape[0], n_regions), -math.inf, dtype=logits.dtype, device=logits.device)
    top = top.scatter_reduce(1, index, logits.detach(), "amax")  # (B, R) the shift, a constant
    shift = top.masked_fill(~torch.isfinite(top), 0.0)  # (B, R)
    summed = torch.zeros_like(shift).scatter_add(1, index, torch.exp(logits - shift.gather(1, index)))  # (B, R)
    empty = summed == 0
    return (summed.clamp_min(torch.finfo(summed.dtype).tiny).log() + shift).masked_fill(empty, -math.inf)


class NestedATSModel(nn.Module):
    def __init__(
        self, coarse: nn.Module, fine: nn.Module, feature: nn.Module, n_classes: int,
        config: NestedATSConfig = NestedATSConfig(),
    ):
        super().__init__()
        check_attention_net(coarse)
        check_attention_net(fine)
        check_feature_net(feature)
        if n_classes < 1:
            raise ValueError(f"Expected n_classes >= 1. Got {n_classes}.")
        self.coarse_net, self.fine_net, self.feature_net = coarse, fine, feature
        self.classifier = nn.Linear(feature.out_dim, n_classes)
        self.config = config
        self._cells: tuple[RegionLayout, RegionCells] | None = None  # the fine net's cells on a crop, per layout

    def region_cells(self, like: Tensor) -> RegionCells:
        """The fine net's positions inside a region crop (from the shape of its output on one blank crop with the
        channels, dtype and device of `like`)."""
        layout = self.config.layout
        if self._cells is None or self._cells[0] != layout:
            with torch.no_grad():
                blank = like.new_zeros(1, like.shape[1], *layout.crop_hw)  # (1, C, ch, cw)
                cells_hw = tuple(self.fine_net(blank).shape[-2:])
            self._cells = layout, RegionCells.of(layout, self.fine_net.grid, cells_hw)  # type: ignore[arg-type]
        return self._cells[1]

    def region_logits(
        self, coarse: Tensor, level0_hw: Tensor, coarse_scale: Tensor | float, coarse_hw: Tensor, cells: RegionCells
    ) -> tuple[Tensor, tuple[int, int]]:
        """(B, C, hc, wc) -> region logits (B, R) and the region grid (Ry, Rx). Masked (-inf): coarse cells outside
        an image's own view (ATSModel's rule), regions outside the image or without a valid position."""
        layout = self.config.layout
        cell_logits = self.coarse_net(coarse)  # (B, Ha, Wa)
        b, ha, wa = cell_logits.shape
        grid = self.coarse_net.grid
        ys = grid.offset_yx[0] + grid.stride_yx[0] * (torch.arange(ha, device=coarse.device) + 0.5)  # (Ha,)
        xs = grid.offset_yx[1] + grid.stride_yx[1] * (torch.arange(wa, device=coarse.device) + 0.5)  # (Wa,)
        hw = coarse_hw.to(coarse.device)  # (B, 2)
        valid = (ys[None, :, None] <= hw[:, 0, None, None]) & (xs[None, None, :] <= hw[:, 1, None, None])
        cell_logits = cell_logits.masked_fill(~valid, -math.inf).flatten(1)  # (B, K)
        region_grid = layout.grid_hw(level0_hw)
        cell_region = cells_to_regions((ha, wa), coarse_scale, grid, layout, region_grid).to(coarse.device)
        logits = _pool_regions(cell_logits, cell_region.expand(b, -1), region_grid[0] * region_grid[1])  # (B, R)
        every = torch.arange(logits.shape[1], device=coarse.device).expand(b, -1)  # (B, R)
        first = torch.zeros(1, dtype=torch.long, device=coarse.device)  # position 0: valid iff any is
        has_position = cells.valid(layout, every, region_grid, level0_hw.to(coarse.device), first)[..., 0]  # (B, R)
        return logits.masked_fill(~has_position, -math.inf), region_grid

    def fine_logits(
        self, read_regions: RegionReadFn, image_ids: Sequence, level0_hw: Tensor, regions: Tensor,
        region_grid: tuple[int, int], cells: RegionCells, device: torch.device,
    ) -> tuple[Tensor, Tensor]:
        """Position logits of every slot's region (B, M, P), the fine net run once per distinct (image, region) in
        one batch, and the number U of those. Positions outside the image are -inf."""
        layout = self.config.layout
        b, m = regions.shape
        n_regions = region_grid[0] * region_grid[1]
        keys, inverse = torch.unique(torch.arange(b, device=device)[:, None] * n_regions + regions,
                                     return_inverse=True)  # (U,), (B, M)
        rows, ids = torch.div(keys, n_regions, rounding_mode="floor"), keys % n_regions  # (U,) each
        boxes = layout.boxes(ids, region_grid, with_halo=True)  # (U, 4) level 0
        crops = read_regions([image_ids[int(r)] for r in rows], boxes, layout.downsample).to(device)  # (U, C, h, w)
        logits = cells.crop(self.fine_net(crops)).flatten(1)  # (U, Ha, Wa) -> (U, Py, Px) -> (U, P)
        valid = cells.valid(layout, ids[:, None], region_grid, level0_hw.to(device)[rows])[:, 0]  # (U, P)
        logits = logits.masked_fill(~valid, -math.inf)
        return logits[inverse], int(keys.shape[0])  # (B, M, P)

    def _coarse(
        self, coarse: Tensor, level0_hw: Tensor, coarse_scale: Tensor | float, coarse_hw: Tensor | None
    ) -> tuple[Tensor, RegionCells, Tensor, tuple[int, int]]:
        """What `forward` and `attention` start with: each image's own view size (default the tensor's), the fine
        positions of a region, the region logits (B, R) and the region grid."""
        if coarse_hw is None:
            coarse_hw = torch.tensor(coarse.shape[-2:], dtype=torch.long).expand(coarse.shape[0], 2)
        cells = self.region_cells(coarse)
        logits, grid = self.region_logits(coarse, level0_hw, coarse_scale, coarse_hw, cells)  # (B, R)
        return coarse_hw, cells, logits, grid

    @torch.no_grad()
    def attention(
        self, coarse: Tensor, read_regions: RegionReadFn, image_ids: Sequence, level0_hw: Tensor, *,
        coarse_scale: Tensor | float, coarse_hw: Tensor | None = None,
    ) -> NestedAttention:
        """The region attention on the coarse view and the fine attention inside the top-M regions (what "topk"
        mode reads), reading those regions but no patch. Arguments as in `forward`."""
        _, cells, logits, grid = self._coarse(coarse, level0_hw, coarse_scale, coarse_hw)  # logits (B, R)
        region_attention = smoothed_attention(logits)[0]  # (B, R); the order topk mode ranks by
        regions = topk_regions(region_attention, self.config.sampling)  # (B, M)
        fine, _ = self.fine_logits(read_regions, image_ids, level0_hw, regions.regions, grid, cells,
                                   coarse.device)  # (B, M, P)
        return NestedAttention(region_attention, grid, regions, smoothed_attention(fine)[0], cells)

    def forward(
        self,
        coarse: Tensor,
        read_regions: RegionReadFn,
        read_patches: PatchReadFn,
        image_ids: Sequence,
        level0_hw: Tensor,
        *,
        coarse_scale: Tensor | float,
        coarse_hw: Tensor | None = None,
        mode: str = "sampled",
        n_draws: int = 1,
        generator: torch.Generator | None = None,
    ) -> NestedATSOutput:
        """coarse (B, C, hc, wc) float in [0, 1]; level0_hw (B, 2); coarse_scale (B, 2), (2,) or a number: level-0
        px per coarse px (the view's exact factor); coarse_hw (B, 2) each image's own size inside the padded batch
        (default the tensor's). n_draws > 1 (mode "sampled") averages that many independent nested draws."""
        cfg, s = self.config, self.config.sampling
        if mode not in NESTED_MODES:
            raise ValueError(f"Expected mode in {NESTED_MODES}. Got {mode!r}.")
        if n_draws < 1 or (n_draws > 1 and mode != "sampled"):
            raise ValueError(f"Expected n_draws >= 1, and n_draws = 1 unless mode='sampled'. Got {n_draws}, {mode!r}.")
        b, channels, device = coarse.shape[0], coarse.shape[1], coarse.device
        coarse_hw, cells, region_logits, region_grid = self._coarse(coarse, level0_hw, coarse_scale, coarse_hw)
        region_attention, region_log_attention = smoothed_attention(region_logits, s.region_smoothing)  # (B, R)
        if n_draws > 1:  # rows b * n_draws + i: the i-th independent draw of image b
            region_logits, region_attention, region_log_attention = (
                x.repeat_interleave(n_draws, 0) for x in (region_logits, region_attention, region_log_attention))
            image_ids = [i for i in image_ids for _ in range(n_draws)]
            level0_hw = level0_hw.repeat_interleave(n_draws, 0)
        rows = region_logits.shape[0]
        n_regions, n_positions = region_logits.shape[1], cells.n_positions
        patch_bytes = channels * cfg.patch_hw[0] * cfg.patch_hw[1] * 4
        crop_bytes = channels * cfg.layout.crop_hw[0] * cfg.layout.crop_hw[1] * 4
        if mode == "exact":
            n_valid = int(torch.isfinite(region_logits).sum())
            check_budget(n_valid * (crop_bytes + n_positions * patch_bytes), cfg.exact_budget_mb, mode,
                         f"{n_valid} regions and up to {n_valid * n_positions} patches", "exact_inner")
            regions = valid_regions(region_logits, n_positions)  # (B, R_max) slots
        elif mode == "topk":
            regions = topk_regions(region_attention, s)
        else:
            regions = draw_regions(region_log_attention, s, generator)
            if mode == "exact_inner":
                distinct = int(torch.unique(regions.regions + n_regions * torch.arange(rows, device=device)[:, None])
                               .numel())
                check_budget(distinct * (crop_bytes + n_positions * patch_bytes), cfg.exact_budget_mb, mode,
                             f"{distinct} regions and up to {distinct * n_positions} patches", "sampled")

        slot_logits, distinct = self.fine_logits(read_regions, image_ids, level0_hw, regions.regions, region_grid,
                                                 cells, device)  # (B, M, P)
        slot_attention, slot_log_attention = smoothed_attention(slot_logits, s.position_smoothing)  # (B, M, P)
        if mode == "sampled":
            positions = draw_positions(slot_log_attention, regions, s, generator)
        elif mode == "topk":
            positions = topk_positions(slot_attention, regions)
        else:
            positions = all_positions(slot_logits, regions)

        boxes = cells.boxes(cfg.layout, regions.regions, positions.positions, region_grid, cfg.patch_hw)  # (B,M,L,4)
        features = self._features(read_patches, image_ids, boxes, positions.mask(), device)  # (B, M, L, D)
        if mode == "sampled":
            pooled = nested_expected(region_attention, regions, slot_attention, positions, features, s)  # (B, D)
            reg = nested_entropy(region_logits, region_attention, regions, slot_logits, s)  # (B,)
        elif mode == "exact_inner":
            pooled = exact_inner_expected(region_attention, regions, slot_attention, positions, features, s)
            reg = nested_entropy(region_logits, region_attention, regions, slot_logits, s)
        elif mode == "topk":
            pooled = nested_topk_average(region_attention, regions, slot_attention, positions, features)
            top = region_attention.gather(1, regions.regions) * (positions.sizes > 0)  # (B, M)
            top = top / top.sum(1, keepdim=True).clamp_min(torch.finfo(top.dtype).tiny ** 0.5)  # renormalised
            reg = entropy(region_logits) + (top * entropy(slot_logits)).sum(1)  # (B,)
        else:  # every valid region in a slot, every valid position listed
            slot_a = region_attention.gather(1, regions.regions) * (regions.targets > 0)  # (B, M) A of each slot
            listed = slot_attention.gather(2, positions.positions) * positions.mask()  # (B, M, L) b, listed order
            pooled = nested_exact(slot_a, listed, features)  # (B, D)
            reg = entropy(region_logits) + (slot_a * entropy(slot_logits)).sum(1)  # (B,) = joint_entropy
        pooled = pooled.reshape(-1, n_draws, pooled.shape[-1]).mean(1)  # (B*S, D) -> (B, D)
        reg = reg.reshape(-1, n_draws).mean(1)  # (B,)
        coarse_px = float((coarse_hw[:, 0] * coarse_hw[:, 1]).double().mean())  # each image's own view, not the padding
        attention_px = coarse_px + distinct / b * math.prod(cfg.layout.crop_hw)
        return NestedATSOutput(
            self.classifier(pooled), region_attention[::n_draws].reshape(b, *region_grid), regions, positions,
            slot_attention.reshape(*slot_attention.shape[:2], *cells.hw), boxes, reg, distinct / b,
            attention_px,
        )

    def _features(
        self, read_patches: PatchReadFn, image_ids: Sequence, boxes: Tensor, mask: Tensor, device: torch.device
    ) -> Tensor:
        """Read only the drawn patches, packed per image (draw order kept within each slot), and return their
        features at their slots: boxes (B, M, L, 4), mask (B, M, L) -> (B, M, L, D), zero where nothing was drawn."""
        b, m, width = mask.shape
        flat_mask = mask.reshape(b, m * width)  # (B, M*L)
        order = torch.sort((~flat_mask).to(torch.uint8), dim=1, stable=True).indices  # (B, M*L) drawn first
        n = max(int(flat_mask.sum(1).max()), 1)
        take = order[:, :n]  # (B, n); a row with fewer draws repeats undrawn boxes (read, then discarded)
        packed = boxes.reshape(b, m * width, 4).gather(1, take[:, :, None].expand(-1, -1, 4))  # (B, n, 4)
        patches = read_patches(image_ids, packed).to(device)  # (B, n, C, h, w)
        feats = self.feature_net(patches.flatten(0, 1)).reshape(b, n, -1)  # (B*n, C, h, w) -> (B, n, D)
        feats = feats * flat_mask.gather(1, take)[:, :, None]  # (B, n, D), zero where not drawn
        out = feats.new_zeros(b, m * width, feats.shape[-1])  # (B, M*L, D)
        out = out.scatter(1, take[:, :, None].expand(-1, -1, feats.shape[-1]), feats)
        return out.reshape(b, m, width, -1)  # (B, M, L, D)

    def loss(self, out: NestedATSOutput, targets: Tensor, class_weights: Tensor | None = None) -> Tensor:
        """Cross-entropy minus lambda times the joint-entropy regulariser (nested.nested_entropy)."""
        ce = nn.functional.cross_entropy(out.logits, targets, weight=class_weights)
        return ce - self.config.entropy_lambda * out.entropy.mean()
