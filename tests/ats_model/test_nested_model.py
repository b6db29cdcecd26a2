"""NestedATSModel and the region geometry it uses: regions partition the image, the halo is cropped back, the fine
net runs once per distinct drawn region, only drawn patches are read, masks hold, and the evaluation modes agree."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ats_model import nested
from ats_model.contracts import to_unit_float
from ats_model.geometry import GridSpec, RegionCells, RegionLayout, cells_to_regions
from ats_model.memory_reader import InMemoryReader, crop
from ats_model.nested import NestedSampling, smoothed_attention
from ats_model.nested_model import NestedATSConfig, NestedATSModel, _pool_regions
from ats_model.nets import create_attention, create_feature


# -----------------------------------------------------------------------------
# geometry of regions and positions

def test_region_layout_boxes_grid_and_alignment():
    layout = RegionLayout((64, 32), downsample=8, halo=2)
    assert layout.fine_hw == (8, 4) and layout.crop_hw == (12, 8)
    assert layout.grid_hw(torch.tensor([[100, 70], [130, 10]])) == (3, 3)
    ids = torch.tensor([[0, 4, 8]])
    assert layout.boxes(ids, (3, 3)).tolist() == [[[0, 0, 64, 32], [64, 32, 64, 32], [128, 64, 64, 32]]]
    assert layout.boxes(ids[:, :1], (3, 3), with_halo=True).tolist() == [[[-16, -16, 96, 64]]]
    assert layout.inside(torch.tensor([[100, 70]]), (3, 3)).tolist() == [[True, True, True, True, True, True,
                                                                         False, False, False]]
    with pytest.raises(ValueError, match="multiples of the fine downsample"):
        RegionLayout((60, 32), downsample=8)
    RegionLayout((4096, 4096), 16).check_chunk_aligned(256)  # one 256-px chunk at 1/16
    with pytest.raises(ValueError, match="multiples of downsample"):
        RegionLayout((2048, 4096), 16).check_chunk_aligned(256)


def test_region_cells_crop_the_halo_back_and_partition_the_image():
    """Stride-1 'same' fine net: positions are the region's own fine px; every level-0 fine block is one position of
    one region. A stride-4 net (deep_pool's grid) keeps the cells centred inside the region."""
    layout = RegionLayout((32, 32), downsample=4, halo=2)
    cells = RegionCells.of(layout, GridSpec(), (12, 12))
    assert cells.first_yx == (2, 2) and cells.hw == (8, 8)
    assert RegionCells.of(RegionLayout((64, 64), 4, halo=4), GridSpec((4.0, 4.0), (2.0, 2.0)), (6, 6)).hw == (4, 4)
    grid = (2, 3)
    regions = torch.arange(6)[None]  # (1, R)
    positions = torch.arange(64).expand(1, 6, 64)  # (1, R, P)
    centres = cells.centres_level0(layout, regions, positions, grid)  # (1, R, P, 2)
    blocks = torch.floor(centres / 4).long().reshape(-1, 2)  # fine px of every position
    assert len({tuple(x) for x in blocks.tolist()}) == 6 * 64  # distinct: positions never overlap
    assert blocks[:, 0].max() == 15 and blocks[:, 1].max() == 23 and blocks.min() == 0
    origin = layout.origins(regions, grid)[0]  # (R, 2)
    inside = (centres[0] >= origin[:, None]) & (centres[0] < origin[:, None] + 32)
    assert bool(inside.all())
    boxes = cells.boxes(layout, regions, positions, grid, (16, 16))  # (1, R, P, 4)
    assert boxes[0, 0, 0].tolist() == [2 - 8, 2 - 8, 16, 16]  # centre (2, 2): fine px 0's centre at level 0
    valid = cells.valid(layout, regions, grid, torch.tensor([[50, 70]]))  # (1, R, P): 13 x 18 fine px inside
    assert valid[0].sum(-1).tolist() == [64, 64, 8 * 2, 5 * 8, 5 * 8, 5 * 2]


def test_coarse_cells_map_to_the_region_they_lie_in():
    layout = RegionLayout((32, 32), downsample=4)
    ids = cells_to_regions((4, 5), 16.0, GridSpec(), layout, (2, 3))  # cell centres 8, 24, 40, 56, 72 px
    assert ids.reshape(4, 5).tolist() == [[0, 0, 1, 1, 2], [0, 0, 1, 1, 2], [3, 3, 4, 4, 5], [3, 3, 4, 4, 5]]
    assert cells_to_regions((1, 7), 16.0, GridSpec(), layout, (1, 3))[0, 6].item() == -1  # centre 104 > 96


# -----------------------------------------------------------------------------
# the model

class _RegionReader:
    """Fine-level crops from in-memory (C, H, W) arrays: level-0 crop (fill 0), then the mean of d x d blocks."""

    def __init__(self, images):
        self.images, self.calls = images, []

    def __call__(self, image_ids, boxes, downsample):
        self.calls.append((list(image_ids), boxes.clone(), downsample))
        crops = np.stack([crop(self.images[int(i)], box) for i, box in zip(image_ids, boxes.numpy())])
        return torch.nn.functional.avg_pool2d(to_unit_float(crops), downsample)  # (U, C, h / d, w / d)


class _Counting(torch.nn.Module):
    """Wraps a net and records the shape of every input."""

    def __init__(self, net):
        super().__init__()
        self.net, self.grid, self.shapes = net, net.grid, []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return self.net(x)


def _nested_model(**sampling):
    torch.manual_seed(0)
    cfg = NestedATSConfig(NestedSampling(**{"n_regions": 2, "n_patches_per_region": 2, **sampling}),
                          region_px=(32, 32), fine_downsample=4, halo=1, patch_hw=(16, 16))
    fine = _Counting(create_attention("mnist_tanh", 1))
    return NestedATSModel(create_attention("mnist_tanh", 1), fine, create_feature("lenet1", 1, out_dim=8), 2, cfg)


def _batch(sizes=((64, 64), (64, 64))):
    """Images (uint8), their in-memory readers and a zero-padded coarse view at 1/16 with each image's own size."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(1, h, w), dtype=np.uint8) for h, w in sizes]
    patches = InMemoryReader(images)
    views = [patches.low_res([i], 16)[0] for i in range(len(images))]  # (C, ceil(h / 16), ceil(w / 16))
    coarse = torch.zeros(len(images), 1, 4, 4)
    for i, v in enumerate(views):
        coarse[i, :, : v.shape[1], : v.shape[2]] = v
    coarse_hw = torch.tensor([v.shape[1:] for v in views])
    return images, patches, _RegionReader(images), coarse, coarse_hw, patches.level0_hw(range(len(images)))


def test_model_forward_backward_reaches_every_parameter_and_reads_what_it_draws():
    images, patches, regions_reader, coarse, coarse_hw, level0_hw = _batch()
    model = _nested_model()
    seen = {}

    def read(ids, boxes):
        seen["boxes"] = boxes.clone()
        return patches(ids, boxes)

    out = model(coarse, regions_reader, read, [0, 1], level0_hw, coarse_scale=16.0, coarse_hw=coarse_hw)
    assert out.logits.shape == (2, 2) and out.region_attention.shape == (2, 2, 2)
    assert out.slot_attention.shape == (2, 2, 8, 8) and out.boxes.shape == (2, 2, 2, 4)
    model.loss(out, torch.tensor([0, 1])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert torch.equal(seen["boxes"], out.boxes.reshape(2, 4, 4))  # every slot full: all drawn, in draw order
    # the fine net saw each distinct drawn region once, with its halo; positions lie inside their own region
    ids, boxes, d = regions_reader.calls[0]
    assert d == 4 and model.fine_net.shapes[-1] == (len(ids), 1, 10, 10) and len(ids) == 4  # WOR: 2 + 2 distinct
    layout = model.config.layout
    for image in range(2):  # the distinct regions of each image, each with its halo
        asked = {tuple(box) for i, box in zip(ids, boxes.tolist()) if i == image}
        drawn = layout.boxes(out.regions.regions[image], (2, 2), with_halo=True)
        assert asked == {tuple(box) for box in drawn.tolist()}
    centres = out.boxes[..., :2] + 8  # (B, M, L, 2)
    origin = layout.origins(out.regions.regions, (2, 2))[:, :, None]  # (B, M, 1, 2)
    assert bool(((centres >= origin) & (centres < origin + 32)).all())


def test_model_runs_the_fine_net_once_per_distinct_region():
    _, patches, regions_reader, coarse, coarse_hw, level0_hw = _batch()
    model = _nested_model(n_regions=6, outer_replace=True)
    out = model(coarse, regions_reader, patches, [0, 1], level0_hw, coarse_scale=16.0,
                generator=torch.Generator().manual_seed(1))
    distinct = sum(len(set(row.tolist())) for row in out.regions.regions)
    assert distinct < 12 and model.fine_net.shapes[-1][0] == distinct and out.regions_per_sample == distinct / 2
    assert out.attention_px_per_sample == 16 + distinct / 2 * 100


def test_model_never_draws_outside_a_smaller_image_of_the_batch():
    """Image 1 is 40 x 30 px inside a 64 x 64 batch: regions 1 and 3 (x >= 32) have no position inside it and are
    masked; positions of region 0/2 past the image edge are masked too."""
    _, patches, regions_reader, coarse, coarse_hw, level0_hw = _batch(((64, 64), (40, 30)))
    model = _nested_model(n_regions=2, n_patches_per_region=3, outer_replace=True)
    gen = torch.Generator().manual_seed(0)
    out = model(coarse, regions_reader, patches, [0, 1], level0_hw, coarse_scale=16.0, coarse_hw=coarse_hw,
                n_draws=30, generator=gen)
    model.loss(out, torch.tensor([0, 1])).backward()  # -inf regions and positions: finite gradients, no NaN
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    second = slice(30, 60)  # rows b * n_draws + i
    assert set(out.regions.draws[second].flatten().tolist()) <= {0, 2}
    assert out.region_attention[1, :, 1].sum() == 0
    centres = out.boxes[second][..., :2] + 8  # (30, M, L, 2)
    drawn = out.positions.mask()[second]
    assert bool((centres[drawn] < torch.tensor([40, 32])).all())  # fine px 7 (level 0 [28, 32)) overlaps the image
    assert out.logits.shape == (2, 2) and out.entropy.shape == (2,)
    # attention px count each image's own coarse view (4 x 4 and 3 x 2), not the padded batch's
    assert out.attention_px_per_sample - out.regions_per_sample * 100 == pytest.approx((16 + 6) / 2)


def test_model_evaluation_modes():
    _, patches, regions_reader, coarse, coarse_hw, level0_hw = _batch(((64, 64), (40, 30)))
    model = _nested_model(n_regions=4, n_patches_per_region=64).double()
    fine_reader = lambda i, b, d: regions_reader(i, b, d).double()  # noqa: E731
    args = (coarse.double(), fine_reader, lambda i, b: patches(i, b).double(), [0, 1], level0_hw)
    kw = dict(coarse_scale=16.0, coarse_hw=coarse_hw)
    with torch.no_grad():
        exact = model(*args, mode="exact", **kw)
        topk = model(*args, mode="topk", **kw)  # every region and position: the same sum, renormalised
        again = model(*args, mode="topk", **kw)
        small = _nested_model(n_regions=1, n_patches_per_region=3).double()
        top1 = small(*args, mode="topk", **kw)
    torch.testing.assert_close(topk.logits, exact.logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(topk.entropy, exact.entropy, rtol=0, atol=1e-12)
    assert torch.equal(topk.logits, again.logits) and torch.equal(small(*args, mode="topk", **kw).logits, top1.logits)
    assert top1.positions.sizes.tolist() == [[3], [3]]
    # exact inner with outer WOR drawing every valid region: the unordered outer weights are A itself -> exact
    model_wor = _nested_model(n_regions=2, n_patches_per_region=1).double()
    model_wor.load_state_dict(model.state_dict())
    with torch.no_grad():
        inner = model_wor(args[0][1:], fine_reader, args[2], [1], level0_hw[1:], mode="exact_inner",
                          coarse_scale=16.0, coarse_hw=coarse_hw[1:])
        ex1 = model_wor(args[0][1:], fine_reader, args[2], [1], level0_hw[1:], mode="exact",
                        coarse_scale=16.0, coarse_hw=coarse_hw[1:])
    torch.testing.assert_close(inner.logits, ex1.logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(inner.logits, exact.logits[1:], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="n_draws"):
        model(*args, mode="topk", n_draws=2, **kw)


def test_attention_is_what_topk_mode_reads_without_reading_a_patch():
    _, patches, regions_reader, coarse, coarse_hw, level0_hw = _batch(((64, 64), (40, 30)))
    model = _nested_model(n_regions=2, n_patches_per_region=3)
    kw = dict(coarse_scale=16.0, coarse_hw=coarse_hw)
    read = []
    seen = model.attention(coarse, regions_reader, [0, 1], level0_hw, **kw)
    with torch.no_grad():
        topk = model(coarse, regions_reader, lambda i, b: read.append(b) or patches(i, b), [0, 1], level0_hw,
                     mode="topk", **kw)
    assert len(read) == 1  # the forward read patches; attention() did not (no patch reader to call)
    assert seen.region_grid == (2, 2) and seen.cells.hw == (8, 8)
    assert torch.equal(seen.regions.regions, topk.regions.regions)
    torch.testing.assert_close(seen.region_attention, topk.region_attention.flatten(1))
    torch.testing.assert_close(seen.fine_attention, topk.slot_attention.flatten(2))
    torch.testing.assert_close(seen.fine_attention.sum(-1), torch.ones(2, 2))
    assert seen.region_attention[1].reshape(2, 2)[:, 1].sum() == 0  # outside image 1: no attention


def test_model_exact_modes_check_the_budget_before_reading():
    _, patches, regions_reader, coarse, coarse_hw, level0_hw = _batch()
    model = _nested_model()
    model.config = NestedATSConfig(model.config.sampling, (32, 32), 4, 1, (16, 16), exact_budget_mb=0.01)
    for mode, instead in (("exact", "mode='exact_inner'"), ("exact_inner", "mode='sampled'")):
        with pytest.raises(nested.NestedExactTooLargeError, match=instead):
            model(coarse, regions_reader, patches, [0, 1], level0_hw, coarse_scale=16.0, mode=mode)
    assert regions_reader.calls == [] and patches.patches_read == 0


def test_region_logits_are_the_log_sum_exp_of_their_cells():
    logits = torch.tensor([[0.5, -1.0, 2.0, -math.inf, 0.3], [1.0, 1.0, -math.inf, -math.inf, 4.0]],
                          dtype=torch.float64, requires_grad=True)
    cell_region = torch.tensor([[0, 0, 1, 1, -1], [0, 0, 1, 1, 2]])
    pooled = _pool_regions(logits, cell_region, 3)  # (B, R)
    x = logits.detach()
    want = [[float(torch.logsumexp(x[0, :2], 0)), float(x[0, 2]), -math.inf],
            [float(torch.logsumexp(x[1, :2], 0)), -math.inf, float(x[1, 4])]]
    torch.testing.assert_close(pooled.detach(), torch.tensor(want, dtype=torch.float64), rtol=1e-15, atol=0)
    smoothed_attention(pooled)[0][:, 0].sum().backward()
    assert bool(torch.isfinite(logits.grad).all()) and logits.grad[0, 4] == 0


def test_configs_reject_what_cannot_work_and_name_the_fix():
    with pytest.raises(ValueError, match="multiples of the fine downsample"):
        NestedATSConfig(region_px=(30, 30), fine_downsample=4)
    with pytest.raises(ValueError, match="outer_estimator"):
        NestedSampling(outer_estimator="exact")
    with pytest.raises(ValueError, match="allocation"):
        NestedSampling(allocation="random")
    assert NestedSampling(3, 2, outer_replace=True, allocation="counts").n_region_draws == 6
