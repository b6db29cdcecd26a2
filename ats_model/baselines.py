"""Baselines of the paper's §4.1.1, on the same feature net and patch size as attention sampling.

- `GatedAttentionMIL`: Ilse et al. (2018) gated attention pooling over a bag of patches,
  `a = softmax_m(w^T (tanh(V h_m) * sigmoid(U h_m)))`, `z = sum_m a_m h_m`, logits = `W z + b`.
- `DeepMIL`: the bag is every patch of a regular grid over the whole image (stride at least half a patch, at most a
  patch), read through the same patch-reader callable as ATS, features computed in chunks.
- `CNNBaseline`: a plain conv net on the whole image, downsampled by the caller to a scale (`downsample_image`).
- U-N (uniform attention, N samples) is ATS with the "uniform" attention net of `nets.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ats_model.contracts import PatchReadFn, check_feature_net, to_unit_float
from ats_model.geometry import grid_boxes



@dataclass(frozen=True, slots=True)
class MILOutput:
    """logits (B, n_classes); attention over the bag, zero on padding: (B, M) for GatedAttentionMIL, (B, My, Mx)
    laid out as the patch grid for DeepMIL; grid_hw (B, 2) each image's own grid size (DeepMIL only)."""

    logits: Tensor
    attention: Tensor
    grid_hw: Tensor | None = None


# -----------------------------------------------------------------------------
# Deep MIL

