"""Coordinates: the one place that maps attention-grid cells to level-0 boxes.

Convention (DESIGN.md, "Coordinates"): a box is `(y0, x0, h, w)` in level-0 pixels wherever it crosses a module
boundary. Pixel `j` covers the continuous interval `[j, j + 1)`, so the centre of pixel `j` is `j + 0.5`.

An attention net maps a low-resolution view `(h_low, w_low)` to a grid of cells `(Ha, Wa)`. Where each cell sits
on the low-res view is described by a `GridSpec`: cell `i` along an axis is centred at low-res coordinate
`offset + i * stride`. For 'same' padding and stride 1 (the paper's nets) that is `i + 0.5`, the centre of low-res
pixel `i`. Scaling by the view level's exact factor `s = d^l` (what the pyramid stores; not `H0 / H_low`, which
drifts when the sides do not divide) gives the level-0 centre, and the patch of size `P` starts at
`round_half_up(centre - P / 2)`. This equals the design's
`start = round(o * s + i * step + step / 2 - P / 2)` with `step = (H_low - r) * s / S`, `o = r / 2`
(`GridSpec.from_receptive_field` builds the spec from `r` and `S`).

Boxes keep their requested size at the image edges; the reader pads what falls outside with the fill value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True, slots=True)
class GridSpec:
    """Placement of attention cells on the low-res view, per axis (y, x), in low-res pixels."""

    stride_yx: tuple[float, float] = (1.0, 1.0)
    offset_yx: tuple[float, float] = (0.5, 0.5)

    def __post_init__(self) -> None:
        if min(self.stride_yx) <= 0:
            raise ValueError(f"Expected positive grid strides. Got {self.stride_yx}.")

    @classmethod
    def from_receptive_field(
        cls, low_hw: tuple[int, int], receptive_field: int, sample_space_hw: tuple[int, int]
    ) -> GridSpec:
        """The design's form: `S` cells spread evenly over the `H_low - r` pixels a valid conv can centre on."""
        r = receptive_field
        strides = tuple((size - r) / cells for size, cells in zip(low_hw, sample_space_hw))
        offsets = tuple(r / 2 + step / 2 for step in strides)
        return cls(stride_yx=strides, offset_yx=offsets)  # type: ignore[arg-type]


def round_half_up(x: Tensor) -> Tensor:
    """Round to the nearest integer, halves upwards (torch.round rounds halves to even)."""
    return torch.floor(x + 0.5).long()


def scale_rows(scale_yx: Tensor | float, b: int, device: torch.device) -> Tensor:
    """A view's level-0 pixels per view pixel as (B, 2) float64, from (B, 2), (2,) or a number."""
    scale = torch.as_tensor(scale_yx, dtype=torch.float64, device=device)
    return scale.expand(b, 2) if scale.numel() <= 2 else scale.reshape(-1, 2)  # (B, 2)


def cell_centres_level0(
    indices: Tensor, grid_hw: tuple[int, int], scale_yx: Tensor, spec: GridSpec = GridSpec()
) -> Tensor:
    """Level-0 centres `(cy, cx)` of flat grid cells.

    indices (B, n) flat cell indices into a (Ha, Wa) grid; scale_yx (B, 2) level-0 pixels per low-res pixel.
    Returns (B, n, 2) float64.
    """
    _, wa = grid_hw
    rows = torch.div(indices, wa, rounding_mode="floor").double()  # (B, n)
    cols = (indices % wa).double()  # (B, n)
    cy_low = spec.offset_yx[0] + rows * spec.stride_yx[0]
    cx_low = spec.offset_yx[1] + cols * spec.stride_yx[1]
    scale = scale_yx.to(device=indices.device, dtype=torch.float64)  # (B, 2)
    return torch.stack([cy_low * scale[:, :1], cx_low * scale[:, 1:]], dim=-1)  # (B, n, 2)


