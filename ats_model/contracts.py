"""The contracts between the model and what feeds it: the pixel convention, the patch reader, the two nets.

- Pixels reach every net as float32 in [0, 1]: integer pixels divided by their dtype's maximum, float pixels taken
  as already in [0, 1] (DESIGN "The math"). `to_unit_float` is the one converter, for numpy arrays and tensors.
- A patch reader is any callable `read(image_ids, boxes) -> Tensor`: boxes (B, N, 4) int64 `(y0, x0, h, w)` in
  level-0 pixels, pixels (B, N, C, h, w) float32 in [0, 1], zero (the fill value) outside the image.
- An attention net maps a low-res view (B, C, h, w) to logits (B, Ha, Wa) and says where its cells sit (`grid`);
  a feature net maps patches (M, C, P, P) to L2-normalised rows (M, out_dim).

`check_attention_net` / `check_feature_net` are what `ATSModel` (and the baselines) call on construction, so a
custom net that misses an attribute fails at once with a message naming the fix, not deep inside a training step.
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from ats_model.geometry import GridSpec


@runtime_checkable
class PatchReadFn(Protocol):
    """read(image_ids, boxes (B, N, 4) level-0 (y0, x0, h, w)) -> pixels (B, N, C, h, w) float32 in [0, 1]."""

    def __call__(self, image_ids: Sequence, boxes: Tensor) -> Tensor: ...


@runtime_checkable
class AttentionNet(Protocol):
    """forward(x (B, C, h, w) float in [0, 1]) -> logits (B, Ha, Wa); `grid` places the cells on the view."""

    grid: GridSpec

    def __call__(self, x: Tensor) -> Tensor: ...


@runtime_checkable
class FeatureNet(Protocol):
    """forward(x (M, C, P, P) float in [0, 1]) -> (M, out_dim), every row of unit L2 norm."""

    out_dim: int

    def __call__(self, x: Tensor) -> Tensor: ...


def to_unit_float(pixels: np.ndarray | Tensor) -> Tensor:
    """Pixels as a float32 tensor in [0, 1]: integers divided by their dtype's max; floats converted as they are."""
    if isinstance(pixels, np.ndarray):
        if pixels.dtype == np.bool_:
            raise ValueError("Expected integer or float pixels. Got dtype bool: store masks as uint8 0/255.")
        if np.issubdtype(pixels.dtype, np.integer):
            scaled = pixels.astype(np.float32) / np.float32(np.iinfo(pixels.dtype).max)  # numpy: every int dtype
            return torch.from_numpy(scaled)
        return torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
    pixels = torch.as_tensor(pixels)
    if pixels.dtype == torch.bool:
        raise ValueError("Expected integer or float pixels. Got dtype torch.bool: store masks as uint8 0/255.")
    if pixels.is_floating_point():
        return pixels.float()
    return pixels.float() / float(torch.iinfo(pixels.dtype).max)


def check_attention_net(net: object) -> None:
    """Raise TypeError naming the fix when `net` lacks what ATSModel needs of an attention net."""
    if not callable(net):
        raise TypeError(f"Expected an attention net (an nn.Module). Got {type(net).__name__}.")
    if not isinstance(getattr(net, "grid", None), GridSpec):
        raise TypeError(
            f"The attention net {type(net).__name__} has no `grid: GridSpec` attribute. Set `self.grid = GridSpec()` "
            "for 'same'-padded stride-1 nets, or GridSpec(stride_yx, offset_yx) for strided ones (ats_model.geometry)."
        )


def check_feature_net(net: object) -> None:
    """Raise TypeError naming the fix when `net` lacks what the models need of a feature net."""
    if not callable(net):
        raise TypeError(f"Expected a feature net (an nn.Module). Got {type(net).__name__}.")
    out_dim = getattr(net, "out_dim", None)
    if not isinstance(out_dim, int) or isinstance(out_dim, bool) or out_dim < 1:
        raise TypeError(
            f"The feature net {type(net).__name__} has no positive integer `out_dim` attribute (got {out_dim!r}). "
            "Set `self.out_dim` to the length of the feature vector its forward returns."
        )