class GatedAttentionMIL(nn.Module):
    """Gated attention MIL (Ilse et al. 2018) on a feature net's L2-normalised patch features.

    forward(patches (B, M, C, P, P), mask (B, M) bool, True = real patch) -> MILOutput(logits, attention (B, M)).
    """

    def __init__(self, feature: nn.Module, n_classes: int, hidden: int = 128) -> None:
        super().__init__()
        check_feature_net(feature)
        if n_classes < 1 or hidden < 1:
            raise ValueError(f"Expected n_classes >= 1 and hidden >= 1. Got n_classes={n_classes}, hidden={hidden}.")
        dim = int(feature.out_dim)
        self.feature = feature
        self.attention_v = nn.Linear(dim, hidden)  # tanh branch
        self.attention_u = nn.Linear(dim, hidden)  # sigmoid gate
        self.attention_w = nn.Linear(hidden, 1)
        self.classifier = nn.Linear(dim, n_classes)

    def embed(self, patches: Tensor, chunk: int | None = None) -> Tensor:
        """Features of a flat stack of patches, `chunk` at a time: (M, C, P, P) -> (M, D)."""
        step = patches.shape[0] if chunk is None else chunk
        parts = [self.feature(patches[s : s + step]) for s in range(0, patches.shape[0], max(step, 1))]
        return torch.cat(parts, dim=0)  # (M, D)

    def pool(self, h: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Gated attention pooling: h (B, M, D), mask (B, M) -> logits (B, n_classes), attention (B, M)."""
        scores = self.attention_w(torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h)))  # (B, M, 1)
        scores = scores.squeeze(-1)  # (B, M)
        if mask is not None:
            if not bool(mask.any(dim=1).all()):
                raise ValueError("Every bag needs at least one unmasked patch; check the mask or the image sizes.")
            scores = scores.masked_fill(~mask, float("-inf"))
        attention = torch.softmax(scores, dim=1)  # (B, M), exactly 0 where masked
        z = torch.einsum("bm,bmd->bd", attention, h)  # (B, D)
        return self.classifier(z), attention

    def forward(self, patches: Tensor, mask: Tensor | None = None, chunk: int | None = None) -> MILOutput:
        if patches.dim() != 5:
            raise ValueError(f"Expected patches of shape (B, M, C, P, P). Got shape {tuple(patches.shape)}.")
        b, m = patches.shape[:2]
        h = self.embed(patches.flatten(0, 1), chunk)  # (B, M, C, P, P) -> (B*M, D)
        logits, attention = self.pool(h.view(b, m, -1), mask)  # (B*M, D) -> (B, M, D)
        return MILOutput(logits=logits, attention=attention)


def parse_grid(patch_hw: Sequence[int], stride_hw: Sequence[int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Validate a Deep MIL grid: positive integer sizes, stride at least half a patch and at most a patch."""
    patch = tuple(int(p) for p in patch_hw)
    stride = tuple(int(s) for s in stride_hw)
    if len(patch) != 2 or len(stride) != 2 or min(patch) < 1 or min(stride) < 1:
        raise ValueError(f"Expected patch_hw and stride_hw as two positive integers. Got {patch_hw}, {stride_hw}.")
    if any(2 * s < p for p, s in zip(patch, stride)):
        least = tuple(math.ceil(p / 2) for p in patch)
        raise ValueError(
            f"Deep MIL grid stride {stride} is less than half the patch {patch} (the paper's fair-comparison rule). "
            f"Use stride_hw >= {least}."
        )
    if any(s > p for p, s in zip(patch, stride)):
        raise ValueError(
            f"Deep MIL grid stride {stride} exceeds the patch {patch}, leaving pixels no patch covers. "
            f"Use stride_hw <= {patch}."
        )
    return patch, stride  # type: ignore[return-value]


class DeepMIL(nn.Module):
    """Deep MIL over every patch of a regular grid on each whole image (Ilse et al. 2018; paper §4.1.1).

    forward(image_ids, level0_hw (B, 2), read) -> MILOutput(logits (B, n_classes), attention (B, My, Mx), grid_hw).
    Images may differ in size: each is read and embedded on its own, then the bags are padded to the largest grid
    with masked (-inf) attention logits. Patches are read and embedded `chunk` at a time; note that training still
    keeps every patch's activations for the backward pass, which is the memory cost the paper reports.
    """

    def __init__(
        self,
        feature: nn.Module,
        n_classes: int,
        patch_hw: Sequence[int],
        stride_hw: Sequence[int],
        hidden: int = 128,
        chunk: int = 256,
    ) -> None:
        super().__init__()
        self.patch_hw, self.stride_hw = parse_grid(patch_hw, stride_hw)
        if chunk < 1:
            raise ValueError(f"Expected chunk >= 1 patches. Got {chunk}.")
        self.chunk = chunk
        self.mil = GatedAttentionMIL(feature, n_classes, hidden=hidden)

    def boxes(self, level0_hw: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
        """The bag of one image: level-0 boxes (My*Mx, 4) in row-major grid order, and (My, Mx)."""
        boxes = grid_boxes(level0_hw, self.patch_hw, self.stride_hw)  # (M, 4)
        mx = int((boxes[:, 0] == boxes[0, 0]).sum())  # the first grid row
        return boxes, (boxes.shape[0] // mx, mx)

    def _embed_image(self, image_id: object, boxes: Tensor, read: PatchReadFn, like: Tensor) -> Tensor:
        feats = []
        for s in range(0, boxes.shape[0], self.chunk):
            part = boxes[None, s : s + self.chunk]  # (1, m, 4)
            pixels = torch.as_tensor(read([image_id], part))
            if pixels.dim() != 5 or tuple(pixels.shape[:2]) != (1, part.shape[1]):
                raise ValueError(
                    f"The patch reader returned shape {tuple(pixels.shape)} for boxes of shape {tuple(part.shape)}; "
                    f"it must return (B, M, C, h, w) = (1, {part.shape[1]}, C, h, w)."
                )
            feats.append(self.mil.feature(to_unit_float(pixels[0]).to(like)))  # (m, C, h, w) -> (m, D)
        return torch.cat(feats, dim=0)  # (M, D)

    def forward(self, image_ids: Sequence[object], level0_hw: Tensor, read: PatchReadFn) -> MILOutput:
        sizes = torch.as_tensor(level0_hw).reshape(-1, 2).long().cpu()  # (B, 2)
        if len(image_ids) != sizes.shape[0]:
            raise ValueError(f"Got {len(image_ids)} image ids but {sizes.shape[0]} sizes in level0_hw (B, 2).")
        like = self.mil.classifier.weight  # device and dtype for the pixels
        bags, grids = [], []
        for image_id, (h0, w0) in zip(image_ids, sizes.tolist()):
            boxes, grid = self.boxes((h0, w0))
            bags.append(self._embed_image(image_id, boxes, read, like))  # (My*Mx, D)
            grids.append(grid)

        b, d = len(bags), bags[0].shape[1]
        gy, gx = max(g[0] for g in grids), max(g[1] for g in grids)
        h = like.new_zeros(b, gy, gx, d)  # (B, My, Mx, D), each image's grid in the top-left corner
        mask = torch.zeros(b, gy, gx, dtype=torch.bool, device=like.device)  # (B, My, Mx)
        for i, (bag, (my, mx)) in enumerate(zip(bags, grids)):
            h[i, :my, :mx] = bag.view(my, mx, d)  # (My*Mx, D) -> (My, Mx, D)
            mask[i, :my, :mx] = True
        logits, attention = self.mil.pool(h.view(b, gy * gx, d), mask.view(b, gy * gx))  # (B, My*Mx)
        grid_hw = torch.tensor(grids, dtype=torch.long)  # (B, 2)
        return MILOutput(logits=logits, attention=attention.view(b, gy, gx), grid_hw=grid_hw)


# -----------------------------------------------------------------------------
# CNN on the downsampled whole image

def downsample_image(x: Tensor, scale: float) -> Tensor:
    """Area-downsample a batch (B, C, H, W) of float images by `scale` in (0, 1]: -> (B, C, round(H*s), round(W*s))."""
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"Expected float images of shape (B, C, H, W). Got {x.dtype} of shape {tuple(x.shape)}.")
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"Expected a downsampling scale in (0, 1]. Got {scale}.")
    if scale == 1.0:
        return x
    size = tuple(max(1, math.floor(n * scale + 0.5)) for n in x.shape[-2:])  # round half up
    return F.interpolate(x, size=size, mode="area")  # (B, C, H, W) -> (B, C, h, w)


class CNNBaseline(nn.Module):
    """A plain conv net on the whole (downsampled) image: `stages` x [conv3x3-BN-ReLU-maxpool2], global average
    pooling, linear. forward(x (B, C, H, W) float in [0, 1]) -> logits (B, n_classes). The caller resizes."""

    def __init__(self, in_channels: int, n_classes: int, width: int = 16, stages: int = 4) -> None:
        super().__init__()
        if min(in_channels, n_classes, width, stages) < 1:
            raise ValueError(
                f"Expected positive in_channels, n_classes, width and stages. "
                f"Got {in_channels}, {n_classes}, {width}, {stages}."
            )
        layers: list[nn.Module] = []
        cin = in_channels
        for i in range(stages):
            cout = width * 2**i
            layers += [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.MaxPool2d(2, ceil_mode=True),  # (B, c, H, W) -> (B, c, ceil(H/2), ceil(W/2)); any size >= 1
            ]
            cin = cout
        self.in_channels = in_channels
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(cin, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"Expected images (B, {self.in_channels}, H, W). Got shape {tuple(x.shape)}.")
        x = self.body(x)  # (B, C, H, W) -> (B, width*2^(S-1), H/2^S, W/2^S)
        x = x.mean(dim=(2, 3))  # global average pool -> (B, width*2^(S-1))
        return self.head(x)  # (B, n_classes)