def cells_to_boxes(
    indices: Tensor,
    grid_hw: tuple[int, int],
    scale_yx: Tensor | float,
    patch_hw: tuple[int, int],
    spec: GridSpec = GridSpec(),
) -> Tensor:
    """Level-0 boxes `(y0, x0, h, w)` of patches centred on the given attention cells.

    indices (B, n) flat indices into the (Ha, Wa) grid; scale_yx (B, 2), (2,) or a number: level-0 pixels per
    low-res pixel, the view level's exact factor (d^l for pyramid level l with downsample d, as the reader stores
    it; never H0 / H_low, which drifts when the sides do not divide); patch_hw the patch size in level-0 pixels.
    Returns (B, n, 4) int64.
    """
    scale = scale_rows(scale_yx, indices.shape[0], indices.device)  # (B, 2)
    centres = cell_centres_level0(indices, grid_hw, scale, spec)  # (B, n, 2)
    size = torch.tensor(patch_hw, dtype=torch.float64, device=indices.device)  # (2,)
    starts = round_half_up(centres - size / 2)  # (B, n, 2)
    sizes = size.long().expand_as(starts)  # (B, n, 2)
    return torch.cat([starts, sizes], dim=-1)  # (B, n, 4)


def scale_boxes(boxes: Tensor, scale: Tensor | float) -> Tensor:
    """Boxes (B, n, 4) in a frame whose pixel is `scale` level-0 pixels ((B,) or a number; e.g. 2.0 for a 40x slide
    worked at 20x) -> level-0 boxes (B, n, 4): every coordinate times the scale, rounded half up. At a pyramid level
    whose exact factor is the scale, the reader's level boxes (pipeline.reader.boxes_to_level) are the frame boxes
    again, so the pixels read are those of an image stored at the frame's resolution."""
    s = torch.as_tensor(scale, dtype=torch.float64, device=boxes.device).reshape(-1, 1, 1)  # (B or 1, 1, 1)
    return round_half_up(boxes.to(torch.float64) * s)  # (B, n, 4)


def cell_fractions(
    fraction: Tensor,
    grid_hw: tuple[int, int],
    scale_yx: Tensor | float,
    patch_hw: tuple[int, int],
    spec: GridSpec = GridSpec(),
) -> Tensor:
    """The share of each cell's patch that is foreground, measured on a map aligned with the low-res view.

    fraction (B, h, w) in [0, 1] on the view's pixels (a foreground mask resampled to the view level, 0 in padding);
    scale_yx as in `cells_to_boxes`. Each cell's level-0 box (`cells_to_boxes`) becomes view pixels by dividing by
    the scale and rounding its edges half up (at least one pixel); the result is the mean of the map over that box,
    with the part of the box outside the map counted as background. Returns (B, Ha, Wa) float64.
    """
    b, h, w = fraction.shape
    ha, wa = grid_hw
    cells = torch.arange(ha * wa, device=fraction.device).expand(b, -1)  # (B, K)
    boxes = cells_to_boxes(cells, grid_hw, scale_yx, patch_hw, spec).double()  # (B, K, 4) level-0
    scale = scale_rows(scale_yx, b, fraction.device)  # (B, 2)
    y0 = round_half_up(boxes[..., 0] / scale[:, :1])  # (B, K) view pixels
    x0 = round_half_up(boxes[..., 1] / scale[:, 1:])
    y1 = torch.maximum(round_half_up((boxes[..., 0] + boxes[..., 2]) / scale[:, :1]), y0 + 1)
    x1 = torch.maximum(round_half_up((boxes[..., 1] + boxes[..., 3]) / scale[:, 1:]), x0 + 1)
    area = ((y1 - y0) * (x1 - x0)).double()  # (B, K), outside the map included
    table = torch.zeros(b, h + 1, w + 1, dtype=torch.float64, device=fraction.device)  # summed-area table
    table[:, 1:, 1:] = fraction.double().cumsum(1).cumsum(2)
    ys = [v.clamp(0, h) for v in (y0, y1)]
    xs = [v.clamp(0, w) for v in (x0, x1)]
    flat = table.flatten(1)  # (B, (h+1)(w+1))

    def at(y: Tensor, x: Tensor) -> Tensor:
        return flat.gather(1, y * (w + 1) + x)  # (B, K)

    inside = at(ys[1], xs[1]) - at(ys[0], xs[1]) - at(ys[1], xs[0]) + at(ys[0], xs[0])  # (B, K)
    return (inside / area).reshape(b, ha, wa)


