"""Nested attention sampling: proof of unbiasedness by exact enumeration, negative controls, evaluation modes.

Every ordered outcome (the outer draw, then one inner draw per slot) is enumerated with its exact probability (the
outer Plackett-Luce or product law times the inner laws), and the real torch functions of ats_model/nested.py are
called on all outcomes at once, in float64. As in enumeration.py, the weighted objective sum_j P_j <g, estimate_j>
has E[<g, estimate>] as value and E[gradient] as gradient, so one backward pass gives the expected gradients to the
region logits z, every region's position logits y^r and the features f (research/nested-ats.md, section 4).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from ats_model import nested
from ats_model.estimator import expected, ordered_weights
from ats_model.nested import (
    NestedSampling, PositionDraw, RegionDraw, all_positions, draw_positions, draw_regions, exact_inner_expected,
    inner_sizes, joint_entropy, nested_entropy, nested_exact, nested_expected, nested_topk_average,
    region_draw_from_draws, smoothed_attention, topk_positions, topk_regions,
)
from tests.ats_model.enumeration import draw_probabilities, draws

TOL = 1e-9
R, P, D = 4, 4, 3
SHAPES = [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2)]  # (M regions, N patches per region)


def _problem(seed: int = 0, r: int = R, p: int = P, d: int = D):
    """Region logits (R,), position logits (R, P), features (R, P, D) = region effect + spread, upstream g (D,)."""
    gen = torch.Generator().manual_seed(seed)
    z = 1.2 * torch.randn(r, generator=gen, dtype=torch.float64)
    y = 1.2 * torch.randn(r, p, generator=gen, dtype=torch.float64)
    f = torch.randn(r, 1, d, generator=gen, dtype=torch.float64) + torch.randn(r, p, d, generator=gen,
                                                                                 dtype=torch.float64)
    g = torch.randn(d, generator=gen, dtype=torch.float64)
    return z, y, f, g


# -----------------------------------------------------------------------------
# the enumeration harness

@dataclass(frozen=True)
class Outcomes:
    regions: RegionDraw  # rows J: every outcome
    positions: PositionDraw  # (J, M, L)
    prob: Tensor  # (J,) exact probability of each outcome


def _outer_outcomes(cfg: NestedSampling, a: Tensor) -> tuple[Tensor, Tensor]:
    """Every outer draw (nT, T) with its probability (nT,), impossible ones dropped.

    fixed: every ordered M-tuple. counts: every count vector (the WR estimator and the slots depend on the counts
    only), as one canonical draw sequence with the multinomial probability of the counts."""
    if cfg.allocation == "fixed":
        tuples = draws(a.shape[0], cfg.n_regions, cfg.outer_replace)  # (nT, M)
        prob = draw_probabilities(a[None], tuples, cfg.outer_replace)[0].nan_to_num(0.0)  # (nT,)
    else:
        t = cfg.n_region_draws
        seqs, probs = [], []
        for c in itertools.product(range(t + 1), repeat=a.shape[0]):
            if sum(c) == t:
                seqs.append(torch.repeat_interleave(torch.arange(a.shape[0]), torch.tensor(c)))
                coef = math.factorial(t) / math.prod(math.factorial(x) for x in c)
                probs.append(coef * torch.prod(a ** torch.tensor(c, dtype=a.dtype)))
        tuples, prob = torch.stack(seqs), torch.stack(probs)
    keep = prob > 0
    return tuples[keep], prob[keep]


def enumerate_outcomes(
    cfg: NestedSampling, z: Tensor, y: Tensor, *, inner_law: Tensor | None = None, exact_inner: bool = False
) -> Outcomes:
    """Every (outer draw, inner draw of every slot) with its probability, organised by the real slot code.

    inner_law (R, P): the distribution the inner sampler really draws from (a negative control), default b.
    exact_inner: one deterministic inner outcome per slot, every valid position (`all_positions`)."""
    a, _ = smoothed_attention(z.detach(), cfg.region_smoothing)  # (R,)
    b, log_b = smoothed_attention(y.detach(), cfg.position_smoothing)  # (R, P)
    law = b if inner_law is None else inner_law
    tuples, pt = _outer_outcomes(cfg, a)
    rd = region_draw_from_draws(tuples, cfg)  # rows nT
    if exact_inner:
        every = all_positions(log_b[rd.regions], rd)
        return Outcomes(rd, every, pt)
    sizes = inner_sizes(log_b[rd.regions], rd.targets, cfg.inner_replace)  # (nT, M)
    options: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
    for r, n in {(int(r), int(n)) for r, n in zip(rd.regions.flatten(), sizes.flatten())}:
        if n == 0:
            options[r, n] = torch.zeros(1, 0, dtype=torch.long), torch.ones(1, dtype=torch.float64)
            continue
        inner = draws(y.shape[1], n, cfg.inner_replace)  # (nS, n)
        ps = draw_probabilities(law[r : r + 1], inner, cfg.inner_replace)[0].nan_to_num(0.0)  # (nS,)
        options[r, n] = inner[ps > 0], ps[ps > 0]
    width = max(int(sizes.max()), 1)
    rows, positions, probs = [], [], []
    for t in range(tuples.shape[0]):
        slots = [options[int(r), int(n)] for r, n in zip(rd.regions[t], sizes[t])]
        grid = torch.cartesian_prod(*[torch.arange(len(p)) for _, p in slots]).reshape(-1, len(slots))  # (G, M)
        prob = pt[t] * torch.stack([p[grid[:, k]] for k, (_, p) in enumerate(slots)], 1).prod(1)  # (G,)
        pos = torch.zeros(grid.shape[0], len(slots), width, dtype=torch.long)  # (G, M, L)
        for k, (tup, _) in enumerate(slots):
            if tup.shape[1]:
                pos[:, k, : tup.shape[1]] = tup[grid[:, k]]
                pos[:, k, tup.shape[1] :] = tup[grid[:, k], :1]
        rows.append(torch.full((grid.shape[0],), t))
        positions.append(pos)
        probs.append(prob)
    row = torch.cat(rows)  # (J,)
    rd = RegionDraw(rd.regions[row], rd.draws[row], rd.slot_of_draw[row], rd.targets[row])
    return Outcomes(rd, PositionDraw(torch.cat(positions), sizes[row]), torch.cat(probs))


def _rows(o: Outcomes, sl: slice) -> Outcomes:
    rd, pd = o.regions, o.positions
    return Outcomes(RegionDraw(rd.regions[sl], rd.draws[sl], rd.slot_of_draw[sl], rd.targets[sl]),
                    PositionDraw(pd.positions[sl], pd.sizes[sl]), o.prob[sl])


def expectation(estimate, outcomes: Outcomes, cfg: NestedSampling, z, y, f, g, chunk: int = 8192) -> dict:
    """Exact E[estimate], E[gradients of <g, estimate>] to z, y, f, and E|estimate - E estimate|^2.

    estimate(region_attention (J, R), regions, slot_position_attention (J, M, P), positions, features (J, M, L, D))
    -> (J, D): the code under test, called on every outcome (in chunks of rows, gradients accumulating)."""
    z, y, f = (x.detach().clone().requires_grad_(True) for x in (z, y, f))
    forward = torch.zeros_like(g)
    square = torch.zeros((), dtype=torch.float64)
    for start in range(0, outcomes.prob.shape[0], chunk):
        part = _rows(outcomes, slice(start, start + chunk))
        a, _ = smoothed_attention(z, cfg.region_smoothing)  # (R,)
        b, _ = smoothed_attention(y, cfg.position_smoothing)  # (R, P)
        regions, positions = part.regions.regions, part.positions.positions  # (J, M), (J, M, L)
        feats = f[regions[:, :, None], positions]  # (J, M, L, D)
        out = estimate(a.expand(regions.shape[0], -1), part.regions, b[regions], part.positions, feats)  # (J, D)
        weighted = part.prob[:, None] * out  # (J, D)
        (weighted * g).sum().backward()
        forward += weighted.detach().sum(0)
        square += (part.prob * (out.detach() ** 2).sum(1)).sum()
    return dict(F=forward, z=z.grad, y=y.grad, f=f.grad, var=square - forward @ forward,
                mass=outcomes.prob.sum())


def truth(cfg: NestedSampling, z, y, f, g) -> dict:
    """Phi = sum_r A_r sum_p b^r_p f_{r,p} and the gradients of <g, Phi>, by plain autograd."""
    z, y, f = (x.detach().clone().requires_grad_(True) for x in (z, y, f))
    a, _ = smoothed_attention(z, cfg.region_smoothing)
    b, _ = smoothed_attention(y, cfg.position_smoothing)
    phi = torch.einsum("r,rp,rpd->d", a, b, f)
    (phi @ g).backward()
    return dict(F=phi.detach(), z=z.grad, y=y.grad, f=f.grad)


def rel_errors(e: dict, t: dict) -> dict:
    """max |E - truth| / max |truth| per quantity (the note's metric)."""
    return {k: float((e[k] - t[k]).abs().max() / t[k].abs().max()) for k in ("F", "z", "y", "f")}


def check(cfg: NestedSampling, seed: int = 0, **problem) -> dict:
    z, y, f, g = _problem(seed, **problem)
    o = enumerate_outcomes(cfg, z, y)
    e = expectation(lambda *x: nested_expected(*x, cfg), o, cfg, z, y, f, g)
    assert abs(float(e["mass"]) - 1) < 1e-12
    return rel_errors(e, truth(cfg, z, y, f, g))


COMBOS = [  # (outer_replace, inner_replace, outer_estimator, inner_estimator)
    (True, True, "unordered", "unordered"),
    (True, False, "unordered", "ordered"),
    (True, False, "unordered", "unordered"),
    (False, True, "ordered", "unordered"),
    (False, True, "unordered", "unordered"),
    (False, False, "ordered", "ordered"),
    (False, False, "unordered", "unordered"),
]


def _name(c):
    o, i, eo, ei = c
    return f"{'WR' if o else 'WOR-' + eo}/{'WR' if i else 'WOR-' + ei}"


CASES = [(c, s) for c in COMBOS for s in SHAPES]


def _positions(shape: tuple[int, int]) -> int:
    """P = 4 as in the note, P = 3 at (M, N) = (3, 2): up to 3.4e5 outcomes at P = 4 take seconds each."""
    return 3 if shape == (3, 2) else P


@pytest.mark.parametrize("combo,shape", CASES, ids=[f"{_name(c)}-{s}" for c, s in CASES])
def test_nested_is_unbiased_by_enumeration(combo, shape):
    o, i, eo, ei = combo
    m, n = shape
    cfg = NestedSampling(m, n, outer_replace=o, inner_replace=i, outer_estimator=eo, inner_estimator=ei)
    errors = check(cfg, p=_positions(shape))
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (3, 2)], ids=str)
@pytest.mark.parametrize("inner_replace", [False, True], ids=["inner-WOR", "inner-WR"])
def test_count_allocation_is_unbiased_by_enumeration(shape, inner_replace):
    """T = M*N region draws with replacement -> counts c_r; region r gets c_r inner draws (capped at P = 3 without
    replacement: T = 4 and 6 exercise the cap) and outer weight c_r / T."""
    m, n = shape
    cfg = NestedSampling(m, n, outer_replace=True, inner_replace=inner_replace, allocation="counts")
    errors = check(cfg, p=3)
    assert max(errors.values()) < TOL, errors


