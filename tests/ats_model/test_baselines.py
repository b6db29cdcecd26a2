"""Baselines: gated-attention MIL pooling, Deep MIL over a regular patch grid read through a patch reader, and the
CNN on the downsampled whole image."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from ats_model.baselines import CNNBaseline, DeepMIL, GatedAttentionMIL, downsample_image
from ats_model.nets import create_feature

PATCH = (16, 16)


def _assert_every_parameter_has_gradient(net: nn.Module) -> None:
    for name, p in net.named_parameters():
        assert p.grad is not None, f"{name} received no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} received an all-zero gradient"


class NumpyReader:
    """In-test patch reader: zero-padded slicing of (C, H, W) uint8 arrays; records every box it reads."""

    def __init__(self, images: dict[str, np.ndarray]) -> None:
        self.images = images
        self.boxes: dict[str, list[tuple[int, int, int, int]]] = {k: [] for k in images}

    def __call__(self, image_ids: list, boxes: Tensor) -> Tensor:
        out = []
        for image_id, rows in zip(image_ids, boxes.tolist()):
            image = self.images[image_id]
            c, hh, ww = image.shape
            patches = []
            for y0, x0, h, w in rows:
                self.boxes[image_id].append((y0, x0, h, w))
                patch = np.zeros((c, h, w), dtype=image.dtype)
                ys, xs = max(y0, 0), max(x0, 0)
                ye, xe = min(y0 + h, hh), min(x0 + w, ww)
                if ye > ys and xe > xs:
                    patch[:, ys - y0 : ye - y0, xs - x0 : xe - x0] = image[:, ys:ye, xs:xe]
                patches.append(patch)
            out.append(np.stack(patches))
        return torch.from_numpy(np.stack(out))  # (B, M, C, h, w)


def _images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "big": rng.integers(0, 256, size=(1, 40, 36), dtype=np.uint8),
        "small": rng.integers(0, 256, size=(1, 29, 45), dtype=np.uint8),
    }


def _deep_mil(chunk: int = 5, stride: tuple[int, int] = (8, 8)) -> DeepMIL:
    torch.manual_seed(0)
    return DeepMIL(create_feature("lenet1", 1, out_dim=16), n_classes=3, patch_hw=PATCH, stride_hw=stride, chunk=chunk)


SIZES = torch.tensor([[40, 36], [29, 45]])


# -----------------------------------------------------------------------------
# gated attention pooling

def test_gated_attention_sums_to_one_and_ignores_masked_patches() -> None:
    torch.manual_seed(0)
    mil = GatedAttentionMIL(create_feature("lenet1", 1, out_dim=16), n_classes=2, hidden=8)
    patches = torch.rand(2, 5, 1, 16, 16)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    out = mil(patches, mask)
    assert out.logits.shape == (2, 2) and out.attention.shape == (2, 5)
    torch.testing.assert_close(out.attention.sum(dim=1), torch.ones(2))
    assert (out.attention[1, 3:] == 0).all()
    alone = mil(patches[1:, :3])  # the masked patches change nothing
    torch.testing.assert_close(out.logits[1:], alone.logits)


def test_gated_attention_is_permutation_invariant_and_chunk_invariant() -> None:
    torch.manual_seed(0)
    mil = GatedAttentionMIL(create_feature("ilse_colon", 3, out_dim=32), n_classes=2, hidden=8)
    patches = torch.rand(1, 6, 3, 27, 27)
    perm = torch.randperm(6)
    out = mil(patches)
    torch.testing.assert_close(mil(patches[:, perm], chunk=4).logits, out.logits)
    torch.testing.assert_close(mil(patches[:, perm]).attention, out.attention[:, perm])


# -----------------------------------------------------------------------------
# Deep MIL

def test_deep_mil_forward_backward_on_images_of_different_sizes() -> None:
    model = _deep_mil()
    reader = NumpyReader(_images())
    out = model(["big", "small"], SIZES, reader)
    # grid per axis: ceil((size - 16) / 8) + 1 -> big (4, 4), small (3, 5); padded to (4, 5)
    assert out.grid_hw.tolist() == [[4, 4], [3, 5]]
    assert out.logits.shape == (2, 3) and out.attention.shape == (2, 4, 5)
    assert torch.isfinite(out.logits).all()
    torch.testing.assert_close(out.attention.sum(dim=(1, 2)), torch.ones(2))
    assert (out.attention[0, :, 4:] == 0).all() and (out.attention[1, 3:, :] == 0).all()
    assert (out.attention[0, :, :4] > 0).all() and (out.attention[1, :3, :] > 0).all()
    (out.logits * torch.randn_like(out.logits)).sum().backward()
    _assert_every_parameter_has_gradient(model)


def test_deep_mil_grid_covers_each_image() -> None:
    model = _deep_mil()
    images = _images()
    reader = NumpyReader(images)
    model(["big", "small"], SIZES, reader)
    for image_id, image in images.items():
        covered = np.zeros(image.shape[1:], dtype=bool)
        for y0, x0, h, w in reader.boxes[image_id]:
            assert (h, w) == PATCH
            covered[max(y0, 0) : y0 + h, max(x0, 0) : x0 + w] = True
        assert covered.all(), f"{image_id}: pixels outside every patch"


def test_deep_mil_batch_padding_and_chunks_change_nothing() -> None:
    """Each image's logits are the same alone or in a padded batch, and for any chunk size."""
    reader = NumpyReader(_images())
    batch = _deep_mil(chunk=5)(["big", "small"], SIZES, reader)
    model = _deep_mil(chunk=1000)
    torch.testing.assert_close(model(["big", "small"], SIZES, reader).logits, batch.logits)
    alone = model(["small"], SIZES[1:], reader)
    torch.testing.assert_close(alone.logits, batch.logits[1:])
    torch.testing.assert_close(alone.attention[0], batch.attention[1, :3, :5])


@pytest.mark.parametrize("stride", [(7, 8), (8, 3)])
def test_deep_mil_refuses_a_stride_below_half_a_patch(stride: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match=r"stride_hw >= \(8, 8\)"):
        _deep_mil(stride=stride)


def test_deep_mil_refuses_a_stride_above_the_patch() -> None:
    with pytest.raises(ValueError, match="stride_hw <="):
        _deep_mil(stride=(17, 16))


def test_deep_mil_names_a_reader_that_returns_the_wrong_shape() -> None:
    model = _deep_mil()
    with pytest.raises(ValueError, match="patch reader returned"):
        model(["big"], SIZES[:1], lambda ids, boxes: torch.zeros(1, 1, 1, 16, 16))


# -----------------------------------------------------------------------------
# CNN baseline

def test_cnn_baseline_forward_backward() -> None:
    torch.manual_seed(0)
    net = CNNBaseline(3, n_classes=4, width=4, stages=3)
    x = downsample_image(torch.rand(2, 3, 45, 37), 0.5)
    assert x.shape == (2, 3, 23, 19)  # round half up: 22.5 -> 23, 18.5 -> 19
    logits = net(x)
    assert logits.shape == (2, 4) and torch.isfinite(logits).all()
    (logits * torch.randn_like(logits)).sum().backward()
    _assert_every_parameter_has_gradient(net)


def test_downsample_image_is_an_area_mean() -> None:
    x = torch.rand(1, 2, 8, 6)
    expected = x.view(1, 2, 4, 2, 3, 2).mean(dim=(3, 5))  # 2x2 block means
    torch.testing.assert_close(downsample_image(x, 0.5), expected)
    assert downsample_image(x, 1.0) is x
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        downsample_image(x, 1.5)
