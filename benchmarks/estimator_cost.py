"""Cost of the estimator weights next to a CPU training step (issue 6, "Cost"), and cheaper quadratures for US.

Part 1 measures, side by side in one run and interleaved (so load changes hit all columns alike), at N = 10, 64
and 256: a full CPU training step of ATSModel (forward + backward + Adam step; the paper's Megapixel MNIST shapes:
mnist_tanh attention on a 180x180 view, K = 32400 cells; lenet1 features (128-d) on 50x50 patches; 10 classes;
in-memory reader over 8 random 1500x1500 uint8 images; batch 8; the low-res view is computed once, outside the
step, as training reads it from the pyramid) trained with the ordered and with the unordered estimator, and the
time of the weight computation alone (the estimator's own entry points, `ordered_weights` and
`unordered_set_weights`, including the float64 log of the attention) on the model's attention for that batch and
on two peaked attentions (trained models are peaked, and the US grid grows with max log r).

Part 2 profiles the US weights stage by stage (K-wide part; the (B, n, M) log-factors; the leave-one-out
log-sum-exp).

Part 3 measures options that would make the US weights cheaper, each as a max weight error against a fine-grid
float64 reference (step / 4, lower end 20 further down, upper end 1 further up) and a time per sample:
- "current": the grid rule of ats_model/unordered.py, re-implemented here with knobs (checked against the library);
- "lo -41": the grid's lower end fixed at -41 whatever max log r (the tail below y_lo is at most e^(y_lo + 1) of
  every integral, because every factor grows with y);
- "adaptive lo": the lower end per batch from a bound evaluated on a coarse grid (step 0.5 on [-41, y_hi]): for
  every leave-one-out integral, tail(y_lo) <= exp(y_lo + T(y_lo) - min_s l_s(y_lo)) and I(S \\ s) >= I(S) >=
  exp(max_y [T(y) - e^y]) (every factor grows with y); the grid starts at the last coarse point where the ratio
  is below e^-37 (~1e-16). Flat attention puts almost all of the current grid's points where the integrand is
  below 1e-30 of its peak;
- coarser steps c / sqrt(N + 1) (capped);
- float32 log-factors with prefix + suffix leave-one-out sums;
- "outside by sum": the K-wide part from the float32 attention as a masked float64 sum (no log / exp over K).

Run: python benchmarks/estimator_cost.py [--quick] [--threads T]   (default threads 1: timings on one core)
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ats_model.ats import ATSConfig, ATSModel
from ats_model.estimator import ordered_weights, unordered_set_weights
from ats_model.memory_reader import InMemoryReader
from ats_model.nets import create_attention, create_feature
from ats_model.training import train_step
from ats_model.unordered import quadrature_step, quadrature_upper, unordered_weights
from machine import load_average  # benchmarks/machine.py (the script's own folder is on sys.path)

BATCH, IMAGE, VIEW, PATCH = 8, 1500, 180, 50


# ------------------------------------------------------------------------------------------------ timing helpers
def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------ part 1
def _setup(n: int, estimator: str, seed: int = 0) -> tuple[ATSModel, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = ATSModel(create_attention("mnist_tanh", 1), create_feature("lenet1", 1, out_dim=128), 10,
                     ATSConfig(n_patches=n, patch_hw=(PATCH, PATCH), replace=False, estimator=estimator))
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def peaked_attention(kind: str, n: int, gen: torch.Generator) -> Tensor:
    """(B, K) float32 attention: "scale 3" = softmax of 3 N(0, 1) logits; "spiky" = N/2 cells per row 20 above the
    rest (outside mass ~1e-4 once they are sampled: max log r ~ 9)."""
    k = VIEW * VIEW
    logits = torch.randn(BATCH, k, generator=gen)
    if kind == "scale 3":
        logits = 3 * logits
    else:
        top = torch.rand(BATCH, k, generator=gen).topk(max(n // 2, 1), 1).indices
        logits = logits.scatter_add(1, top, torch.full(top.shape, 20.0))
    return torch.softmax(logits, 1)


def _gumbel_topk(attention: Tensor, n: int, gen: torch.Generator) -> Tensor:
    keys = attention.log() - torch.log(-torch.log(torch.rand(attention.shape, generator=gen).clamp_min(1e-30)))
    return keys.topk(n, 1).indices  # (B, n)


def step_rows(ns: tuple[int, ...], repeats: int) -> list[str]:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (1, IMAGE, IMAGE), dtype=np.uint8) for _ in range(BATCH)]
    reader = InMemoryReader(images)
    ids = list(range(BATCH))
    pixels = torch.from_numpy(np.stack(images)).float() / 255  # (B, 1, H, W)
    low = torch.nn.functional.interpolate(pixels, size=(VIEW, VIEW), mode="area")  # (B, 1, 180, 180)
    hw, targets = reader.level0_hw(ids), torch.from_numpy(rng.integers(0, 10, BATCH))
    gen = torch.Generator().manual_seed(0)
    lines = ["| N | step ORD-trained ms (median) | step US-trained ms (median) | ORD weights ms/sample | US weights ms/sample "
             "(model / scale 3 / spiky) | US weights per batch, % of ORD step (model / scale 3 / spiky) "
             "| step US - ORD, % |",
             "|---|---|---|---|---|---|---|"]
    for n in ns:
        models = {e: _setup(n, e) for e in ("ordered", "unordered")}
        with torch.no_grad():
            attention = models["ordered"][0].attention_map(low).flatten(1)  # (B, Ha, Wa) -> (B, K)
        cases = {"model": attention, "scale 3": peaked_attention("scale 3", n, gen),
                 "spiky": peaked_attention("spiky", n, gen)}
        idx = {name: _gumbel_topk(a, n, gen) for name, a in cases.items()}
        times: dict[str, list[float]] = {}
        for e, (model, opt) in models.items():  # warm-up
            train_step(model, opt, low, reader, ids, hw, targets, generator=gen)
        for _ in range(repeats):  # interleaved
            for e, (model, opt) in models.items():
                times.setdefault(e, []).append(_time(lambda: train_step(model, opt, low, reader, ids, hw, targets,
                                                                        generator=gen)))
            for name, a in cases.items():
                times.setdefault(f"us {name}", []).append(_time(lambda: unordered_set_weights(a, idx[name])))
            times.setdefault("ord", []).append(_time(lambda: ordered_weights(attention, idx["model"])))
        med = {key: min(v) * 1e3 for key, v in times.items()}  # best of: the least disturbed by load
        spread = {e: statistics.median(times[e]) * 1e3 for e in models}
        us_cases = ("us model", "us scale 3", "us spiky")
        per_sample = " / ".join(f"{med[c] / BATCH:.3f}" for c in us_cases)
        percent = " / ".join(f"{100 * med[c] / med['ordered']:.2f}" for c in us_cases)
        lines.append(
            f"| {n} | {med['ordered']:.0f} ({spread['ordered']:.0f}) | {med['unordered']:.0f} "
            f"({spread['unordered']:.0f}) | {med['ord'] / BATCH:.4f} | {per_sample} | "
            f"{percent} | {100 * (med['unordered'] - med['ordered']) / med['ordered']:+.1f} |"
        )
    lines += ["", f"Best of {repeats} interleaved repeats after a warm-up (median in brackets); CPU, torch threads "
              f"{torch.get_num_threads()}; batch {BATCH}, K = {VIEW * VIEW}. The last column is the measured step "
              "difference, inside the load noise wherever it is below a few percent."]
    return lines


# ------------------------------------------------------------------------------------------------ quadrature variants
def _log1mexp_exp(x: Tensor) -> Tensor:
    """log(1 - exp(-exp(x))), stable for every real x (as in ats_model/unordered.py)."""
    clamped = x.clamp_min(-700.0)
    return (-torch.expm1(-clamped.exp())).log() + (x - clamped)


def _lse(x: Tensor, dim: int) -> Tensor:
    top = x.amax(dim, keepdim=True)
    return (x - top).clamp_min(-700.0).exp().sum(dim).log() + top.squeeze(dim)


def adaptive_lower(log_r: Tensor, upper: float, log_eps: float = -37.0, coarse_step: float = 0.5) -> float:
    """The highest y_lo (on a coarse grid from -41) whose tail bound is below e^log_eps for every row and every
    leave-one-out integral; see the module docstring."""
    y = torch.arange(-41.0, upper, coarse_step, dtype=torch.float64)  # (Mc,)
    log_factor = _log1mexp_exp(log_r[:, :, None] + y)  # (B, n, Mc)
    total = log_factor.sum(1)  # (B, Mc) T(y)
    lower_bound = (total - y.exp()).amax(1, keepdim=True)  # (B, 1) log I(S) >= max_y T(y) - e^y
    tail = y + total - log_factor.amin(1) - lower_bound  # (B, Mc), increasing in y
    ok = (tail <= log_eps).all(0)  # (Mc,) a prefix
    return float(y[int(ok.sum()) - 1]) if bool(ok[0]) else -41.0


def variant_weights(log_a_set: Tensor, log_outside: Tensor, *, step: float, lower: str | float,
                    upper_extra: float = 0.0, dtype: torch.dtype = torch.float64) -> Tensor:
    """US weights c (B, n) with a configurable grid. log_a_set (B, n), log_outside (B,) float64, all finite.

    lower: "rule" (-max(max log r, 0) - 40, the library's), "adaptive", or a number (fixed lower end).
    dtype float32: log-factors and the leave-one-out sums (exclusive prefix + suffix) in float32.
    """
    n = log_a_set.shape[1]
    log_r = log_a_set - log_outside[:, None]  # (B, n)
    upper = quadrature_upper(n) + upper_extra
    if lower == "rule":
        y_lo = -max(float(log_r.max()), 0.0) - 40.0
    elif lower == "adaptive":
        y_lo = adaptive_lower(log_r, upper)
    else:
        y_lo = float(lower)
    m = int(math.floor((upper - y_lo) / step)) + 1
    y = upper - step * torch.arange(m - 1, -1, -1, dtype=torch.float64)  # (M,) ascending
    log_weight = (y - y.exp() + math.log(step)).to(dtype)  # (M,)
    log_factor = _log1mexp_exp(log_r.to(dtype)[:, :, None] + y.to(dtype))  # (B, n, M)
    total = log_factor.sum(1)  # (B, M)
    log_i = _lse(log_weight + total, -1)  # (B,)
    if dtype == torch.float64:
        without = total[:, None, :] - log_factor  # (B, n, M)
    else:  # exclusive prefix + suffix sums: no cancellation of T - l_s in float32
        prefix = log_factor.cumsum(1) - log_factor
        suffix = log_factor.flip(1).cumsum(1).flip(1) - log_factor
        without = prefix + suffix
    log_i_without = _lse(log_weight + without, -1)  # (B, n)
    return torch.exp(log_a_set + (log_i_without - log_i[:, None]).double())


def set_parts(attention: Tensor, idx: Tensor, by_sum: bool) -> tuple[Tensor, Tensor]:
    """(log a_s (B, n), log a(outside) (B,)) in float64 from float32 attention: the library's way (log over K,
    masked log-sum-exp) or a masked float64 sum of the attention itself."""
    in_set = torch.zeros(attention.shape, dtype=torch.bool).scatter_(1, idx, True)
    if by_sum:
        outside = attention.double().masked_fill(in_set, 0.0).sum(1)  # (B,) a sum of positive terms, no 1 - sum
        return attention.gather(1, idx).double().log(), outside.log()
    log_a = attention.double().log()  # (B, K)
    return log_a.gather(1, idx), log_a.masked_fill(in_set, -math.inf).logsumexp(1)


# ------------------------------------------------------------------------------------------------ part 2
def profile_rows(ns: tuple[int, ...], repeats: int) -> list[str]:
    gen = torch.Generator().manual_seed(1)
    lines = ["| N | attention | grid M | K-wide: log + masked LSE | K-wide by sum | log-factors (B,n,M) | "
             "sum + LSE of I(S) | leave-one-out LSE | library total | ms/sample |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n in ns:
        for kind in ("scale 3", "spiky"):
            a = peaked_attention(kind, n, gen)
            idx = _gumbel_topk(a, n, gen)
            log_a_set, log_out = set_parts(a, idx, by_sum=False)
            log_r = log_a_set - log_out[:, None]
            step, upper = quadrature_step(n), quadrature_upper(n)
            y_lo = -max(float(log_r.max()), 0.0) - 40.0
            m = int(math.floor((upper - y_lo) / step)) + 1
            y = upper - step * torch.arange(m - 1, -1, -1, dtype=torch.float64)
            lw = y - y.exp() + math.log(step)
            lf = _log1mexp_exp(log_r[:, :, None] + y)
            total = lw + lf.sum(1)
            stages = {
                "k": lambda: set_parts(a, idx, by_sum=False),
                "ksum": lambda: set_parts(a, idx, by_sum=True),
                "lf": lambda: _log1mexp_exp(log_r[:, :, None] + y),
                "i": lambda: _lse(lw + lf.sum(1), -1),
                "loo": lambda: _lse(total[:, None, :] - lf, -1),
                "lib": lambda: unordered_set_weights(a, idx),
            }
            med = {key: min(_time(fn) for _ in range(repeats)) * 1e3 for key, fn in stages.items()}
            lines.append(f"| {n} | {kind} | {m} | " + " | ".join(f"{med[key]:.2f}" for key in stages)
                         + f" | {med['lib'] / BATCH:.3f} |")
    lines += ["", f"ms per batch of {BATCH} (best of {repeats}); the stages are re-implemented here with the "
              "library's formulas (ats_model/unordered.py works in place, so its stages are a little cheaper)."]
    return lines


# ------------------------------------------------------------------------------------------------ part 3
OPTIONS: dict[str, dict] = {
    "current: step 0.7/sqrt(N+1) cap 0.1, lo -max(log r,0)-40": dict(scale=0.7, cap=0.1, lower="rule"),
    "lo -41": dict(scale=0.7, cap=0.1, lower=-41.0),
    "adaptive lo": dict(scale=0.7, cap=0.1, lower="adaptive"),
    "lo -41, step 1.0/sqrt(N+1) cap 0.15": dict(scale=1.0, cap=0.15, lower=-41.0),
    "lo -41, step 1.4/sqrt(N+1) cap 0.2": dict(scale=1.4, cap=0.2, lower=-41.0),
    "lo -41, step 2.0/sqrt(N+1) cap 0.3": dict(scale=2.0, cap=0.3, lower=-41.0),
    "adaptive lo, step 1.4/sqrt(N+1) cap 0.2": dict(scale=1.4, cap=0.2, lower="adaptive"),
    "float32 log-factors, prefix+suffix (current grid)": dict(scale=0.7, cap=0.1, lower="rule",
                                                              dtype=torch.float32),
}
KINDS = ("flat", "scale 3", "spiky")


def _step(n: int, scale: float, cap: float) -> float:
    return min(cap, scale / math.sqrt(n + 1.0))


def _grid_points(la: Tensor, lo: Tensor, step: float, lower: str | float) -> str:
    n = la.shape[1]
    log_r = la - lo[:, None]
    upper = quadrature_upper(n)
    extra = ""
    if lower == "rule":
        y_lo = -max(float(log_r.max()), 0.0) - 40.0
    elif lower == "adaptive":
        y_lo = adaptive_lower(log_r, upper)
        extra = f"+{len(torch.arange(-41.0, upper, 0.5))}c"
    else:
        y_lo = float(lower)
    return f"{int(math.floor((upper - y_lo) / step)) + 1}{extra}"


def options_rows(ns: tuple[int, ...], repeats: int) -> list[str]:
    gen = torch.Generator().manual_seed(2)
    small = []  # K = 7 cases like the enumeration tests: N = 2 and 4, logit scales up to 30
    for scale in (0.05, 1.0, 3.0, 30.0):
        a = torch.softmax(scale * torch.randn(BATCH, 7, generator=gen, dtype=torch.float64), 1).float()
        small += [(a, _gumbel_topk(a, n, gen)) for n in (2, 4)]
    big = {}  # (n, kind) -> (attention (B, K), idx)
    for n in ns:
        flat = torch.softmax(0.05 * torch.randn(BATCH, VIEW * VIEW, generator=gen), 1)
        for kind, a in zip(KINDS, (flat, peaked_attention("scale 3", n, gen), peaked_attention("spiky", n, gen))):
            big[n, kind] = (a, _gumbel_topk(a, n, gen))

    def reference(a: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        la, lo = set_parts(a, idx, by_sum=False)
        top = max(float((la - lo[:, None]).max()), 0.0)
        fine = variant_weights(la, lo, step=quadrature_step(idx.shape[1]) / 4, lower=-top - 60.0, upper_extra=1.0)
        return la, lo, fine

    refs_small = [reference(a, idx) for a, idx in small]
    refs_big = {key: reference(*v) for key, v in big.items()}
    worst_lib = max(float((unordered_weights(a.double().log(), idx)[0]
                           - variant_weights(la, lo, step=quadrature_step(idx.shape[1]), lower="rule")).abs().max())
                    for (a, idx), (la, lo, _) in zip(small + list(big.values()), refs_small + list(refs_big.values())))
    lines = ["ms/sample (best of repeats) [grid points M; +Nc: the adaptive rule's coarse points] per attention, "
             "and the largest |c - c_ref| over all attentions at that N (K = 32400) and over the K = 7 cases "
             "(N = 2, 4; logit scale 0.05-30):", "",
             "| option | N | " + " | ".join(KINDS) + " | max error, K = 32400 | max error, K = 7 |",
             "|---|---|" + "---|" * len(KINDS) + "---|---|"]
    for name, opt in OPTIONS.items():
        err_small = 0.0
        for (a, idx), (la, lo, fine) in zip(small, refs_small):
            step = _step(idx.shape[1], opt["scale"], opt["cap"])
            c = variant_weights(la, lo, step=step, lower=opt["lower"], dtype=opt.get("dtype", torch.float64))
            err_small = max(err_small, float((c - fine).abs().max()))
        for n in ns:
            step, err, cells = _step(n, opt["scale"], opt["cap"]), 0.0, []
            for kind in KINDS:
                la, lo, fine = refs_big[n, kind]
                run = lambda: variant_weights(la, lo, step=step, lower=opt["lower"],  # noqa: E731
                                              dtype=opt.get("dtype", torch.float64))
                err = max(err, float((run() - fine).abs().max()))
                best = min(_time(run) for _ in range(repeats))
                cells.append(f"{1e3 * best / BATCH:.3f} [{_grid_points(la, lo, step, opt['lower'])}]")
            lines.append(f"| {name} | {n} | " + " | ".join(cells) + f" | {err:.1e} | {err_small:.1e} |")
    # the K-wide part: library (log over K + masked LSE) against a masked float64 sum of the attention
    worst_outside, t_lse, t_sum = 0.0, [], []
    for a, idx in big.values():
        (la1, lo1), (la2, lo2) = set_parts(a, idx, False), set_parts(a, idx, True)
        worst_outside = max(worst_outside, float((lo1 - lo2).abs().max()), float((la1 - la2).abs().max()))
        t_lse.append(min(_time(lambda: set_parts(a, idx, False)) for _ in range(repeats)))
        t_sum.append(min(_time(lambda: set_parts(a, idx, True)) for _ in range(repeats)))
    lines += ["", f"- the re-implementation with the library's grid matches `unordered_weights` to {worst_lib:.1e}.",
              "- reference: float64, step / 4, lower end 20 further down, upper end +1. Adaptive lo: tail bound "
              "e^-37, coarse step 0.5 from -41. Timings exclude the K-wide part (next line).",
              f"- K-wide part at K = 32400: log over K + masked log-sum-exp {1e3 * statistics.fmean(t_lse) / BATCH:.3f}"
              f" ms/sample, masked float64 sum of the attention {1e3 * statistics.fmean(t_sum) / BATCH:.3f} "
              f"ms/sample; largest difference of log a(outside), log a_s between them: {worst_outside:.1e}."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 10 only, few repeats (smoke test)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ns, step_repeats, repeats = ((10,), 1, 2) if args.quick else ((10, 64, 256), 3, 7)
    start, load_before = time.perf_counter(), load_average()
    print("## Cost of the estimator weights (CPU)\n")
    print("### 1. Weights next to a full training step, batch 8, Megapixel MNIST shapes\n")
    print("\n".join(step_rows(ns, step_repeats)))
    print("\n### 2. Where the US weights spend their time\n")
    print("\n".join(profile_rows(ns, repeats)))
    print("\n### 3. Options: accuracy against a fine float64 grid, and speed\n")
    print("\n".join(options_rows(ns, repeats)))
    print(f"\n(total {time.perf_counter() - start:.1f} s; load average before {load_before}, after {load_average()}; "
          f"{torch.get_num_threads()} torch thread(s){'; --quick' if args.quick else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
