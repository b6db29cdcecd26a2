"""Proof by exact enumeration that `expected` and its gradients are unbiased, with negative controls.

For every ordered draw we know its probability, so E[forward] and E[gradient] are finite sums (see enumeration.py).
The same harness applied to the 2019 reference code's attention gradient, and to the ports' inclusive cumsum,
must report their bias: that is what shows the check can fail.
"""
from __future__ import annotations

import pytest
import torch

from ats_model.estimator import expected, ordered_weights, topk_average
from tests.ats_model.enumeration import expectation, truth

TOL = 1e-9


def _problem(k: int, feature_shape: tuple[int, ...], seed: int = 0, batch: int = 3):
    gen = torch.Generator().manual_seed(seed * 1000 + k)
    scales = torch.tensor([0.5, 1.5, 3.0][:batch], dtype=torch.float64).unsqueeze(1)  # rows differ in peakedness
    logits = torch.randn(batch, k, generator=gen, dtype=torch.float64) * scales
    features = torch.randn(batch, k, *feature_shape, generator=gen, dtype=torch.float64)
    g = torch.randn(batch, *feature_shape, generator=gen, dtype=torch.float64)
    return logits, features, g


class Reference2019(torch.autograd.Function):
    """The 2019 authors' attention gradient for draw m (biased for N >= 2), on the ordered forward. Negative control:
    (1/N) <g, (p_m/a_m)(sum_{j<m} a_j f_j + p_m f_m) + sum_{j<m} f_j - m f_m>."""

    @staticmethod
    def forward(ctx, attention, features, indices):
        c, _ = ordered_weights(attention, indices)
        ctx.save_for_backward(attention, features, indices)
        return (c.unsqueeze(-1) * features.flatten(2)).sum(1).reshape(features.shape[:1] + features.shape[2:])

    @staticmethod
    def backward(ctx, g):
        attention, features, indices = ctx.saved_tensors
        n = indices.shape[1]
        f = features.flatten(2)  # (B, n, D)
        a = attention.gather(1, indices)  # (B, n)
        p = 1 - (a.cumsum(1) - a)  # (B, n) exclusive
        prefix_af = (a.unsqueeze(-1) * f).cumsum(1) - a.unsqueeze(-1) * f  # (B, n, D) sum_{j<m} a_j f_j
        prefix_f = f.cumsum(1) - f  # (B, n, D)
        m = torch.arange(n, dtype=f.dtype).reshape(1, n, 1)
        term = (p / a).unsqueeze(-1) * (prefix_af + p.unsqueeze(-1) * f) + prefix_f - m * f  # (B, n, D)
        ga = (term * g.flatten(1).unsqueeze(1)).sum(-1) / n  # (B, n)
        grad_a = torch.zeros_like(attention).scatter_add_(1, indices, ga)
        c, _ = ordered_weights(attention, indices)
        return grad_a, c.reshape(*c.shape, *([1] * (features.dim() - 2))) * g.unsqueeze(1), None


def _ports_inclusive_forward(attention, indices, features):
    """The PyTorch ports' forward: p_m = 1 - sum_{j<=m} a_j (inclusive cumsum). Negative control for the forward."""
    n = indices.shape[1]
    a = attention.gather(1, indices)
    p = 1 - a.cumsum(1)
    c = (p + (n - 1 - torch.arange(n, dtype=a.dtype)) * a) / n
    return (c.reshape(*c.shape, *([1] * (features.dim() - 2))) * features).sum(1)


CASES = [(k, n) for k in (4, 5, 6) for n in sorted({1, 2, 3, k})]
SHAPES = [(3,), (2, 2)]