def test_smoothing_at_both_levels_stays_unbiased():
    """Sampler and estimator both see A (1 - e) + e / R and b (1 - e) + e / P (sampled on the log of these)."""
    cfg = NestedSampling(2, 2, region_smoothing=0.3, position_smoothing=0.2)
    errors = check(cfg, seed=3)
    assert max(errors.values()) < TOL, errors


# -----------------------------------------------------------------------------
# negative controls: each deliberately wrong variant must fail the same check

class _OrderedVariant(torch.autograd.Function):
    """The ordered WOR forward with a wrong backward (research/nested-ats.md, section 8). kind "2019": the 2019
    authors' attention gradient; "port": the ports' inclusive cumsums (mass and feature cumsum), as in the note's
    `rule(kind)`. The gradient to the attention at draw m is sum_j H[m, j] <g, f_j>; to f_m it is cf_m g."""

    @staticmethod
    def forward(ctx, attention, features, indices, kind):
        c, _ = ordered_weights(attention, indices)  # (B, n)
        ctx.save_for_backward(attention, features, indices)
        ctx.kind = kind
        return (c.unsqueeze(-1) * features).sum(1)  # (B, n, D) -> (B, D)

    @staticmethod
    def backward(ctx, g):
        attention, features, indices = ctx.saved_tensors
        n = indices.shape[1]
        ws = attention.gather(1, indices)  # (B, n)
        p = 1 - (ws.cumsum(1) - ws)  # (B, n) exclusive: what is left before draw m
        m = torch.arange(n, dtype=ws.dtype)
        below = torch.ones(n, n, dtype=ws.dtype).tril(-1)  # [m, j] = 1 where j < m
        if ctx.kind == "2019":
            h = (ws[:, None, :] * (p / ws)[:, :, None] + 1) * below + torch.diag_embed(p * p / ws - m)
            cf = (p + (n - 1 - m) * ws) / n
        else:  # "port": q = p - a_m, the inclusive mass
            q = p - ws
            h = (ws[:, None, :] * (q / ws)[:, :, None] + 1) * below + torch.diag_embed(p * q / ws + 1 - m)
            cf = (q + (n - 1 - m) * ws) / n
        inner = (features * g[:, None, :]).sum(-1)  # (B, n) <g, f_j>
        grad_a = torch.zeros_like(attention).scatter_add_(1, indices, torch.einsum("bmj,bj->bm", h / n, inner))
        return grad_a, cf.unsqueeze(-1) * g[:, None, :], None, None


