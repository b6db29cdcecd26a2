"""Attention and feature networks, in a small registry (timm-style: a new net is one decorated function).

Attention nets see the whole low-resolution view and return one unnormalised logit per cell:

    forward(x: (B, C, h, w) float in [0, 1]) -> logits (B, Ha, Wa)

and carry `grid: GridSpec`, where their cells sit on the view (cell `i` centred at `offset + i * stride` low-res
pixels; geometry.py turns that into level-0 boxes). The model applies the softmax, smoothing and masking.

Feature nets see the sampled high-resolution patches and return one L2-normalised vector per patch (paper §3.4: the
normalisation makes sampling from the attention the minimum-variance choice, Eq. 9):

    forward(x: (M, C, P, P) float in [0, 1]) -> (M, out_dim), every row of unit norm

Feature nets use no batch statistics (GroupNorm, not BatchNorm): a patch's features must not depend on which other
patches share its batch, or the sampled estimate, Deep MIL's chunked bag and the exact expectation would disagree.

    create_attention("mnist_tanh", in_channels=1)      create_feature("lenet1", in_channels=1, out_dim=128)
    create_feature("mnist_paper", in_channels=1, out_dim=32)   # the authors' code for Megapixel MNIST

`BandScaled(net, mean, std)` runs any of them on `(x - mean) / std` per band (statistics of the training data in
the [0, 1] convention), so nets still take [0, 1] pixels while their first layer sees inputs of unit scale.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ats_model.geometry import GridSpec

Factory = Callable[..., nn.Module]
_ATTENTION: dict[str, Factory] = {}
_FEATURE: dict[str, Factory] = {}


# -----------------------------------------------------------------------------
# registry

def _register(table: dict[str, Factory], kind: str, name: str) -> Callable[[Factory], Factory]:
    def decorator(factory: Factory) -> Factory:
        if name in table:
            raise ValueError(f"The {kind} net {name!r} is already registered; pick another name.")
        table[name] = factory
        return factory

    return decorator


def register_attention(name: str) -> Callable[[Factory], Factory]:
    """Decorator: register `factory(in_channels, **kw) -> nn.Module` as attention net `name`."""
    return _register(_ATTENTION, "attention", name)


def register_feature(name: str) -> Callable[[Factory], Factory]:
    """Decorator: register `factory(in_channels, **kw) -> nn.Module` as feature net `name`."""
    return _register(_FEATURE, "feature", name)


def attention_names() -> list[str]:
    return sorted(_ATTENTION)


def feature_names() -> list[str]:
    return sorted(_FEATURE)


def _create(table: dict[str, Factory], kind: str, name: str, in_channels: int, **kw: object) -> nn.Module:
    if name not in table:
        raise ValueError(f"Unknown {kind} net {name!r}. Known {kind} nets: {', '.join(sorted(table))}.")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"Expected in_channels to be a positive integer. Got {in_channels!r}.")
    return table[name](in_channels, **kw)


def create_attention(name: str, in_channels: int, **kw: object) -> nn.Module:
    """An attention net by name: forward (B, C, h, w) -> logits (B, Ha, Wa); attribute `grid: GridSpec`."""
    return _create(_ATTENTION, "attention", name, in_channels, **kw)


def create_feature(name: str, in_channels: int, **kw: object) -> nn.Module:
    """A feature net by name: forward (M, C, P, P) -> (M, out_dim) of unit L2 norm; attribute `out_dim`."""
    return _create(_FEATURE, "feature", name, in_channels, **kw)


# -----------------------------------------------------------------------------
# helpers

def l2_normalise(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Rows of unit L2 norm; a row with norm below `eps` is divided by `eps` instead (finite value and gradient)."""
    return F.normalize(x, p=2.0, dim=-1, eps=eps)


def _check_input(x: Tensor, in_channels: int, min_hw: int, what: str) -> None:
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"Expected {what} of shape (B, {in_channels}, h, w). Got shape {tuple(x.shape)}.")
    if min(x.shape[-2:]) < min_hw:
        raise ValueError(
            f"Expected {what} of at least {min_hw}x{min_hw} pixels for this net. Got {tuple(x.shape[-2:])}; "
            f"use larger inputs (a larger low-res scale or patch size) or another net."
        )


