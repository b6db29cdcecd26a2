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
    scale = torch.as_tensor(scale_yx, dtype=torch.float64, device=indices.device)
    scale = scale.expand(indices.shape[0], 2) if scale.numel() <= 2 else scale.reshape(-1, 2)  # (B, 2)
    centres = cell_centres_level0(indices, grid_hw, scale, spec)  # (B, n, 2)
    size = torch.tensor(patch_hw, dtype=torch.float64, device=indices.device)  # (2,)
    starts = round_half_up(centres - size / 2)  # (B, n, 2)
    sizes = size.long().expand_as(starts)  # (B, n, 2)
    return torch.cat([starts, sizes], dim=-1)  # (B, n, 4)


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