def _ordered(a, i, f):
    return expected(a, i, f, replace=False, estimator="ordered")


def _composed(inner_fn, outer_fn):
    """The nested composition (fixed allocation, every slot of full size) around swappable single-level pieces."""
    def estimate(a, rd, b, pd, feats):
        j, m, _ = pd.positions.shape
        inner = inner_fn(b.flatten(0, 1), pd.positions.flatten(0, 1), feats.flatten(0, 1)).reshape(j, m, -1)
        return outer_fn(a, rd.draws, inner)  # (J, D)
    return estimate


def _outer_inner_gradient_scaled_1_over_m(a, i, values):
    """Same forward and outer attention gradient, but the gradient reaching every slot is g / M, not c_k g."""
    return _ordered(a, i, values.detach()) + (values - values.detach()).sum(1) / i.shape[1]


WOR_ORDERED = dict(outer_replace=False, inner_replace=False, outer_estimator="ordered", inner_estimator="ordered")


def _control_errors(estimate, cfg, inner_law=None, seed=0):
    z, y, f, g = _problem(seed)
    law = None if inner_law is None else inner_law(smoothed_attention(y)[0])
    e = expectation(estimate, enumerate_outcomes(cfg, z, y, inner_law=law), cfg, z, y, f, g)
    return rel_errors(e, truth(cfg, z, y, f, g))