@pytest.mark.parametrize("feature_shape", SHAPES, ids=str)
@pytest.mark.parametrize("k,n", CASES)
@pytest.mark.parametrize("replace", [False, True], ids=["without", "with"])
def test_expected_is_unbiased_by_enumeration(k, n, replace, feature_shape):
    logits, features, g = _problem(k, feature_shape)
    est = expectation(lambda a, i, f: expected(a, i, f, replace=replace, estimator="ordered"),
                      logits, features, g, n, replace)
    ref = truth(logits, features, g)
    torch.testing.assert_close(est.forward, ref.forward, rtol=0, atol=TOL)
    # (replace=True ignores `estimator`; the without-replacement default, "unordered", is tested below)
    torch.testing.assert_close(est.grad_features, ref.grad_features, rtol=0, atol=TOL)
    torch.testing.assert_close(est.grad_attention, ref.grad_attention, rtol=0, atol=TOL)
    torch.testing.assert_close(est.grad_logits, ref.grad_logits, rtol=0, atol=TOL)


UNORDERED_CASES = [(k, n) for k in (4, 5, 6, 7) for n in sorted({1, 2, 3, k})]


@pytest.mark.parametrize("scale", [1.0, 3.0, 30.0])
@pytest.mark.parametrize("feature_shape", SHAPES, ids=str)
@pytest.mark.parametrize("k,n", UNORDERED_CASES)
def test_unordered_estimator_is_unbiased_by_enumeration(k, n, feature_shape, scale):
    logits, features, g = _problem(k, feature_shape)
    logits = logits * scale
    est = expectation(lambda a, i, f: expected(a, i, f, replace=False, estimator="unordered"),
                      logits, features, g, n, replace=False)
    ref = truth(logits, features, g)
    torch.testing.assert_close(est.forward, ref.forward, rtol=0, atol=1e-12)
    torch.testing.assert_close(est.grad_features, ref.grad_features, rtol=0, atol=1e-12)
    torch.testing.assert_close(est.grad_logits, ref.grad_logits, rtol=0, atol=1e-12)


def test_unordered_is_the_default_and_exact_when_every_position_is_drawn():
    logits, features, g = _problem(5, (3,))
    a = torch.softmax(logits, 1)
    idx = torch.stack([torch.randperm(5) for _ in range(3)])
    picked = features.gather(1, idx.unsqueeze(-1).expand(-1, -1, 3))
    out = expected(a, idx, picked, replace=False)  # default estimator
    torch.testing.assert_close(out, (a.unsqueeze(-1) * features).sum(1), rtol=0, atol=1e-15)
    a_leaf = a.clone().requires_grad_(True)
    expected(a_leaf, idx, picked, replace=False).mul(g).sum().backward()
    torch.testing.assert_close(a_leaf.grad, truth(logits, features, g).grad_attention, rtol=0, atol=1e-12)
    # The ordered estimator still depends on the draw order at N = K: unbiased, but not exact.
    ordered = expected(a, idx, picked, replace=False, estimator="ordered")
    assert (ordered - out).abs().max() > 1e-3


