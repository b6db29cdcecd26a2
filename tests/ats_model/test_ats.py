"""ATSModel: wiring, evaluation modes, smoothing and masking; and that it actually learns where to look."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ats_model.ats import ATSConfig, ATSModel, ExactEvaluationTooLargeError, NoForegroundError, masked_entropy
from ats_model.geometry import cell_fractions
from ats_model.memory_reader import InMemoryReader, crop
from ats_model.nets import create_attention, create_feature
from ats_model.synthetic import BarsTask, make_split, mass_on_objects
from ats_model.training import evaluate, train_step


def _model(attention="mnist_tanh", **cfg) -> ATSModel:
    torch.manual_seed(0)
    config = ATSConfig(**{"n_patches": 3, "patch_hw": (16, 16), **cfg})
    return ATSModel(create_attention(attention, 1), create_feature("lenet1", 1, out_dim=16), 2, config)


def _images(n=2, size=64):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(1, size, size), dtype=np.uint8) for _ in range(n)]


def test_forward_shapes_boxes_and_backward_reach_every_parameter():
    reader = InMemoryReader(_images())
    model = _model()
    low = reader.low_res([0, 1], 8)  # (2, 1, 8, 8)
    out = model(low, reader, [0, 1], reader.level0_hw([0, 1]))
    assert out.logits.shape == (2, 2) and out.attention.shape == (2, 8, 8) and out.boxes.shape == (2, 3, 4)
    assert torch.allclose(out.attention.sum((1, 2)), torch.ones(2, dtype=out.attention.dtype))
    assert (out.boxes[..., 2:] == 16).all()
    model.loss(out, torch.tensor([0, 1])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_patches_read_are_the_boxes_of_the_sampled_cells():
    images = _images()
    seen = {}

    def read(ids, boxes):
        seen["boxes"] = boxes.clone()
        return InMemoryReader(images)(ids, boxes)

    model = _model(n_patches=4)
    reader = InMemoryReader(images)
    out = model(reader.low_res([0, 1], 8), read, [0, 1], reader.level0_hw([0, 1]))
    assert torch.equal(seen["boxes"], out.boxes)
    rows, cols = out.indices // 8, out.indices % 8
    assert torch.equal(out.boxes[..., 0], rows * 8 + 4 - 8) and torch.equal(out.boxes[..., 1], cols * 8 + 4 - 8)


def test_exact_mode_equals_the_full_weighted_sum():
    images = _images(size=32)
    reader = InMemoryReader(images)
    model = _model().double()
    low = reader.low_res([0, 1], 8).double()
    with torch.no_grad():
        out = model(low, lambda i, b: reader(i, b).double(), [0, 1], reader.level0_hw([0, 1]), mode="exact")
        a = out.attention.flatten(1)  # (2, 16)
        patches = torch.stack([torch.from_numpy(np.stack([crop(images[i], b) for b in out.boxes[i].numpy()]))
                               for i in range(2)]).double() / 255  # (2, 16, 1, 16, 16)
        f = model.feature_net(patches.flatten(0, 1)).reshape(2, 16, -1)
        expected_logits = model.classifier((a.unsqueeze(-1) * f).sum(1))
    torch.testing.assert_close(out.logits, expected_logits)


def test_exact_mode_over_budget_names_the_fix():
    reader = InMemoryReader(_images())
    model = _model(exact_budget_mb=0.01)
    with pytest.raises(ExactEvaluationTooLargeError, match="mode='topk'"):
        model(reader.low_res([0, 1], 8), reader, [0, 1], reader.level0_hw([0, 1]), mode="exact")


def test_topk_mode_is_deterministic_and_picks_the_largest_attention():
    reader = InMemoryReader(_images())
    model = _model()
    low, hw = reader.low_res([0, 1], 8), reader.level0_hw([0, 1])
    a = model(low, reader, [0, 1], hw, mode="topk")
    b = model(low, reader, [0, 1], hw, mode="topk")
    assert torch.equal(a.indices, b.indices) and torch.equal(a.logits, b.logits)
    assert torch.equal(a.indices, torch.topk(a.attention.flatten(1), 3, dim=1).indices)


def test_smoothing_mixes_in_uniform_mass_and_keeps_a_distribution():
    reader = InMemoryReader(_images())
    model = _model(smoothing=0.5)
    with torch.no_grad():
        model.attention_net.net[-1].bias.fill_(0)
        model.attention_net.net[-1].weight.mul_(100)  # very peaked raw attention
    out = model(reader.low_res([0, 1], 8), reader, [0, 1], reader.level0_hw([0, 1]))
    a = out.attention.flatten(1)
    assert torch.allclose(a.sum(1), torch.ones(2)) and bool((a >= 0.5 / 64 - 1e-7).all())


def test_padded_batch_masks_cells_outside_each_image():
    images = [np.full((1, 64, 64), 200, np.uint8), np.full((1, 32, 48), 200, np.uint8)]
    reader = InMemoryReader(images)
    low = torch.zeros(2, 1, 8, 8)
    low[0] = reader.low_res([0], 8)[0]
    low[1, :, :4, :6] = reader.low_res([1], 8)[0]
    model = _model(n_patches=5)
    out = model(low, reader, [0, 1], reader.level0_hw([0, 1]), low_hw=torch.tensor([[8, 8], [4, 6]]))
    assert out.attention[1, 4:].sum() == 0 and out.attention[1, :, 6:].sum() == 0
    assert bool(((out.indices[1] // 8) < 4).all() and ((out.indices[1] % 8) < 6).all())
    assert torch.isfinite(out.entropy).all()


def test_masked_entropy_has_finite_gradient_with_zero_attention():
    logits = torch.tensor([[0.0, 1.0, -math.inf]], requires_grad=True)
    logp = torch.log_softmax(logits, 1)
    h = masked_entropy(logp.exp(), logp)
    h.sum().backward()
    assert torch.isfinite(h).all() and torch.isfinite(logits.grad).all()


def test_bad_config_names_the_problem():
    with pytest.raises(ValueError, match="n_patches"):
        ATSConfig(n_patches=0)
    with pytest.raises(ValueError, match="estimator"):
        ATSConfig(estimator="mean")
    with pytest.raises(ValueError, match="mode"):
        _model()(torch.zeros(1, 1, 8, 8), lambda i, b: None, [0], torch.tensor([[64, 64]]), mode="greedy")


def _fit(attention: str, task: BarsTask, epochs: int, seed: int = 0):
    (train_imgs, train_y, _), (test_imgs, test_y, test_boxes) = make_split(task, 240, "train"), make_split(
        task, 100, "test")
    model = _model(attention, n_patches=6, entropy_lambda=0.01)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    train, test = InMemoryReader(train_imgs), InMemoryReader(test_imgs)
    gen = torch.Generator().manual_seed(seed)
    order = np.random.default_rng(seed)
    for _ in range(epochs):
        perm = order.permutation(len(train_imgs))
        for s in range(0, len(perm), 16):
            ids = perm[s : s + 16].tolist()
            train_step(model, opt, train.low_res(ids, 8), train, ids, train.level0_hw(ids),
                       torch.from_numpy(train_y[ids]), generator=gen)
    ids = list(range(len(test_imgs)))
    batches = [(test.low_res(ids, 8), ids, test.level0_hw(ids), torch.from_numpy(test_y))]
    error = evaluate(model, batches, test, mode="sampled", generator=gen)
    with torch.no_grad():
        low = test.low_res(ids, 8)
        att = model.attention_map(low)  # (B, Ha, Wa)
    mass = float(np.mean([mass_on_objects(a.numpy(), b, 8) for a, b in zip(att, test_boxes)]))
    return error, mass


@pytest.mark.slow
def test_ats_learns_and_attends_where_uniform_sampling_cannot():
    """Three 12px glyphs (bars: horizontal vs vertical) on a noisy 128px canvas, unreadable in the 16x16 view.
    Objects cover ~5% of the cells; ATS must find them (attention mass) and classify (test error)."""
    task = BarsTask(size=128)
    ats_error, ats_mass = _fit("mnist_tanh", task, epochs=6)
    uni_error, uni_mass = _fit("uniform", task, epochs=6)
    assert ats_mass > 0.3 > 0.1 > uni_mass  # uniform mass = the objects' share of cells (6.5%)
    assert ats_error <= 0.1 and ats_error < uni_error - 0.15


def test_baseline_running_mean_is_updated_after_use_and_only_in_training():
    reader = InMemoryReader(_images())
    model = _model(baseline=True, baseline_momentum=0.5)
    low, hw = reader.low_res([0, 1], 8), reader.level0_hw([0, 1])
    out = model(low, reader, [0, 1], hw)  # first step: no baseline yet, then mu = the pooled mean
    assert int(model.feature_mean_steps) == 1 and model.feature_mean.abs().sum() > 0
    before = model.feature_mean.clone()
    model.eval()
    model(low, reader, [0, 1], hw)
    assert torch.equal(model.feature_mean, before)  # evaluation leaves it alone
    model.train()
    model.loss(model(low, reader, [0, 1], hw), torch.tensor([0, 1])).backward()
    assert int(model.feature_mean_steps) == 2 and not torch.equal(model.feature_mean, before)
    assert out.logits.shape == (2, 2)


def test_nets_missing_their_contract_fail_at_construction_naming_the_fix():
    class NoGrid(torch.nn.Module):
        def forward(self, x):
            return x[:, 0]

    class NoOutDim(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)

    feature = create_feature("lenet1", 1, out_dim=8)
    with pytest.raises(TypeError, match="GridSpec"):
        ATSModel(NoGrid(), feature, 2)
    with pytest.raises(TypeError, match="out_dim"):
        ATSModel(create_attention("mnist_tanh", 1), NoOutDim(), 2)


def test_attention_map_is_a_distribution_over_each_images_own_cells():
    model = _model()
    low = torch.rand(2, 1, 8, 8)
    att = model.attention_map(low, torch.tensor([[8, 8], [4, 6]]))  # (2, 8, 8)
    assert att.shape == (2, 8, 8)
    assert torch.allclose(att.flatten(1).sum(1), torch.ones(2, dtype=att.dtype))
    assert float(att[1, 4:].abs().sum() + att[1, :, 6:].abs().sum()) == 0.0  # padding cells get no attention


def test_low_scale_places_boxes_with_the_exact_factor_when_sizes_do_not_divide():
    # A 60x60 image pooled 8x gives an 8x8 view (ceil); 60 / 8 = 7.5 is not the factor the view was made with.
    reader = InMemoryReader(_images(1, 60))
    model = _model(n_patches=64)
    low = reader.low_res([0], 8)  # (1, 1, 8, 8)
    exact = model.plan(low, reader.level0_hw([0]), low_scale=8.0, mode="exact")
    drift = model.plan(low, reader.level0_hw([0]), mode="exact")
    last = exact.boxes[0, -1].tolist()  # cell (7, 7) covers level-0 [56, 64): centre 60, patch 16 starts at 52
    assert last == [52, 52, 16, 16]
    assert drift.boxes[0, -1, :2].tolist() == [48, 48]  # 7.5 * 7.5 - 8 = 48.25: the drift the exact factor removes


def _tissue_case(min_tissue=0.5):
    """Two 64x64 images viewed at 8x8 (factor 8), 16-px patches; tissue only in the left half of image 0 and in the
    top-left quarter of image 1."""
    images = _images(size=64)
    reader = InMemoryReader(images)
    low = reader.low_res([0, 1], 8).double()  # (2, 1, 8, 8)
    tissue = torch.zeros(2, 8, 8, dtype=torch.float64)
    tissue[0, :, :4] = 1
    tissue[1, :4, :4] = 1
    return images, reader, low, tissue


def test_tissue_masks_cells_whose_patch_has_too_little_foreground_and_renormalises_over_the_rest():
    images, reader, low, tissue = _tissue_case()
    model = _model().double()
    share = cell_fractions(tissue, (8, 8), 8.0, (16, 16))  # (2, 8, 8)
    allowed = share >= 0.5
    assert 0 < int(allowed[1].sum()) < int(allowed[0].sum()) < 64
    with torch.no_grad():
        raw = model.attention_net(low)  # (2, 8, 8)
        out = model(low, lambda i, b: reader(i, b).double(), [0, 1], reader.level0_hw([0, 1]), mode="exact",
                    low_scale=8.0, tissue=tissue, min_tissue=0.5)
        expected = torch.softmax(raw.masked_fill(~allowed, -math.inf).flatten(1), 1)  # (2, 64)
        torch.testing.assert_close(out.attention.flatten(1), expected)
        drawn = model(low, lambda i, b: reader(i, b).double(), [0, 1], reader.level0_hw([0, 1]), low_scale=8.0,
                      tissue=tissue, min_tissue=0.5)
    assert bool(allowed.flatten(1).gather(1, drawn.indices).all())  # only allowed cells are ever drawn
    same = model.plan(low, reader.level0_hw([0, 1]), low_scale=8.0, tissue=tissue, min_tissue=0.0, mode="exact")
    plain = model.plan(low, reader.level0_hw([0, 1]), low_scale=8.0, mode="exact")
    torch.testing.assert_close(same.attention, plain.attention)  # min_tissue 0: no masking


def test_the_masked_estimate_is_unbiased_over_the_allowed_cells(monkeypatch):
    """Exact enumeration, one draw with replacement: sum_i a_i * (logits when cell i is drawn) equals the exact
    output over the allowed cells (the classifier is linear), and masked cells have probability 0."""
    import ats_model.ats as ats_module

    images, reader, low, tissue = _tissue_case()
    model = _model(n_patches=1, replace=True).double().eval()
    read = lambda i, b: reader(i, b).double()  # noqa: E731
    kwargs = {"low_scale": 8.0, "tissue": tissue, "min_tissue": 0.5}
    with torch.no_grad():
        exact = model(low, read, [0, 1], reader.level0_hw([0, 1]), mode="exact", **kwargs)
        a = exact.attention.flatten(1)  # (2, 64)
        total = torch.zeros_like(exact.logits)
        for cell in range(64):
            monkeypatch.setattr(ats_module, "sample", lambda *args, c=cell, **kw: torch.full((2, 1), c))
            drawn = model(low, read, [0, 1], reader.level0_hw([0, 1]), **kwargs)
            total += a[:, cell:cell + 1] * drawn.logits
    torch.testing.assert_close(total, exact.logits)
    assert bool((a[cell_fractions(tissue, (8, 8), 8.0, (16, 16)).flatten(1) < 0.5] == 0).all())


def test_an_image_without_enough_foreground_cells_is_a_typed_error_naming_its_row():
    _, reader, low, tissue = _tissue_case()
    model = _model(n_patches=3)
    tissue[1] = 0  # image 1: no foreground at all
    with pytest.raises(NoForegroundError, match="data.min_tissue") as info:
        model.plan(low.float(), reader.level0_hw([0, 1]), low_scale=8.0, tissue=tissue, min_tissue=0.5)
    assert info.value.rows == (1,)
    tissue[1, 0, 0] = 1  # one cell's worth: enough with replacement, not for 3 distinct draws
    with pytest.raises(NoForegroundError):
        model.plan(low.float(), reader.level0_hw([0, 1]), low_scale=8.0, tissue=tissue, min_tissue=0.25)
    plan = _model(n_patches=3, replace=True).plan(low.float(), reader.level0_hw([0, 1]), low_scale=8.0,
                                                  tissue=tissue, min_tissue=0.25)
    assert plan.indices.shape == (2, 3)


@pytest.mark.parametrize("feature", ["mnist_paper", "lenet1"])
def test_channels_last_features_equal_the_contiguous_ones(feature):
    torch.manual_seed(0)
    model = ATSModel(create_attention("mnist_tanh", 1), create_feature(feature, 1), 3)
    patches = torch.rand(2, 4, 1, 50, 50)  # (B, N, C, P, P)
    plain = model.features(patches)
    model.use_channels_last()
    assert model.feature_net.state_dict() and all(
        w.is_contiguous(memory_format=torch.channels_last) for w in model.feature_net.parameters() if w.dim() == 4)
    torch.testing.assert_close(model.features(patches), plain, rtol=1e-5, atol=1e-5)