def test_harness_composition_is_the_real_code():
    """The controls swap pieces of `_composed`; with the correct pieces it equals `nested_expected` per outcome."""
    z, y, f, _ = _problem()
    cfg = NestedSampling(3, 2, **WOR_ORDERED)
    o = enumerate_outcomes(cfg, z, y)
    a, b = smoothed_attention(z)[0], smoothed_attention(y)[0]
    args = (a.expand(o.prob.shape[0], -1), o.regions, b[o.regions.regions], o.positions,
            f[o.regions.regions[:, :, None], o.positions.positions])
    torch.testing.assert_close(_composed(_ordered, _ordered)(*args), nested_expected(*args, cfg), rtol=0, atol=1e-14)


def test_control_sampler_fed_probabilities_as_logits_is_caught():
    """The Zoom-In network's inner sampler: Gumbel noise on b itself draws from softmax(b), the estimator divides by
    b. The forward is biased."""
    cfg = NestedSampling(2, 1, outer_replace=True, inner_replace=False)
    errors = _control_errors(lambda *x: nested_expected(*x, cfg), cfg, inner_law=lambda b: torch.softmax(b, -1))
    assert errors["F"] > 0.05, errors


@pytest.mark.parametrize("shape,biased", [((1, 1), "f"), ((3, 1), "z"), ((3, 2), "y")], ids=str)
def test_control_inclusive_cumsums_are_caught(shape, biased):
    """Ports / Zoom-In: inclusive cumsums keep the forward but bias the feature gradient already at M = N = 1."""
    cfg = NestedSampling(*shape, **WOR_ORDERED)
    port = lambda a, i, f: _OrderedVariant.apply(a, f, i, "port")  # noqa: E731
    errors = _control_errors(_composed(port, port), cfg)
    assert errors["F"] < TOL and errors[biased] > 0.05, errors