def grid_boxes(level0_hw: tuple[int, int], patch_hw: tuple[int, int], stride_hw: tuple[int, int]) -> Tensor:
    """Every patch of a regular grid that covers the whole image (Deep MIL's bag), level-0 boxes (M, 4) int64.

    Starts at 0 and steps by `stride`; the last row/column may reach past the edge (read as fill).
    """
    counts = [
        math.ceil(max(size - patch, 0) / stride) + 1
        for size, patch, stride in zip(level0_hw, patch_hw, stride_hw)
    ]
    ys = torch.arange(counts[0]) * stride_hw[0]  # (My,)
    xs = torch.arange(counts[1]) * stride_hw[1]  # (Mx,)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # (My, Mx) each
    hh = torch.full_like(yy, patch_hw[0])
    ww = torch.full_like(xx, patch_hw[1])
    return torch.stack([yy, xx, hh, ww], dim=-1).reshape(-1, 4)  # (My*Mx, 4)


# -----------------------------------------------------------------------------
# regions (nested attention sampling, research/nested-ats.md section 6)

@dataclass(frozen=True, slots=True)
class RegionLayout:
    """Regions: a partition of level 0 into `region_px` rectangles starting at (0, 0), row-major ids.

    Region `r` of a (Ry, Rx) grid covers level-0 rows `[(r // Rx) * ry, (r // Rx + 1) * ry)` and the matching columns.
    The fine attention net sees a region at `downsample` (level-0 px per fine px: the fine level's exact factor)
    with `halo` fine px of context on every side; its logits are cropped back to the cells centred inside the region
    (`RegionCells`), so the regions' positions never overlap. `region_px` must be a multiple of `downsample`; a
    multiple of `downsample * chunk` makes a region exactly whole chunks of the fine level (`check_chunk_aligned`;
    a 4096-px region at 1/16 is one 256-px chunk). A halo makes an aligned region touch up to 9 chunks.
    """

    region_px: tuple[int, int]
    downsample: int
    halo: int = 0

    def __post_init__(self) -> None:
        if self.downsample < 1:
            raise ValueError(f"Expected a fine downsample >= 1 (level-0 px per fine px). Got {self.downsample}.")
        if len(self.region_px) != 2 or any(r < 1 or r % self.downsample for r in self.region_px):
            raise ValueError(
                f"Expected region sides that are positive multiples of the fine downsample {self.downsample}, so that "
                f"a region is whole fine pixels. Got region_px = {self.region_px}."
            )
        if self.halo < 0:
            raise ValueError(f"Expected a halo >= 0 fine px. Got {self.halo}.")

    @property
    def fine_hw(self) -> tuple[int, int]:
        """A region's size in fine px."""
        return self.region_px[0] // self.downsample, self.region_px[1] // self.downsample

    @property
    def crop_hw(self) -> tuple[int, int]:
        """What the fine attention net sees per region, in fine px: the region plus the halo on both sides."""
        return self.fine_hw[0] + 2 * self.halo, self.fine_hw[1] + 2 * self.halo

    def check_chunk_aligned(self, chunk_px: int) -> None:
        """Raise ValueError naming the fix unless every region is whole `chunk_px` chunks of the fine level."""
        if any(side % chunk_px for side in self.fine_hw):
            raise ValueError(
                f"Regions of {self.region_px} level-0 px are {self.fine_hw} fine px, not whole {chunk_px}-px chunks "
                f"of the fine level. Use region sides that are multiples of downsample * chunk = "
                f"{self.downsample * chunk_px} level-0 px."
            )

    def grid_hw(self, level0_hw: Tensor) -> tuple[int, int]:
        """(Ry, Rx): the region grid that covers the largest image of the batch; level0_hw (B, 2) or (2,)."""
        largest = torch.as_tensor(level0_hw).reshape(-1, 2).amax(0)  # (2,)
        return tuple(-(-int(size) // r) for size, r in zip(largest, self.region_px))  # type: ignore[return-value]

    def origins(self, region_ids: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        """Level-0 top-left corners (y0, x0) of regions: (...,) ids -> (..., 2) int64."""
        rows = torch.div(region_ids, grid_hw[1], rounding_mode="floor")  # (...,)
        cols = region_ids % grid_hw[1]
        return torch.stack([rows * self.region_px[0], cols * self.region_px[1]], dim=-1)  # (..., 2)

    def boxes(self, region_ids: Tensor, grid_hw: tuple[int, int], *, with_halo: bool = False) -> Tensor:
        """Level-0 boxes (y0, x0, h, w) of regions, (...,) -> (..., 4) int64; `with_halo` adds `halo * downsample`
        level-0 px on every side (what a region reader is asked for: its output is exactly `crop_hw`)."""
        margin = self.halo * self.downsample if with_halo else 0
        starts = self.origins(region_ids, grid_hw) - margin  # (..., 2)
        sizes = torch.tensor(self.region_px, device=region_ids.device) + 2 * margin  # (2,)
        return torch.cat([starts, sizes.expand_as(starts)], dim=-1)  # (..., 4)

    def inside(self, level0_hw: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        """(B, R) bool: regions whose top-left corner lies inside each image (level0_hw (B, 2))."""
        origins = self.origins(torch.arange(grid_hw[0] * grid_hw[1], device=level0_hw.device), grid_hw)  # (R, 2)
        return (origins[None] < level0_hw[:, None, :]).all(-1)  # (B, R)


def cells_to_regions(
    grid_hw: tuple[int, int], scale_yx: Tensor | float, spec: GridSpec, layout: RegionLayout,
    region_grid_hw: tuple[int, int],
) -> Tensor:
    """Region id of every cell of a coarse attention grid: the region its level-0 centre falls in, -1 outside the
    region grid. grid_hw (Ha, Wa); scale_yx (B, 2), (2,) or a number (level-0 px per coarse px). Returns (B, Ha*Wa)."""
    scale = torch.as_tensor(scale_yx, dtype=torch.float64)
    scale = scale.expand(1, 2) if scale.numel() <= 2 else scale.reshape(-1, 2)  # (B, 2)
    cells = torch.arange(grid_hw[0] * grid_hw[1]).expand(scale.shape[0], -1)  # (B, K)
    centres = cell_centres_level0(cells, grid_hw, scale, spec)  # (B, K, 2)
    rowcol = torch.floor(centres / torch.tensor(layout.region_px, dtype=torch.float64)).long()  # (B, K, 2)
    inside = (rowcol >= 0).all(-1) & (rowcol[..., 0] < region_grid_hw[0]) & (rowcol[..., 1] < region_grid_hw[1])
    return torch.where(inside, rowcol[..., 0] * region_grid_hw[1] + rowcol[..., 1], -1)  # (B, K)


@dataclass(frozen=True, slots=True)
class RegionCells:
    """The cells of the fine attention net's output on a region crop that are the region's positions.

    The net maps a crop of `layout.crop_hw` fine px to (Ha, Wa) cells placed by `spec` on the crop; the positions
    are the cells centred inside the region proper (the halo cropped back): rows `first_yx[0] .. + hw[0]`, likewise
    columns. Position `p` of a region is cell `(p // Px, p % Px)` of that block; P = Py * Px is the same for every
    region.
    """

    first_yx: tuple[int, int]
    hw: tuple[int, int]
    spec: GridSpec

    @classmethod
    def of(cls, layout: RegionLayout, spec: GridSpec, cells_hw: tuple[int, int]) -> RegionCells:
        first, size = [], []
        for axis in range(2):
            centres = [spec.offset_yx[axis] + i * spec.stride_yx[axis] for i in range(cells_hw[axis])]
            inside = [i for i, c in enumerate(centres) if layout.halo <= c < layout.halo + layout.fine_hw[axis]]
            if not inside:
                raise ValueError(
                    f"No cell of the fine attention net's {cells_hw} output is centred inside the region "
                    f"({layout.fine_hw} fine px after a halo of {layout.halo}). Use larger regions, a smaller fine "
                    f"downsample, or a fine net with a denser grid."
                )
            first.append(inside[0])
            size.append(len(inside))
        return cls((first[0], first[1]), (size[0], size[1]), spec)

    @property
    def n_positions(self) -> int:
        return self.hw[0] * self.hw[1]

    def crop(self, logits: Tensor) -> Tensor:
        """(..., Ha, Wa) fine logits of crops -> (..., Py, Px) logits of the regions' own positions."""
        (y0, x0), (py, px) = self.first_yx, self.hw
        return logits[..., y0 : y0 + py, x0 : x0 + px]

    def local_centres(self, positions: Tensor) -> Tensor:
        """Fine-px centres of positions, measured from their region's top-left corner: (...,) -> (..., 2) float64."""
        rows = torch.div(positions, self.hw[1], rounding_mode="floor").double()  # (...,)
        cols = (positions % self.hw[1]).double()
        cy = self.spec.offset_yx[0] + (self.first_yx[0] + rows) * self.spec.stride_yx[0]
        cx = self.spec.offset_yx[1] + (self.first_yx[1] + cols) * self.spec.stride_yx[1]
        return torch.stack([cy, cx], dim=-1)  # (..., 2), still in crop coordinates (halo included)

    def centres_level0(
        self, layout: RegionLayout, region_ids: Tensor, positions: Tensor, grid_hw: tuple[int, int]
    ) -> Tensor:
        """Level-0 centres of positions inside regions. region_ids (B, M), positions (B, M, L) -> (B, M, L, 2)."""
        local = self.local_centres(positions) - layout.halo  # (B, M, L, 2) fine px from the region's corner
        origins = layout.origins(region_ids, grid_hw).double()  # (B, M, 2) level-0 px
        return origins[:, :, None, :] + local * layout.downsample  # (B, M, L, 2)

    def boxes(
        self, layout: RegionLayout, region_ids: Tensor, positions: Tensor, grid_hw: tuple[int, int],
        patch_hw: tuple[int, int],
    ) -> Tensor:
        """Level-0 patch boxes (y0, x0, h, w) centred on positions: region_ids (B, M), positions (B, M, L) ->
        (B, M, L, 4) int64, the same rounding as `cells_to_boxes`."""
        centres = self.centres_level0(layout, region_ids, positions, grid_hw)  # (B, M, L, 2)
        size = torch.tensor(patch_hw, dtype=torch.float64, device=positions.device)  # (2,)
        starts = round_half_up(centres - size / 2)  # (B, M, L, 2)
        return torch.cat([starts, size.long().expand_as(starts)], dim=-1)  # (B, M, L, 4)

    def valid(
        self, layout: RegionLayout, region_ids: Tensor, grid_hw: tuple[int, int], level0_hw: Tensor,
        positions: Tensor | None = None,
    ) -> Tensor:
        """(B, M, P) bool: positions whose cell footprint (centre +- stride / 2) ends inside the image's fine level
        (ceil(H0 / downsample) px), the criterion `ATSModel` applies to its cells. region_ids (B, M); level0_hw (B, 2);
        positions (P',) to test only those (default all P). A region has a valid position iff its position 0 is
        valid (the footprints' far edges grow along both axes)."""
        every = torch.arange(self.n_positions, device=region_ids.device) if positions is None else positions  # (P,)
        local = self.local_centres(every) - layout.halo  # (P, 2) fine px
        far = local + torch.tensor(self.spec.stride_yx, dtype=torch.float64, device=every.device) / 2  # (P, 2)
        origins = layout.origins(region_ids, grid_hw).double() / layout.downsample  # (B, M, 2) fine px
        fine_hw = torch.div(level0_hw.to(region_ids.device) + layout.downsample - 1, layout.downsample,
                            rounding_mode="floor").double()  # (B, 2) ceil(H0 / d)
        return (origins[:, :, None, :] + far <= fine_hw[:, None, None, :]).all(-1)  # (B, M, P)
