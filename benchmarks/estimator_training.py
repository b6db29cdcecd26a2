"""Training evidence for the unordered-set estimator (issue 6): ATS without replacement, ORD vs US, on the in-memory task.

Megapixel MNIST training through jobs/train.py does not exist yet, so this uses the generated bars task of the
in-memory demo (ats_model/synthetic.py), made harder so that learning takes several epochs and the attention
sharpens over them. For each estimator ("ordered" = ORD, "unordered" = US) and seed it trains ATS-N (mnist_tanh
attention on the 8x low-res view, lenet1 features on full-resolution patches, replace=False) for the same epochs,
and after every epoch (and once before the first) it records:

- train error (the epoch's running error), test error (mode "sampled", the training estimator);
- attention entropy (nats, mean over the test images; exp(H) is the effective number of cells), the attention mass
  on the objects' cells, and the attention mass inside the sampled set on the probe batch (the note's driver of
  the gain: US tends to the exact value as that mass tends to 1);
- the GRADIENT VARIANCE at the current parameters: on a fixed probe batch, R forward + backward passes with R
  different sampling seeds; the total variance (sum over parameters of the per-element variance, ddof = 1) of the
  attention-net gradient and of the feature-net gradient, for BOTH estimators at the same parameters, whichever
  trains the model. The r-th pass of both estimators uses the same sampling seed, so both see the same sampled sets
  (common random numbers): the ratio US/ORD compares the weights alone. The loss includes the entropy term, whose
  gradient is deterministic and adds no variance.

Default config and why: 256x256 canvases (low-res view 32x32, K = 1024 cells, against 256 in the demo), 4 glyphs of
12 px (about 1.6% of the cells), N = 10 patches of 16 px (ATS-10, as in the issue), 320 train / 160 test images,
batch 16, Adam 3e-3, 12 epochs, R = 16 on a probe batch of 8 training images, seeds 0, 1, 2 for both estimators
(same init, data order and sampling seeds per seed). With K = 1024 and N = 10 uniform sampling sees a glyph in
about 1 image in 6 and the low-res blobs are faint, so the model needs several epochs to learn where to look (in
trials: flat attention, entropy ~ log 1024 = 6.9, for 5-9 epochs depending on the seed, then within 1-2 epochs
peaked on the glyphs, entropy ~ 2, 80-90% of the mass inside the sample): both regimes of the note, flat and peaked, in one run. At 192
px (K = 576) and N = 8 the dynamics were the same; 128 px (the demo) learns in 1-2 epochs, too fast to show them.
Each run costs 12 x (320 training samples + 2 x 16 x 8 probe samples + 160 test samples); all six runs took 2 minutes
with one torch thread on 2 CPU cores shared at load average 4-7 (the printed total and load say how long here). A larger K or N would be closer to
Megapixel MNIST but would not fit that budget.

Run: python benchmarks/estimator_training.py [--quick] [--threads T] [--epochs E] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ats_model.ats import ATSConfig, ATSModel
from ats_model.memory_reader import InMemoryReader
from ats_model.nets import create_attention, create_feature
from ats_model.synthetic import BarsTask, make_split, mass_on_objects
from ats_model.training import evaluate, train_step
from machine import load_average  # benchmarks/machine.py (the script's own folder is on sys.path)

FACTOR = 8  # low-res view = level 0 downsampled 8x (as in jobs/demo.py)
ESTIMATORS = ("ordered", "unordered")
SHORT = {"ordered": "ORD", "unordered": "US"}


@dataclass(frozen=True, slots=True)
class BenchConfig:
    size: int = 256
    n_objects: int = 4
    glyph: int = 12
    n_patches: int = 10
    patch: int = 16
    n_train: int = 320
    n_test: int = 160
    epochs: int = 12
    batch_size: int = 16
    lr: float = 3e-3
    entropy_lambda: float = 0.01
    probe_batch: int = 8
    probe_repeats: int = 16
    seeds: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        if self.probe_repeats < 2:
            raise ValueError(f"Expected probe_repeats >= 2 (a variance needs two draws). Got {self.probe_repeats}.")
        if self.probe_batch > self.n_train:
            raise ValueError(f"Expected probe_batch <= n_train = {self.n_train}. Got {self.probe_batch}.")


QUICK = BenchConfig(size=128, n_patches=6, n_train=32, n_test=16, epochs=2, batch_size=16, probe_batch=4,
                    probe_repeats=4, seeds=(0,))


@dataclass(frozen=True, slots=True)
class EpochRecord:
    estimator: str  # the one that trains the model
    seed: int
    epoch: int  # 0 = before training
    train_error: float  # nan at epoch 0
    test_error: float
    entropy: float  # nats, mean over test images
    mass_on_objects: float
    mass_in_sample: float  # attention mass inside the sampled set, probe batch
    var_attention: dict[str, float]  # estimator -> total variance of the attention-net gradient
    var_feature: dict[str, float]
    ci_attention: tuple[float, float]  # bootstrap 95% interval of var US / var ORD (replicates resampled in pairs)
    ci_feature: tuple[float, float]


# ------------------------------------------------------------------------------------------------ data
def _batches(reader: InMemoryReader, ids: np.ndarray, labels: np.ndarray, batch_size: int):
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size].tolist()
        yield reader.low_res(chunk, FACTOR), chunk, reader.level0_hw(chunk), torch.from_numpy(labels[chunk])


def make_data(cfg: BenchConfig):
    task = BarsTask(size=cfg.size, glyph=cfg.glyph, n_objects=cfg.n_objects, seed=0)
    return task, make_split(task, cfg.n_train, "train"), make_split(task, cfg.n_test, "test")


def build_model(cfg: BenchConfig, estimator: str, seed: int) -> ATSModel:
    torch.manual_seed(seed)
    config = ATSConfig(n_patches=cfg.n_patches, patch_hw=(cfg.patch, cfg.patch), replace=False,
                       estimator=estimator, entropy_lambda=cfg.entropy_lambda)
    return ATSModel(create_attention("mnist_tanh", 1), create_feature("lenet1", 1, out_dim=32), 2, config)


# ------------------------------------------------------------------------------------------------ measurements
def _flat_grad(module: torch.nn.Module) -> Tensor:
    return torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel())
                      for p in module.parameters()])


def _total_variance(grads: Tensor) -> float:
    return float(grads.var(0).sum())  # (R, P) -> sum over parameters of the per-element variance (ddof = 1)


def _bootstrap_ratio(num: Tensor, den: Tensor, seed: int, resamples: int = 200) -> tuple[float, float]:
    """95% percentile interval of total_variance(num) / total_variance(den), resampling the R pass indices (the
    same indices for both: pass r of each estimator saw the same sampled sets).

    A resample with counts w (R,) has total variance (w.q - w'Gw / R) / (R - 1), G = X X' the (R, R) Gram matrix
    of the passes and q its diagonal: every resample from one matrix product.
    """
    r = num.shape[0]
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(r, (resamples, r), generator=gen)  # (resamples, R)
    counts = torch.zeros(resamples, r, dtype=torch.float64).scatter_add_(1, picks, torch.ones(resamples, r,
                                                                                             dtype=torch.float64))

    def total_variances(x: Tensor) -> Tensor:
        gram = x @ x.T  # (R, R)
        return (counts @ gram.diagonal() - ((counts @ gram) * counts).sum(1) / r) / (r - 1)  # (resamples,)

    ratios = (total_variances(num) / total_variances(den).clamp_min(1e-300)).sort().values
    return float(ratios[int(0.025 * resamples)]), float(ratios[int(0.975 * resamples) - 1])


def probe_gradient_variance(model: ATSModel, probe, reader: InMemoryReader, repeats: int, seed: int):
    """Total gradient variance of the attention and feature nets under each estimator at the current parameters.

    Pass r of every estimator samples with the generator seeded (seed, r): the same sets for both estimators.
    Returns ({estimator: var_attention}, {estimator: var_feature}, bootstrap interval of the attention ratio US/ORD,
    that of the feature ratio, mean attention mass inside the sampled set).
    """
    low, ids, hw, targets = probe
    trained_with = model.config
    var_a, var_f, masses, stacked = {}, {}, [], {}
    try:
        for estimator in ESTIMATORS:
            model.config = dataclasses.replace(trained_with, estimator=estimator)
            grads_a, grads_f = [], []
            for r in range(repeats):
                gen = torch.Generator().manual_seed(seed * 100_003 + r)
                model.zero_grad(set_to_none=True)
                out = model(low, reader, ids, hw, mode="sampled", generator=gen)
                model.loss(out, targets).backward()
                grads_a.append(_flat_grad(model.attention_net))
                grads_f.append(_flat_grad(model.feature_net))
                if estimator == ESTIMATORS[0]:
                    drawn = out.attention.detach().flatten(1).gather(1, out.indices)  # (B, N)
                    masses.append(float(drawn.sum(1).mean()))
            stacked[estimator] = torch.stack(grads_a).double(), torch.stack(grads_f).double()  # (R, P) each
            var_a[estimator] = _total_variance(stacked[estimator][0])
            var_f[estimator] = _total_variance(stacked[estimator][1])
    finally:
        model.config = trained_with
        model.zero_grad(set_to_none=True)
    ci_a, ci_f = (_bootstrap_ratio(stacked["unordered"][i], stacked["ordered"][i], seed) for i in (0, 1))
    return var_a, var_f, ci_a, ci_f, statistics.fmean(masses)


@torch.no_grad()
def attention_stats(model: ATSModel, low: Tensor, boxes: list[np.ndarray]) -> tuple[float, float]:
    """Mean entropy (nats) and mean mass on the objects' cells of the attention over the given low-res views."""
    maps = model.attention_map(low)  # (B, Ha, Wa); stride-1 grid
    a = maps.flatten(1)  # (B, K)
    entropy = float(-(a * torch.log(a.clamp_min(1e-38))).sum(1).mean())
    mass = statistics.fmean(mass_on_objects(m.numpy(), b, FACTOR) for m, b in zip(maps, boxes))
    return entropy, mass


def train_run(cfg: BenchConfig, estimator: str, seed: int, data, log=print) -> list[EpochRecord]:
    _, (train_imgs, train_y, _), (test_imgs, test_y, test_boxes) = data
    model = build_model(cfg, estimator, seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    train_reader, test_reader = InMemoryReader(train_imgs), InMemoryReader(test_imgs)
    probe_ids = np.arange(cfg.probe_batch)
    probe = next(_batches(train_reader, probe_ids, train_y, cfg.probe_batch))
    test_batches = list(_batches(test_reader, np.arange(len(test_imgs)), test_y, cfg.batch_size))
    test_low = torch.cat([b[0] for b in test_batches])
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    records = []
    for epoch in range(cfg.epochs + 1):
        train_error = math.nan
        if epoch > 0:
            errors = count = 0
            for low, ids, hw, y in _batches(train_reader, rng.permutation(len(train_imgs)), train_y,
                                            cfg.batch_size):
                step = train_step(model, optimiser, low, train_reader, ids, hw, y, generator=gen)
                errors, count = errors + step.errors, count + step.count
            train_error = errors / count
        test_gen = torch.Generator().manual_seed(10_000 + seed * 100 + epoch)
        test_error = evaluate(model, test_batches, test_reader, mode="sampled", generator=test_gen)
        entropy, mass = attention_stats(model, test_low, test_boxes)
        var_a, var_f, ci_a, ci_f, in_sample = probe_gradient_variance(model, probe, train_reader,
                                                                      cfg.probe_repeats, seed * 1000 + epoch)
        records.append(EpochRecord(estimator, seed, epoch, train_error, test_error, entropy, mass, in_sample,
                                   var_a, var_f, ci_a, ci_f))
        log(f"  {SHORT[estimator]} seed {seed} epoch {epoch}: train {train_error:.3f} test {test_error:.3f} "
            f"H {entropy:.2f} on-objects {mass:.1%} in-sample {in_sample:.1%} "
            f"var_att US/ORD {var_a['unordered'] / var_a['ordered']:.3f} "
            f"var_feat US/ORD {var_f['unordered'] / var_f['ordered']:.3f}")
    return records


# ------------------------------------------------------------------------------------------------ tables
def _mean_se(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values) / math.sqrt(len(values)):.3f}"


def _gmean(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def final_table(records: list[EpochRecord], epochs: int) -> list[str]:
    lines = ["| trained with | seeds | final train error | final test error (sampled) | attention entropy (nats) "
             "| mass on objects | mass in sample | first epoch with test error < 0.1, per seed |",
             "|---|---|---|---|---|---|---|---|"]
    for estimator in ESTIMATORS:
        last = [r for r in records if r.estimator == estimator and r.epoch == epochs]
        found = []
        for seed in sorted({r.seed for r in last}):
            hits = [r.epoch for r in records if r.estimator == estimator and r.seed == seed and r.test_error < 0.1]
            found.append(str(min(hits)) if hits else "-")
        lines.append(
            f"| {SHORT[estimator]} | {len(last)} | {_mean_se([r.train_error for r in last])} | "
            f"{_mean_se([r.test_error for r in last])} | {_mean_se([r.entropy for r in last])} | "
            f"{_mean_se([r.mass_on_objects for r in last])} | {_mean_se([r.mass_in_sample for r in last])} | "
            f"{', '.join(found)} |"
        )
    return lines


MASS_BINS = ((0.0, 0.05), (0.05, 0.5), (0.5, 0.8), (0.8, 1.01))


def mass_table(records: list[EpochRecord]) -> list[str]:
    """The ratios pooled over every (run, epoch) by the attention mass inside the sample, the note's driver."""
    lines = ["| mass in sample | measurements | att-grad var US/ORD | US better / worse (95%) | feat-grad var US/ORD "
             "| US better / worse (95%) | mean entropy |",
             "|---|---|---|---|---|---|---|"]
    for lo, hi in MASS_BINS:
        rows = [r for r in records if lo <= r.mass_in_sample < hi]
        if not rows:
            lines.append(f"| {lo:.0%}–{min(hi, 1):.0%} | 0 | – | – | – | – | – |")
            continue
        ra = [r.var_attention["unordered"] / r.var_attention["ordered"] for r in rows]
        rf = [r.var_feature["unordered"] / r.var_feature["ordered"] for r in rows]
        better_a, worse_a = sum(r.ci_attention[1] < 1 for r in rows), sum(r.ci_attention[0] > 1 for r in rows)
        better_f, worse_f = sum(r.ci_feature[1] < 1 for r in rows), sum(r.ci_feature[0] > 1 for r in rows)
        lines.append(
            f"| {lo:.0%}–{min(hi, 1):.0%} | {len(rows)} | {_range(ra)} | {better_a} / {worse_a} | {_range(rf)} | "
            f"{better_f} / {worse_f} | {statistics.fmean(r.entropy for r in rows):.2f} |"
        )
    return lines


def epoch_table(records: list[EpochRecord], epochs: int) -> list[str]:
    lines = ["| epoch | att-grad var US/ORD (all runs) | feat-grad var US/ORD (all runs) | att ratio, ORD-trained "
             "| att ratio, US-trained | entropy ORD-tr. | entropy US-tr. | mass in sample | test error ORD-tr. "
             "| test error US-tr. |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for epoch in range(epochs + 1):
        rows = [r for r in records if r.epoch == epoch]
        by = {e: [r for r in rows if r.estimator == e] for e in ESTIMATORS}
        ratio_a = [r.var_attention["unordered"] / r.var_attention["ordered"] for r in rows]
        ratio_f = [r.var_feature["unordered"] / r.var_feature["ordered"] for r in rows]
        ratio_by = {e: [r.var_attention["unordered"] / r.var_attention["ordered"] for r in by[e]] for e in by}
        lines.append(
            f"| {epoch} | {_range(ratio_a)} | {_range(ratio_f)} | {_gmean(ratio_by['ordered']):.3f} | "
            f"{_gmean(ratio_by['unordered']):.3f} | {statistics.fmean(r.entropy for r in by['ordered']):.2f} | "
            f"{statistics.fmean(r.entropy for r in by['unordered']):.2f} | "
            f"{statistics.fmean(r.mass_in_sample for r in rows):.1%} | "
            f"{statistics.fmean(r.test_error for r in by['ordered']):.3f} | "
            f"{statistics.fmean(r.test_error for r in by['unordered']):.3f} |"
        )
    return lines


def _range(ratios: list[float]) -> str:
    """Geometric mean, and the range over runs."""
    return f"{_gmean(ratios):.3f} ({min(ratios):.2f}–{max(ratios):.2f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny run that checks the wiring (< 30 s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else BenchConfig()
    if args.epochs is not None:
        cfg = dataclasses.replace(cfg, epochs=args.epochs)
    if args.seeds is not None:
        cfg = dataclasses.replace(cfg, seeds=tuple(args.seeds))
    start = time.perf_counter()
    load_before = load_average()
    data = make_data(cfg)
    k = (cfg.size // FACTOR) ** 2
    print("## Training: ordered (ORD) vs unordered-set (US) weights, ATS without replacement\n")
    print(f"Bars task {cfg.size}x{cfg.size}, {cfg.n_objects} glyphs of {cfg.glyph} px, {cfg.n_train} train / "
          f"{cfg.n_test} test; K = {k} cells, N = {cfg.n_patches} patches of {cfg.patch} px; mnist_tanh + lenet1; "
          f"batch {cfg.batch_size}, Adam {cfg.lr:g}, entropy lambda {cfg.entropy_lambda:g}; {cfg.epochs} epochs; "
          f"seeds {list(cfg.seeds)}; gradient variance from R = {cfg.probe_repeats} passes on a probe batch of "
          f"{cfg.probe_batch}; torch threads {torch.get_num_threads()}.\n")
    records: list[EpochRecord] = []
    for seed in cfg.seeds:
        for estimator in ESTIMATORS:
            records += train_run(cfg, estimator, seed, data, log=lambda s: print(s, file=sys.stderr, flush=True))
    print("### (a) After the last epoch: mean ± standard error over seeds\n")
    print("\n".join(final_table(records, cfg.epochs)))
    print("\n### (b) Per epoch: gradient variance US/ORD at the same parameters, attention entropy\n")
    print("\n".join(epoch_table(records, cfg.epochs)))
    print("\n### (c) All measurements by the attention mass inside the sample\n")
    print("\n".join(mass_table(records)))
    print(f"\nRatios: geometric mean over runs (range in brackets); 'all runs' pools the {len(records) // (cfg.epochs + 1)}"
          f" runs, whichever estimator trained them. Epoch 0 is the initial model. Mass in sample: attention mass "
          f"inside the sampled set on the probe batch. Test error: sampled evaluation with the training estimator. "
          f"Better / worse (95%): measurements whose bootstrap 95% interval of the ratio (R passes resampled in "
          f"pairs, 200 resamples) lies below / above 1.")
    print(f"\n(total {time.perf_counter() - start:.1f} s; load average before {load_before}, after {load_average()}"
          f"{'; --quick' if args.quick else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