@pytest.mark.parametrize("shape,biased", [((3, 1), "z"), ((2, 2), "y")], ids=str)
def test_control_2019_attention_gradient_is_caught(shape, biased):
    """The 2019 formula keeps the forward and the feature gradient but biases both attention gradients."""
    cfg = NestedSampling(*shape, **WOR_ORDERED)
    v2019 = lambda a, i, f: _OrderedVariant.apply(a, f, i, "2019")  # noqa: E731
    errors = _control_errors(_composed(v2019, v2019), cfg)
    assert errors["F"] < TOL and errors["f"] < TOL and errors[biased] > 0.05, errors


def test_control_inner_gradient_scaled_1_over_m_is_caught():
    """Scaling the slots' upstream gradient by 1/M instead of the outer weight c_k leaves the forward and the region
    gradient alone but biases the position and feature gradients."""
    cfg = NestedSampling(3, 1, **WOR_ORDERED)
    errors = _control_errors(_composed(_ordered, _outer_inner_gradient_scaled_1_over_m), cfg)
    assert errors["F"] < TOL and errors["z"] < TOL, errors
    assert errors["y"] > 0.05 and errors["f"] > 0.05, errors


# -----------------------------------------------------------------------------
# identities and the variance closed form

@pytest.mark.parametrize("m", [1, 2, 3])
def test_wr_wr_with_one_patch_per_region_is_flat_ats(m):
    """With replacement at both levels and N = 1, each outcome (R_k, S_k)_k has probability prod_k q_{R_k, S_k}
    (q = A_r b^r_p), and the nested estimate and every gradient equal flat WR ATS on q at positions R_k P + S_k:
    the same distribution. Checked per outcome, with one copy of the leaves per outcome row."""
    cfg = NestedSampling(m, 1, outer_replace=True, inner_replace=True)
    z, y, f, g = _problem(1)
    o = enumerate_outcomes(cfg, z, y)
    j = o.prob.shape[0]
    regions, cells = o.regions.regions, o.positions.positions[:, :, 0]  # (J, M), (J, M)
    rows = torch.arange(j)[:, None]  # (J, 1)

    def run(estimate):
        leaves = [x.expand(j, *x.shape).clone().requires_grad_(True) for x in (z, y, f)]  # (J, ...) each
        zs, ys, fs = leaves
        a, b = torch.softmax(zs, 1), torch.softmax(ys, 2)  # (J, R), (J, R, P)
        out = estimate(a, b, fs)  # (J, D)
        (out * g).sum().backward()
        return [out.detach()] + [x.grad for x in leaves]

    def nested_fn(a, b, fs):
        feats = fs[rows, regions, cells].unsqueeze(2)  # (J, M, 1, D)
        return nested_expected(a, o.regions, b[rows, regions], o.positions, feats, cfg)

    def flat_fn(a, b, fs):
        q = (a[:, :, None] * b).flatten(1)  # (J, R*P)
        idx = regions * P + cells  # (J, M)
        return expected(q, idx, fs.flatten(1, 2)[rows, idx], replace=True)

    for got, want in zip(run(nested_fn), run(flat_fn)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    q = (smoothed_attention(z)[0][:, None] * smoothed_attention(y)[0]).flatten()  # (R*P,)
    torch.testing.assert_close(o.prob, q[regions * P + cells].prod(1), rtol=1e-13, atol=0)


@pytest.mark.parametrize("shape", [(1, 2), (2, 1), (2, 2), (3, 2)], ids=str)
def test_wr_wr_variance_is_the_cluster_sampling_formula(shape):
    """Var = (sigma_b^2 + sigma_w^2 / N) / M (law of total variance), sigma_b^2 = sum_r A_r |phi_r - Phi|^2,
    sigma_w^2 = sum_r A_r sum_p b^r_p |f_rp - phi_r|^2."""
    m, n = shape
    cfg = NestedSampling(m, n, outer_replace=True, inner_replace=True)
    z, y, f, g = _problem(2)
    e = expectation(lambda *x: nested_expected(*x, cfg), enumerate_outcomes(cfg, z, y), cfg, z, y, f, g)
    a, b = smoothed_attention(z)[0], smoothed_attention(y)[0]
    phi = torch.einsum("rp,rpd->rd", b, f)  # (R, D)
    between = a @ ((phi - a @ phi) ** 2).sum(1)
    within = a @ (b * ((f - phi[:, None]) ** 2).sum(-1)).sum(1)
    torch.testing.assert_close(e["var"], (between + within / n) / m, rtol=1e-10, atol=0)


# -----------------------------------------------------------------------------
# masks

def _masked_problem():
    """Region 1 outside the image (region and positions -inf), position 2 of region 0 masked, region 2 with one valid
    position only (caps N = 2 without replacement)."""
    z, y, f, g = _problem(5)
    z[1] = -math.inf
    y[1] = -math.inf
    y[0, 2] = -math.inf
    y[2, 1:] = -math.inf
    return z, y, f, g


MASKED = [
    NestedSampling(2, 2),
    NestedSampling(3, 2, outer_estimator="ordered", inner_estimator="ordered"),
    NestedSampling(2, 2, outer_replace=True),
    NestedSampling(2, 2, inner_replace=True),
    NestedSampling(1, 3, outer_replace=True, allocation="counts"),
]


@pytest.mark.parametrize("cfg", MASKED, ids=lambda c: f"{c.allocation}-{c.outer_replace}-{c.inner_replace}")
def test_masked_regions_and_positions_stay_unbiased_over_the_allowed_ones(cfg):
    z, y, f, g = _masked_problem()
    o = enumerate_outcomes(cfg, z, y)
    assert not bool((o.regions.draws == 1).any())
    e = expectation(lambda *x: nested_expected(*x, cfg), o, cfg, z, y, f, g)
    assert abs(float(e["mass"]) - 1) < 1e-12
    errors = rel_errors(e, truth(cfg, z, y, f, g))
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("cfg", [NestedSampling(3, 2), NestedSampling(3, 2, outer_replace=True, inner_replace=True),
                                 NestedSampling(2, 2, outer_replace=True, allocation="counts")],
                         ids=["WOR/WOR", "WR/WR", "counts"])
def test_masked_regions_and_positions_are_never_drawn(cfg):
    z, y, _, _ = _masked_problem()
    gen = torch.Generator().manual_seed(0)
    batch = 400
    _, log_a = smoothed_attention(z.expand(batch, R))  # (B, R)
    rd = draw_regions(log_a, cfg, gen)
    _, log_b = smoothed_attention(y[rd.regions])  # (B, M, P)
    pd = draw_positions(log_b, rd, cfg, gen)
    assert not bool((rd.draws == 1).any())
    drawn = log_b.gather(2, pd.positions)[pd.mask()]  # log b of every drawn position
    assert bool(torch.isfinite(drawn).all())
    if not cfg.inner_replace:  # region 2 has one valid position: its slots draw it once
        assert bool((pd.sizes[rd.regions == 2] <= 1).all())
    seen = torch.zeros(R, P, dtype=torch.bool)
    seen[rd.regions[:, :, None].expand_as(pd.positions)[pd.mask()], pd.positions[pd.mask()]] = True
    assert torch.equal(seen, torch.isfinite(y) & torch.isfinite(z)[:, None])  # every allowed one is reachable


def test_too_many_regions_without_replacement_names_the_fix():
    z, _, _, _ = _masked_problem()
    with pytest.raises(nested.TooFewRegionsError, match="outer_replace=True"):
        draw_regions(smoothed_attention(z[None])[1], NestedSampling(4, 1))


def test_a_drawn_region_without_valid_positions_is_refused():
    rd = region_draw_from_draws(torch.tensor([[0, 1]]), NestedSampling(2, 1))
    logits = torch.zeros(1, 2, 3)
    logits[0, 1] = -math.inf
    with pytest.raises(ValueError, match="no unmasked position"):
        inner_sizes(logits, rd.targets, replace=True)


def test_count_allocation_slots():
    """Draws (B, T) -> distinct regions with counts; each draw carries its region's slot; padding gets target 0."""
    cfg = NestedSampling(2, 2, outer_replace=True, allocation="counts")
    rd = region_draw_from_draws(torch.tensor([[3, 1, 3, 3], [2, 2, 2, 2]]), cfg)
    assert rd.regions.tolist() == [[1, 3], [2, 2]] and rd.targets.tolist() == [[1, 3], [4, 0]]
    assert torch.equal(rd.regions.gather(1, rd.slot_of_draw), rd.draws)
    with pytest.raises(ValueError, match="outer_replace=True"):
        NestedSampling(allocation="counts")


# -----------------------------------------------------------------------------
# evaluation modes and the regulariser

def test_exact_equals_the_truth_and_the_enumerated_expectation():
    z, y, f, g = _problem(4)
    cfg = NestedSampling(2, 2)
    zl, yl, fl = (x.clone().requires_grad_(True) for x in (z, y, f))
    phi = nested_exact(smoothed_attention(zl[None])[0], smoothed_attention(yl[None])[0], fl[None])[0]  # (D,)
    (phi @ g).backward()
    t = truth(cfg, z, y, f, g)
    for got, key in ((phi.detach(), "F"), (zl.grad, "z"), (yl.grad, "y"), (fl.grad, "f")):
        torch.testing.assert_close(got, t[key], rtol=0, atol=1e-14)
    e = expectation(lambda *x: nested_expected(*x, cfg), enumerate_outcomes(cfg, z, y), cfg, z, y, f, g)
    torch.testing.assert_close(phi.detach(), e["F"], rtol=0, atol=TOL)


@pytest.mark.parametrize("cfg", [NestedSampling(2, 2), NestedSampling(3, 1, outer_replace=True),
                                 NestedSampling(2, 1, outer_replace=True, allocation="counts")],
                         ids=["WOR", "WR", "counts"])
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_exact_inner_is_unbiased_by_enumeration(cfg, masked):
    """Sampled regions, every valid position of each: the outer draw is the only randomness."""
    z, y, f, g = _masked_problem() if masked else _problem(6)
    o = enumerate_outcomes(cfg, z, y, exact_inner=True)
    e = expectation(lambda *x: exact_inner_expected(*x, cfg), o, cfg, z, y, f, g)
    errors = rel_errors(e, truth(cfg, z, y, f, g))
    assert max(errors.values()) < TOL, errors


def test_topk_is_deterministic_renormalised_and_exact_when_it_holds_all_the_mass():
    z, y, f, _ = _masked_problem()
    a, b = smoothed_attention(z[None])[0], smoothed_attention(y[None])[0]  # (1, R), (1, R, P)

    def topk(m, n):
        rd = topk_regions(a, NestedSampling(m, n))
        pd = topk_positions(b[0][rd.regions], rd)
        return rd, pd, nested_topk_average(a, rd, b[0][rd.regions], pd, f[rd.regions[:, :, None], pd.positions])

    rd, pd, out = topk(2, 2)
    assert torch.equal(out, topk(2, 2)[2])
    top_r = torch.argsort(a[0], descending=True)[:2]
    by_hand = sum(a[0, r] / a[0, top_r].sum()
                  * sum(b[0, r, p] * f[r, p] for p in torch.argsort(b[0, r], descending=True)[:2])
                  / torch.sort(b[0, r], descending=True).values[:2].sum() for r in top_r)
    torch.testing.assert_close(out[0], by_hand, rtol=1e-14, atol=0)
    assert rd.regions[0].tolist() == top_r.tolist()
    full = topk(R, P)  # every region and position: exact, masked ones get weight 0 (region 1 none, region 2 one)
    regions, sizes = full[0].regions[0].tolist(), full[1].sizes[0].tolist()
    assert sorted(zip(regions[:3], sizes[:3])) == [(0, 3), (2, 1), (3, 4)]
    assert sizes[3] == 0 and regions[3] == regions[0]  # the masked region's slot: padding, nothing outside is read
    torch.testing.assert_close(full[2], nested_exact(a, b, f[None]), rtol=0, atol=1e-14)


@pytest.mark.parametrize("cfg", [NestedSampling(2, 1), NestedSampling(3, 1, outer_estimator="ordered"),
                                 NestedSampling(2, 1, outer_replace=True),
                                 NestedSampling(2, 1, outer_replace=True, allocation="counts")],
                         ids=["WOR-unordered", "WOR-ordered", "WR", "counts"])
def test_entropy_regulariser_is_unbiased_for_the_joint_entropy(cfg):
    """H(A) + outer estimate of sum_r A_r H(b^r): E = H(q) = -sum q log q, and E[gradient] to z and y = its gradient."""
    z, y, _, _ = _masked_problem()
    tuples, prob = _outer_outcomes(cfg, smoothed_attention(z)[0])
    rd = region_draw_from_draws(tuples, cfg)
    zl, yl = z.clone().requires_grad_(True), y.clone().requires_grad_(True)
    j = prob.shape[0]
    a = smoothed_attention(zl)[0].expand(j, -1)  # (J, R)
    estimate = nested_entropy(zl.expand(j, -1), a, rd, yl[rd.regions], cfg)  # (J,)
    (prob @ estimate).backward()
    zt, yt = z.clone().requires_grad_(True), y.clone().requires_grad_(True)
    exact = joint_entropy(zt[None], yt[None])[0]
    exact.backward()
    q = smoothed_attention(z)[0][:, None] * smoothed_attention(y)[0]  # (R, P)
    torch.testing.assert_close(exact, -torch.special.xlogy(q, q).sum(), rtol=1e-14, atol=0)
    torch.testing.assert_close(prob @ estimate.detach(), exact.detach(), rtol=0, atol=TOL)
    torch.testing.assert_close(zl.grad, zt.grad, rtol=0, atol=TOL)
    torch.testing.assert_close(yl.grad, yt.grad, rtol=0, atol=TOL)


def test_exact_budget_error_names_the_budget_and_the_mode_to_use():
    nested.check_budget(2**20, 1.0, "exact", "1 MB of patches", "exact_inner")  # at the budget: fine
    with pytest.raises(nested.NestedExactTooLargeError, match=r"budget of 1 MB.*mode='exact_inner'"):
        nested.check_budget(2**21, 1.0, "exact", "2 MB of patches", "exact_inner")
    assert issubclass(nested.NestedExactTooLargeError, MemoryError)


def test_duplicate_regions_get_independent_inner_draws():
    """Outer with replacement may draw a region twice: each slot draws its own positions (fresh noise per row)."""
    rd = region_draw_from_draws(torch.zeros(200, 2, dtype=torch.long), NestedSampling(2, 3, outer_replace=True))
    log_b = torch.zeros(200, 2, 16).log_softmax(-1)  # the same region (uniform b) in both slots
    pd = draw_positions(log_b, rd, NestedSampling(2, 3, outer_replace=True), torch.Generator().manual_seed(0))
    same = (pd.positions[:, 0] == pd.positions[:, 1]).all(1)  # (200,)
    assert int(same.sum()) < 5  # P(identical ordered triples) = 1 / 3360 per row