@pytest.mark.parametrize("replace,estimator", [(False, "ordered"), (False, "unordered"), (True, "ordered")])
def test_constant_baseline_keeps_the_logit_gradient_unbiased(replace, estimator):
    """<g, f - mu> in the attention gradient: E[logit gradient] unchanged (weights sum to 1, softmax ignores
    constants); the raw attention gradient is shifted by -<g, mu>, so only the former is unbiased."""
    logits, features, g = _problem(5, (3,))
    mu = torch.tensor([0.7, -1.1, 2.0], dtype=torch.float64)
    n = 3
    est = expectation(lambda a, i, f: expected(a, i, f, replace=replace, estimator=estimator, baseline=mu),
                      logits, features, g, n, replace)
    ref = truth(logits, features, g)
    torch.testing.assert_close(est.forward, ref.forward, rtol=0, atol=1e-12)
    torch.testing.assert_close(est.grad_logits, ref.grad_logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(est.grad_features, ref.grad_features, rtol=0, atol=1e-12)
    shift = -(g * mu).sum(1, keepdim=True)  # E[raw attention gradient] = h - <g, mu>
    torch.testing.assert_close(est.grad_attention, ref.grad_attention + shift, rtol=0, atol=1e-12)


def test_truth_matches_finite_differences():
    """The reference gradient itself, checked against central differences of the full model."""
    logits, features, g = _problem(5, (3,))
    ref = truth(logits, features, g)
    eps = 1e-6
    for b in range(logits.shape[0]):
        for i in range(logits.shape[1]):
            up, down = logits.clone(), logits.clone()
            up[b, i] += eps
            down[b, i] -= eps
            full = lambda z: (torch.softmax(z, 1).unsqueeze(-1) * features).sum(1)[b] @ g[b]
            numeric = (full(up) - full(down)) / (2 * eps)
            assert abs(float(numeric) - float(ref.grad_logits[b, i])) < 1e-8


@pytest.mark.parametrize("k,n", [(k, n) for k, n in CASES if n >= 2])
def test_negative_control_2019_gradient_is_biased(k, n):
    logits, features, g = _problem(k, (3,))
    est = expectation(lambda a, i, f: Reference2019.apply(a, f, i), logits, features, g, n, replace=False)
    ref = truth(logits, features, g)
    torch.testing.assert_close(est.forward, ref.forward, rtol=0, atol=TOL)  # same forward: only the gradient is off
    assert (est.grad_attention - ref.grad_attention).abs().max() > 1e-3
    assert (est.grad_logits - ref.grad_logits).abs().max() > 1e-3


def test_negative_control_2019_gradient_is_unbiased_at_n1():
    """At N = 1 the 2019 formula reduces to ours: the harness must not flag it."""
    logits, features, g = _problem(5, (3,))
    est = expectation(lambda a, i, f: Reference2019.apply(a, f, i), logits, features, g, 1, replace=False)
    torch.testing.assert_close(est.grad_logits, truth(logits, features, g).grad_logits, rtol=0, atol=TOL)


@pytest.mark.parametrize("k,n", [(5, 2), (6, 3)])
def test_negative_control_inclusive_cumsum_biases_forward(k, n):
    logits, features, g = _problem(k, (3,))
    est = expectation(_ports_inclusive_forward, logits, features, g, n, replace=False)
    assert (est.forward - truth(logits, features, g).forward).abs().max() > 1e-3


def test_no_autograd_shortcut_plain_autograd_misses_attention_gradient_at_n1():
    """Why the backward is custom: differentiating the ordered forward with autograd gives zero at N = 1."""
    logits, features, g = _problem(5, (3,))

    def autograd_forward(a, i, f):
        c, _ = ordered_weights(a, i)  # differentiable in a, but p_0 = sum(a) = 1 for every draw
        return (c.unsqueeze(-1) * f).sum(1)

    est = expectation(autograd_forward, logits, features, g, 1, replace=False)
    assert est.grad_logits.abs().max() < 1e-12
    assert truth(logits, features, g).grad_logits.abs().max() > 1e-2


@pytest.mark.parametrize("replace", [False, True])
def test_keeps_dtype_and_shape(replace):
    for dtype in (torch.float32, torch.float64):
        a = torch.softmax(torch.randn(2, 7, dtype=dtype), 1).requires_grad_(True)
        idx = torch.stack([torch.randperm(7)[:3] for _ in range(2)])
        f = torch.randn(2, 3, 4, 5, dtype=dtype, requires_grad=True)
        out = expected(a, idx, f, replace=replace)
        assert out.shape == (2, 4, 5) and out.dtype == dtype
        out.sum().backward()
        assert a.grad.dtype == dtype and f.grad.shape == f.shape


def test_tiny_and_underflowed_attention_stay_finite():
    """An attention of 1e-12, or one that underflowed to 0 in float32, gives finite values and gradients."""
    cases = ((torch.float64, -27.6), (torch.float32, -27.6), (torch.float32, -200.0), (torch.float64, -800.0))
    for dtype, logit in cases:
        logits = torch.zeros(1, 6, dtype=dtype)
        logits[0, 3] = logit  # a_3 ~ 1e-12 / 2e-13, or exactly 0 in float32
        logits.requires_grad_(True)
        idx = torch.tensor([[3, 0, 1]])
        f = torch.nn.functional.normalize(torch.randn(1, 3, 8, dtype=dtype), dim=-1).requires_grad_(True)
        for replace, estimator in ((False, "ordered"), (False, "unordered"), (True, "ordered")):
            out = expected(torch.softmax(logits, 1), idx, f, replace=replace, estimator=estimator)
            (out * torch.ones_like(out)).sum().backward()
            assert torch.isfinite(out).all() and torch.isfinite(logits.grad).all() and torch.isfinite(f.grad).all()
            logits.grad, f.grad = None, None


def test_ordered_weights_keep_precision_under_peaked_float32_attention():
    """p_m is summed from what is left, not 1 - cumsum: float32 weights match float64 ones closely."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 50, generator=gen, dtype=torch.float64) * 30
    idx = torch.topk(logits, 5, dim=1).indices  # the most likely draw: the heaviest positions first
    a64 = torch.softmax(logits, 1)
    c64, rho64 = ordered_weights(a64, idx)
    c32, rho32 = ordered_weights(torch.softmax(logits.float(), 1), idx)
    torch.testing.assert_close(c32.double(), c64, rtol=1e-4, atol=0)
    normal = a64.gather(1, idx) > 1e-18  # below sqrt(tiny) of float32 the underflow guard changes rho, by design
    assert normal[:, 1:].any()  # the comparison covers later draws, where 1 - cumsum would have lost everything
    torch.testing.assert_close(rho32.double()[normal], rho64[normal], rtol=1e-4, atol=0)


def test_topk_average_is_renormalised():
    """With a = (0.6, 0.4) top-k weighs (0.6, 0.4), not the estimator's (0.8, 0.2)."""
    a = torch.tensor([[0.6, 0.4]], dtype=torch.float64)
    idx = torch.tensor([[0, 1]])
    f = torch.tensor([[[1.0], [0.0]]], dtype=torch.float64)
    assert float(topk_average(a, idx, f)) == pytest.approx(0.6)
    assert float(expected(a, idx, f, replace=False, estimator="ordered")) == pytest.approx(0.8)


@pytest.mark.parametrize(
    "attention,indices,features,match",
    [
        (torch.ones(2, 4) / 4, torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2, 3), "repeats a position"),
        (torch.ones(2, 4) / 4, torch.zeros(2, 2, dtype=torch.int32), torch.zeros(2, 2, 3), "int64 indices"),
        (torch.ones(2, 4) / 4, torch.tensor([[0, 1], [1, 2]]), torch.zeros(2, 3, 3), "features of shape"),
        (torch.ones(4) / 4, torch.tensor([[0, 1]]), torch.zeros(1, 2, 3), r"attention of shape \(B, K\)"),
    ],
)
def test_bad_input_names_the_problem(attention, indices, features, match):
    with pytest.raises(ValueError, match=match):
        expected(attention, indices, features, replace=False)


def test_unknown_estimator_is_rejected():
    with pytest.raises(ValueError, match="estimator"):
        expected(torch.ones(1, 3) / 3, torch.tensor([[0]]), torch.zeros(1, 1, 2), replace=False, estimator="x")


@pytest.mark.gpu
def test_cuda_matches_cpu():
    a = torch.softmax(torch.randn(3, 9, dtype=torch.float64), 1)
    idx = torch.stack([torch.randperm(9)[:4] for _ in range(3)])
    f = torch.randn(3, 4, 5, dtype=torch.float64)
    for replace in (False, True):
        cpu = expected(a, idx, f, replace=replace)
        gpu = expected(a.cuda(), idx.cuda(), f.cuda(), replace=replace)
        torch.testing.assert_close(gpu.cpu(), cpu)