def _group_norm(channels: int, max_groups: int = 8) -> nn.GroupNorm:
    """GroupNorm with the most groups (up to `max_groups`) that divide `channels`."""
    groups = max(g for g in range(1, max_groups + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def _conv(cin: int, cout: int, k: int = 3) -> nn.Conv2d:
    """k x k convolution with 'same' padding (k odd): output pixel i is centred on input pixel i."""
    return nn.Conv2d(cin, cout, k, padding=k // 2)


INITS = ("torch", "glorot")


def initialise(module: nn.Module, init: str) -> nn.Module:
    """Re-initialise every conv and linear layer of `module` in place and return it. "torch": PyTorch's defaults
    (kaiming-uniform weights, small uniform biases); "glorot": Glorot-uniform weights and zero biases, the Keras
    defaults the paper's code ran with. Zero biases make an empty (all-zero) patch's ReLU features exactly 0 at the
    start, so it adds nothing to the pooled feature instead of a constant unit vector."""
    if init not in INITS:
        raise ValueError(f"Expected init in {INITS}. Got {init!r}.")
    if init == "glorot":
        for layer in module.modules():
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(layer.weight)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
    return module


# -----------------------------------------------------------------------------
# attention networks

class TanhConvAttention(nn.Module):
    """The paper's Megapixel MNIST attention (§4.2): three 'same' 3x3 convs, tanh between, one logit per pixel."""

    def __init__(self, in_channels: int, hidden: int = 8) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.grid = GridSpec()  # stride 1, cell i centred on low-res pixel i
        self.net = nn.Sequential(
            _conv(in_channels, hidden), nn.Tanh(),
            _conv(hidden, hidden), nn.Tanh(),
            _conv(hidden, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.in_channels, 1, "a low-res view")
        return self.net(x).squeeze(1)  # (B, 1, h, w) -> (B, h, w)


class PooledConvAttention(nn.Module):
    """A deeper attention net for larger views (the speed-limits net, §4.4): four 'same' 3x3 convs, two 2x2 max-pools.

    Output (B, h // 4, w // 4). Pool windows do not overlap and drop the last `h % 4` rows (floor mode), so cell `i`
    is exactly the 4x4 block [4i, 4i + 4) of the view: stride 4, centre 4i + 2 (every centre inside the view).
    """

    def __init__(self, in_channels: int, widths: tuple[int, int, int] = (8, 16, 32)) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.in_channels = in_channels
        self.grid = GridSpec(stride_yx=(4.0, 4.0), offset_yx=(2.0, 2.0))
        self.net = nn.Sequential(
            _conv(in_channels, w1), nn.Tanh(),
            _conv(w1, w2), nn.Tanh(),
            nn.MaxPool2d(2),  # (B, w2, h, w) -> (B, w2, h//2, w//2)
            _conv(w2, w3), nn.Tanh(),
            nn.MaxPool2d(2),  # (B, w3, h//2, w//2) -> (B, w3, h//4, w//4)
            _conv(w3, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.in_channels, 4, "a low-res view")
        return self.net(x).squeeze(1)  # (B, 1, h//4, w//4) -> (B, h//4, w//4)


class UniformAttention(nn.Module):
    """No parameters: equal logits everywhere, i.e. uniform attention (the paper's U-N baseline)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.grid = GridSpec()

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.in_channels, 1, "a low-res view")
        b, _, h, w = x.shape
        return x.new_zeros(b, h, w)  # (B, h, w)


@register_attention("mnist_tanh")
def mnist_tanh(in_channels: int, hidden: int = 8) -> nn.Module:
    return TanhConvAttention(in_channels, hidden=hidden)


@register_attention("deep_pool")
def deep_pool(in_channels: int, widths: tuple[int, int, int] = (8, 16, 32)) -> nn.Module:
    return PooledConvAttention(in_channels, widths=widths)


@register_attention("uniform")
def uniform(in_channels: int) -> nn.Module:
    return UniformAttention(in_channels)


# -----------------------------------------------------------------------------
# wrappers

class BandScaled(nn.Module):
    """`net` applied to `(x - mean) / std` per band (channel axis -3), with the net's contract attributes kept.

    Dark or bright data in [0, 1] (a fluorescence slide near 0.05, glass near 0.9, 12-bit data in uint16 near 0.03)
    otherwise reaches the first layer with a small spread around an offset, and a net can settle on its biases and
    ignore its input before it has learned anything. mean and std: (C,) per-band statistics of the training pixels.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> None:
        super().__init__()
        mean_t, std_t = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if mean_t.dim() != 1 or mean_t.shape != std_t.shape:
            raise ValueError(f"Expected mean and std of one shape (C,). Got {tuple(mean_t.shape)} and "
                             f"{tuple(std_t.shape)}.")
        channels = getattr(net, "in_channels", None)
        if channels is not None and channels != mean_t.numel():
            raise ValueError(f"The net takes {channels} bands; got statistics for {mean_t.numel()}. Compute mean and "
                             "std over the same bands the net reads.")
        if not bool(torch.isfinite(torch.cat([mean_t, std_t])).all()) or not bool((std_t > 0).all()):
            raise ValueError(f"Expected finite means and positive standard deviations. Got std {std_t.tolist()}: a "
                             "constant band carries no signal; drop it or pass std 1 for it.")
        self.net = net
        self.register_buffer("mean", mean_t[:, None, None])  # (C, 1, 1)
        self.register_buffer("std", std_t[:, None, None])
        for name in ("grid", "out_dim", "in_channels", "min_patch"):
            if hasattr(net, name):
                setattr(self, name, getattr(net, name))

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.mean) / self.std)  # (..., C, h, w), the net's output


# -----------------------------------------------------------------------------
# feature networks

class LeNet1(nn.Module):
    """LeNet-1-like (LeCun et al. 1995; the paper's Megapixel MNIST feature net): conv5-pool-conv5-pool-fc.

    The second pool is adaptive (to 4x4), so any patch size from 14 up works (27..64 in practice).
    """

    min_patch = 14

    def __init__(self, in_channels: int, out_dim: int = 128, widths: tuple[int, int] = (16, 32)) -> None:
        super().__init__()
        w1, w2 = widths
        self.in_channels = in_channels
        self.out_dim = out_dim
        self.conv1 = nn.Conv2d(in_channels, w1, 5)
        self.conv2 = nn.Conv2d(w1, w2, 5)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(w2 * 4 * 4, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.in_channels, self.min_patch, "patches")
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (M, C, P, P) -> (M, w1, (P-4)//2, (P-4)//2)
        x = self.pool(F.relu(self.conv2(x)))  # -> (M, w2, 4, 4)
        x = self.fc(x.flatten(1))  # (M, w2*16) -> (M, out_dim)
        return l2_normalise(x)


class PaperMNISTNet(nn.Module):
    """The feature net of the paper authors' Megapixel MNIST code: a 7x7 conv then three 3x3 convs, all `width`
    channels, 'valid' padding, ReLU, global max pooling, L2 normalisation (out_dim = width).

    Max pooling answers "is a stroke anywhere in the patch", whatever its position, which suits 50 px patches that
    catch a 28 px digit at any offset.
    """

    min_patch = 13  # 7x7 then three 3x3 'valid' convs leave one pixel

    def __init__(self, in_channels: int, width: int = 32) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_dim = width
        self.convs = nn.ModuleList([nn.Conv2d(in_channels, width, 7)] +
                                   [nn.Conv2d(width, width, 3) for _ in range(3)])

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.in_channels, self.min_patch, "patches")
        for conv in self.convs:
            x = F.relu(conv(x))  # (M, C, P, P) -> ... -> (M, width, P - 12, P - 12)
        x = x.amax(dim=(2, 3))  # global max pool -> (M, width)
        return l2_normalise(x)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with GroupNorm, identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _group_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = _group_norm(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), _group_norm(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.norm1(self.conv1(x)))  # (M, cin, H, W) -> (M, cout, H/s, W/s)
        y = self.norm2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class SmallResNet(nn.Module):
    """A small ResNet (the paper's speed-limits feature net, §4.4): stem, one basic block per stage, global average
    pooling, L2 normalisation. Stages halve the resolution after the first; out_dim = widths[-1]."""

    min_patch = 8

    def __init__(self, in_channels: int, widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_dim = widths[-1]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), _group_norm(widths[0]), nn.ReLU()
        )
        blocks, cin = [], widths[0]
        for i, cout in enumerate(widths):
            blocks.append(BasicBlock(cin, cout, stride=1 if i == 0 else 2))
            cin = cout
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.in_channels, self.min_patch, "patches")
        x = self.blocks(self.stem(x))  # (M, C, P, P) -> (M, out_dim, P/2^(S-1), P/2^(S-1))
        x = x.mean(dim=(2, 3))  # global average pool -> (M, out_dim)
        return l2_normalise(x)


class IlseColonNet(nn.Module):
    """The feature net of Ilse et al. (2018) for 27x27 colon-cancer patches (the paper's §4.3):
    conv(36, 4x4)-ReLU-maxpool-conv(48, 3x3)-ReLU-maxpool-fc(512)-ReLU-fc(512)-ReLU, then L2 normalisation.

    The second pool is adaptive (to 5x5, what 27x27 patches give), so other patch sizes from 9 up work too.
    """

    min_patch = 9

    def __init__(self, in_channels: int, out_dim: int = 512, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_dim = out_dim
        self.conv1 = nn.Conv2d(in_channels, 36, 4)
        self.conv2 = nn.Conv2d(36, 48, 3)
        self.pool = nn.AdaptiveMaxPool2d(5)
        self.fc1 = nn.Linear(48 * 5 * 5, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.in_channels, self.min_patch, "patches")
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (M, C, 27, 27) -> (M, 36, 12, 12)
        x = self.pool(F.relu(self.conv2(x)))  # -> (M, 48, 5, 5)
        x = self.drop(F.relu(self.fc1(x.flatten(1))))  # (M, 1200) -> (M, out_dim)
        x = self.drop(F.relu(self.fc2(x)))  # (M, out_dim)
        return l2_normalise(x)


@register_feature("lenet1")
def lenet1(in_channels: int, out_dim: int = 128, widths: tuple[int, int] = (16, 32)) -> nn.Module:
    return LeNet1(in_channels, out_dim=out_dim, widths=widths)


@register_feature("mnist_paper")
def mnist_paper(in_channels: int, out_dim: int = 32) -> nn.Module:
    """The authors' Megapixel MNIST feature net; out_dim is its channel width (the paper's 32: model.feature_dim=32)."""
    return PaperMNISTNet(in_channels, width=out_dim)


@register_feature("resnet_small")
def resnet_small(in_channels: int, widths: tuple[int, ...] = (16, 32, 64)) -> nn.Module:
    return SmallResNet(in_channels, widths=widths)


@register_feature("ilse_colon")
def ilse_colon(in_channels: int, out_dim: int = 512, dropout: float = 0.0) -> nn.Module:
    return IlseColonNet(in_channels, out_dim=out_dim, dropout=dropout)
