"""Every registered attention and feature net: shapes, finite forward and backward, a gradient for every parameter,
unit-norm features, and attention grids that sit where their GridSpec says."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ats_model.nets import (
    BandScaled,
    attention_names,
    create_attention,
    create_feature,
    feature_names,
    register_attention,
)


def _assert_every_parameter_has_gradient(net: nn.Module) -> None:
    for name, p in net.named_parameters():
        assert p.grad is not None, f"{name} received no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} received an all-zero gradient"


def _has_parameters(net: nn.Module) -> bool:
    return any(True for _ in net.parameters())


# -----------------------------------------------------------------------------
# registry

def test_registry_holds_the_paper_nets() -> None:
    assert {"mnist_tanh", "deep_pool", "uniform"} <= set(attention_names())
    assert {"lenet1", "resnet_small", "ilse_colon"} <= set(feature_names())


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="mnist_tanh"):
        create_attention("nope", 1)
    with pytest.raises(ValueError, match="lenet1"):
        create_feature("nope", 1)


def test_duplicate_registration_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_attention("mnist_tanh")(lambda in_channels: nn.Identity())


# -----------------------------------------------------------------------------
# attention nets

@pytest.mark.parametrize("name", attention_names())
@pytest.mark.parametrize("channels", [1, 3])
def test_attention_forward_backward(name: str, channels: int) -> None:
    torch.manual_seed(0)
    net = create_attention(name, channels)
    x = torch.rand(2, channels, 27, 30)
    logits = net(x)
    assert logits.dim() == 3 and logits.shape[0] == 2
    assert torch.isfinite(logits).all()
    if not _has_parameters(net):
        pytest.skip(f"{name} has no parameters: nothing to train")
    (logits * torch.randn_like(logits)).sum().backward()
    _assert_every_parameter_has_gradient(net)


@pytest.mark.parametrize("name", attention_names())
@pytest.mark.parametrize("hw", [(27, 30), (16, 16), (9, 13)])
def test_attention_grid_tiles_the_input(name: str, hw: tuple[int, int]) -> None:
    """Cell i owns [offset + i*stride - stride/2, ... + stride): the first starts at pixel 0, every cell centre lies
    inside the input, and there are as many cells as whole strides fit (no cell missing, none extra)."""
    net = create_attention(name, 1)
    out_hw = net(torch.rand(1, 1, *hw)).shape[-2:]
    for size, cells, stride, offset in zip(hw, out_hw, net.grid.stride_yx, net.grid.offset_yx):
        assert offset - stride / 2 == 0
        assert cells == math.floor(size / stride)
        centres = [offset + i * stride for i in range(cells)]
        assert all(0 < c < size for c in centres)


def test_deep_pool_grid_is_stride_4() -> None:
    net = create_attention("deep_pool", 3)
    assert net(torch.rand(1, 3, 27, 30)).shape == (1, 6, 7)  # floor(h / 4), floor(w / 4)
    assert net.grid.stride_yx == (4.0, 4.0) and net.grid.offset_yx == (2.0, 2.0)
    with pytest.raises(ValueError, match="at least 4x4"):
        net(torch.rand(1, 3, 3, 30))


@pytest.mark.parametrize("name", attention_names())
def test_attention_receptive_field_is_centred_on_the_grid(name: str) -> None:
    """The input pixels that influence an interior cell form a box centred where the GridSpec puts that cell."""
    torch.manual_seed(0)
    net = create_attention(name, 2)
    if not _has_parameters(net):
        pytest.skip(f"{name} has no parameters: its output does not depend on the input")
    x = torch.rand(16, 2, 36, 40, requires_grad=True)  # a batch, so max-pool argmaxes cover every window pixel
    logits = net(x)
    i, j = logits.shape[1] // 2, logits.shape[2] // 2
    (grad,) = torch.autograd.grad(logits[:, i, j].sum(), x)
    support = (grad != 0).any(dim=0).any(dim=0)  # (h, w)
    rows = support.any(dim=1).nonzero().flatten()
    cols = support.any(dim=0).nonzero().flatten()
    assert 0 < rows.min() and rows.max() < x.shape[2] - 1, "pick a larger input: the field reaches the edge"
    assert 0 < cols.min() and cols.max() < x.shape[3] - 1, "pick a larger input: the field reaches the edge"
    centre_y = (rows.min() + rows.max() + 1).item() / 2  # pixel r covers [r, r + 1)
    centre_x = (cols.min() + cols.max() + 1).item() / 2
    assert centre_y == net.grid.offset_yx[0] + i * net.grid.stride_yx[0]
    assert centre_x == net.grid.offset_yx[1] + j * net.grid.stride_yx[1]


def test_uniform_is_zero_logits_without_parameters() -> None:
    net = create_attention("uniform", 3)
    assert not _has_parameters(net)
    assert torch.equal(net(torch.rand(2, 3, 5, 7)), torch.zeros(2, 5, 7))


def test_attention_rejects_wrong_channels() -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, h, w\)"):
        create_attention("mnist_tanh", 3)(torch.rand(1, 1, 8, 8))


# -----------------------------------------------------------------------------
# feature nets

@pytest.mark.parametrize("name", feature_names())
@pytest.mark.parametrize("patch", [27, 36])
def test_feature_forward_backward(name: str, patch: int) -> None:
    torch.manual_seed(0)
    net = create_feature(name, 3)
    x = torch.rand(3, 3, patch, patch)
    f = net(x)
    assert f.shape == (3, net.out_dim)
    assert torch.isfinite(f).all()
    torch.testing.assert_close(f.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    (f * torch.randn_like(f)).sum().backward()
    _assert_every_parameter_has_gradient(net)


@pytest.mark.parametrize("name", feature_names())
def test_feature_of_a_patch_ignores_its_batch(name: str) -> None:
    """No batch statistics: chunked Deep MIL, sampled ATS and the exact expectation must see the same features."""
    torch.manual_seed(0)
    net = create_feature(name, 1)
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(net(x)[:1], net(x[:1]))


@pytest.mark.parametrize("name", feature_names())
def test_feature_rejects_too_small_patches(name: str) -> None:
    net = create_feature(name, 1)
    with pytest.raises(ValueError, match="at least"):
        net(torch.rand(2, 1, 4, 4))


def test_l2_normalisation_is_guarded_at_zero() -> None:
    from ats_model.nets import l2_normalise

    x = torch.zeros(2, 5, requires_grad=True)
    y = l2_normalise(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


# -----------------------------------------------------------------------------
# BandScaled

def test_band_scaled_feeds_the_net_standardised_bands_and_keeps_its_contract() -> None:
    torch.manual_seed(0)
    net = create_feature("lenet1", 3, out_dim=8)
    mean, std = [0.06, 0.14, 0.24], [0.04, 0.12, 0.2]
    scaled = BandScaled(net, mean, std)
    x = torch.rand(5, 3, 32, 32)  # (M, C, P, P)
    by_hand = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(scaled(x), net(by_hand), rtol=0, atol=0)
    assert scaled.out_dim == 8 and scaled.in_channels == 3 and scaled.min_patch == net.min_patch
    attention = create_attention("mnist_tanh", 3)
    assert BandScaled(attention, mean, std).grid == attention.grid
    # statistics are buffers: they move with .to() and land in the state dict, and they are not trained
    assert {"mean", "std"} <= set(scaled.state_dict()) and not any(p is scaled.mean for p in scaled.parameters())


def test_band_scaled_of_the_data_it_was_measured_on_has_zero_mean_and_unit_std() -> None:
    x = torch.rand(64, 2, 8, 8) * torch.tensor([0.05, 0.6])[:, None, None] + torch.tensor([0.01, 0.3])[:, None, None]
    seen = BandScaled(nn.Identity(), x.mean((0, 2, 3)), x.std((0, 2, 3)))(x)  # (64, 2, 8, 8)
    torch.testing.assert_close(seen.mean((0, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(seen.std((0, 2, 3)), torch.ones(2), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("mean", "std", "match"), [
    ([0.1, 0.2], [0.1, 0.2], "takes 3 bands"),
    ([0.1, 0.2, 0.3], [0.1, 0.2], "one shape"),
    ([0.1, 0.2, 0.3], [0.1, 0.0, 0.3], "constant band"),
    ([0.1, float("nan"), 0.3], [0.1, 0.2, 0.3], "finite"),
])
def test_band_scaled_refuses_statistics_that_do_not_fit(mean, std, match) -> None:
    with pytest.raises(ValueError, match=match):
        BandScaled(create_feature("lenet1", 3), mean, std)


def test_glorot_init_zeroes_biases_so_an_empty_patch_has_a_zero_feature():
    from ats_model.nets import initialise

    net = initialise(create_feature("mnist_paper", 1, out_dim=8), "glorot")
    assert all(float(c.bias.abs().max()) == 0 for c in net.convs)
    bound = (6 / (1 * 49 + 8 * 49)) ** 0.5  # Glorot-uniform: U(-b, b), b = sqrt(6 / (fan_in + fan_out))
    assert 0.8 * bound < float(net.convs[0].weight.abs().max()) <= bound
    assert torch.equal(net(torch.zeros(2, 1, 20, 20)), torch.zeros(2, 8))  # blank patches add nothing when pooled
    torch.manual_seed(0)
    default = initialise(create_feature("mnist_paper", 1, out_dim=8), "torch")
    assert torch.allclose(default(torch.zeros(1, 1, 20, 20)).norm(dim=1), torch.ones(1))  # a constant unit vector
    with pytest.raises(ValueError, match="glorot"):
        initialise(default, "he")
