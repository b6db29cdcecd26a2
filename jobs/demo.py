"""In-memory demo: ATS-N against uniform sampling (U-N) on a generated task where a few tiny objects decide the class.

    python jobs/demo.py              (what `make demo-memory` runs; about a minute on 2 CPU cores)

The task (ats_model/synthetic.py): noisy 128x128 canvases with three 12x12 glyphs, horizontal or vertical bars; the
class is unreadable in the 16x16 low-resolution view (256 cells, the glyphs cover about 6.5% of them). Both models
share the feature net, patch size and N; only the attention differs. Prints train/test error, time per sample
(training step, after a warm-up epoch; not a benchmark) and the attention mass that falls on the objects.
`make demo` runs the full pipeline instead (jobs/demo_pipeline.py).
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from ats_model.ats import ATSConfig, ATSModel
from ats_model.memory_reader import InMemoryReader
from ats_model.nets import create_attention, create_feature
from ats_model.synthetic import BarsTask, make_split, mass_on_objects
from ats_model.training import evaluate, train_step

log = logging.getLogger("demo")
FACTOR = 8  # low-res view = level 0 downsampled 8x


@dataclass(frozen=True, slots=True)
class DemoConfig:
    n_train: int = 400
    n_test: int = 200
    epochs: int = 12
    batch_size: int = 16
    n_patches: int = 6
    size: int = 128
    patch: int = 16
    lr: float = 3e-3
    entropy_lambda: float = 0.01
    seed: int = 0


@dataclass(frozen=True, slots=True)
class DemoResult:
    name: str
    train_error: float
    test_error: float
    test_error_topk: float
    ms_per_sample: float
    mass_on_objects: float


def _batches(reader: InMemoryReader, ids: np.ndarray, labels: np.ndarray, batch_size: int):
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size].tolist()
        yield reader.low_res(chunk, FACTOR), chunk, reader.level0_hw(chunk), torch.from_numpy(labels[chunk])


def run(attention_name: str, name: str, cfg: DemoConfig, data) -> DemoResult:
    (train_imgs, train_y, _), (test_imgs, test_y, test_boxes) = data
    torch.manual_seed(cfg.seed)
    model = ATSModel(
        create_attention(attention_name, 1),
        create_feature("lenet1", 1, out_dim=32),
        n_classes=2,
        config=ATSConfig(n_patches=cfg.n_patches, patch_hw=(cfg.patch, cfg.patch), entropy_lambda=cfg.entropy_lambda),
    )
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    train_reader, test_reader = InMemoryReader(train_imgs), InMemoryReader(test_imgs)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    seconds = samples = 0.0
    for epoch in range(cfg.epochs):
        errors = count = 0
        for low, ids, hw, y in _batches(train_reader, rng.permutation(len(train_imgs)), train_y, cfg.batch_size):
            start = time.perf_counter()
            step = train_step(model, optimiser, low, train_reader, ids, hw, y, low_scale=FACTOR, generator=gen)
            if epoch > 0 or cfg.epochs == 1:  # the first epoch warms up thread pools and allocators
                seconds += time.perf_counter() - start
                samples += len(ids)
            errors, count = errors + step.errors, count + step.count
        log.info("%s epoch %d: train error %.3f", name, epoch + 1, errors / count)
    test_batches = list(_batches(test_reader, np.arange(len(test_imgs)), test_y, cfg.batch_size))
    test_error = evaluate(model, test_batches, test_reader, mode="sampled", low_scale=FACTOR, generator=gen)
    test_error_topk = evaluate(model, test_batches, test_reader, mode="topk", low_scale=FACTOR)
    with torch.no_grad():
        low = test_reader.low_res(range(len(test_imgs)), FACTOR)
        attention = model.attention_map(low)  # (B, Ha, Wa)
    mass = float(np.mean([mass_on_objects(a.numpy(), b, FACTOR) for a, b in zip(attention, test_boxes)]))
    return DemoResult(name, errors / count, test_error, test_error_topk, 1000 * seconds / samples, mass)


DEFAULTS = DemoConfig()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=DEFAULTS.epochs)
    parser.add_argument("--n-train", type=int, default=DEFAULTS.n_train)
    parser.add_argument("--n-test", type=int, default=DEFAULTS.n_test)
    parser.add_argument("--n-patches", type=int, default=DEFAULTS.n_patches)
    parser.add_argument("--size", type=int, default=DEFAULTS.size, help="canvas side in pixels")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
    parser.add_argument("--smoke-test", action="store_true", help="tiny run that only checks the wiring")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = DemoConfig(n_train=args.n_train, n_test=args.n_test, epochs=args.epochs, n_patches=args.n_patches,
                     size=args.size, seed=args.seed)
    if args.smoke_test:
        cfg = DemoConfig(n_train=32, n_test=16, epochs=1, n_patches=args.n_patches, size=args.size, seed=args.seed)
    task = BarsTask(size=cfg.size, seed=cfg.seed)
    data = (make_split(task, cfg.n_train, "train"), make_split(task, cfg.n_test, "test"))
    k = (task.size // FACTOR) ** 2
    print(f"Task: {cfg.n_train} train / {cfg.n_test} test images of {task.size}x{task.size}, {task.n_objects} "
          f"glyphs of {task.glyph}px; low-res view {task.size // FACTOR}x{task.size // FACTOR} = {k} cells; "
          f"N = {cfg.n_patches} patches of {cfg.patch}px; {cfg.epochs} epochs.")
    results = [run("mnist_tanh", f"ATS-{cfg.n_patches}", cfg, data), run("uniform", f"U-{cfg.n_patches}", cfg, data)]
    print()
    print("| model | train error | test error (sampled) | test error (top-k) | ms / sample (CPU) | attention on objects |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r.name} | {r.train_error:.3f} | {r.test_error:.3f} | {r.test_error_topk:.3f} | "
              f"{r.ms_per_sample:.1f} | {r.mass_on_objects:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
