"""Foreground masks (issue 12): do they put the patches on tissue, and does training get there sooner?

    .venv/bin/python benchmarks/tissue_masks.py real --png docs/img/tissue_masks.png      the real H&E samples (~30 s)
    .venv/bin/python benchmarks/tissue_masks.py learn --epochs 30 --seeds 0 1 --json /tmp/tissue_learn.json
                                                                                          (~30 min on 2 cores)
    .venv/bin/python benchmarks/tissue_masks.py learn --smoke                             < 60 s (the test)

`real`: the sample slides (CMU-1 region, and the JP2K/TIFF slide) ingested with `--mask tissue`; draws the mask over
each slide, and measures the share of patches that land on tissue (at least half of the patch's level-0 pixels in
the mask) when an untrained ATS model (flat attention) draws them, with data.min_tissue 0 and 0.5.

`learn`: generated H&E-like slides of 1024 px: near-white glass with 3 to 5 pink discs of tissue (about a tenth of
the slide). Inside the tissue sit 10 to 16 glyphs of 16 px, five purple bars 3 px apart, horizontal (class 0) or
vertical (class 1); each disc has its own stain, between pink and purple, with pixel noise. The slides go through
the real pipeline (PNG -> jobs/ingest --mask tissue -> the training loop, no Ray) and ATS trains on them with the
same nets, seed, data and number of epochs, with data.min_tissue 0 (attention starts flat over the glass too) and
0.5 (it starts flat over the tissue).
Prints test error per epoch with the seconds of training so far, and the time each run first reached a test error of
0.2 or less (time-to-accuracy). Timings are one run at a time, with the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import load_average  # noqa: E402

SIDE = 1024
GLYPH = 16


def glyph(horizontal: bool) -> np.ndarray:
    """(16, 16) bool: five bars of 2 px, 3 px apart."""
    g = np.zeros((GLYPH, GLYPH), bool)
    for k in range(5):
        g[1 + 3 * k:3 + 3 * k, 1:GLYPH - 1] = True
    return g if horizontal else g.T


def make_slide(seed: int, label: int, side: int = SIDE) -> np.ndarray:
    """(side, side, 3) uint8 H&E-like slide of class `label` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    pixels = np.array([240.0, 238, 242]) + rng.normal(0, 3, (side, side, 3))
    centres = []
    for _ in range(rng.integers(3, 6)):
        r = rng.integers(side // 14, side // 9)
        cy, cx = rng.integers(r, side - r, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        stain = np.array([225.0, 150, 195]) + rng.uniform(-1, 0) * np.array([40.0, 40, 15])  # pink to purple
        pixels[disc] = stain + rng.normal(0, 6, (int(disc.sum()), 3))
        centres.append((cy, cx, r))
    mark = glyph(label == 0)
    for _ in range(rng.integers(10, 17)):
        cy, cx, r = centres[rng.integers(len(centres))]
        a, d = rng.uniform(0, 2 * np.pi), rng.uniform(0, max(1, r - GLYPH))
        y, x = int(cy + d * np.sin(a)) - GLYPH // 2, int(cx + d * np.cos(a)) - GLYPH // 2
        y, x = min(max(y, 0), side - GLYPH), min(max(x, 0), side - GLYPH)
        pixels[y:y + GLYPH, x:x + GLYPH][mark] = [70, 25, 100]
    return np.clip(pixels, 0, 255).astype(np.uint8)


def build(root: Path, n_train: int, n_test: int, side: int) -> str:
    """Write the slides as PNGs with a CSV, ingest them with --mask tissue; returns the data root."""
    from PIL import Image

    from pipeline.ingest import WriteOptions, ingest_sources

    src = root / "src"
    src.mkdir(parents=True, exist_ok=True)
    lines = []
    for split, n, offset in (("train", n_train, 0), ("test", n_test, 10_000)):
        for i in range(n):
            label = i % 2
            path = src / f"{split}_{i:04d}.png"
            if not path.exists():
                Image.fromarray(make_slide(offset + i, label, side)).save(path)
            lines.append(f"{path},{label},{split}")
    (src / "slides.csv").write_text("path,label,split\n" + "\n".join(lines) + "\n")
    data = str(root / "data")
    report = ingest_sources(data, [str(src / "slides.csv")], options=WriteOptions(chunk=256, mask="tissue"),
                            workers=2)
    if not report.complete:
        raise SystemExit(report.summary())
    return data


class TimedSession:
    """training.session.LocalSession that also notes the seconds since the run started at each epoch's report."""

    def __init__(self, folder: Path) -> None:
        from training.session import LocalSession

        self.inner, self.t0, self.times = LocalSession(folder), time.monotonic(), []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def report(self, metrics, folder):
        self.times.append(time.monotonic() - self.t0)
        self.inner.report(metrics, folder)


def train(data: str, min_tissue: float, seed: int, epochs: int, folder: Path) -> dict:
    from training import config as C
    from training.loop import train_loop

    cfg = C.from_dict({
        "data": {"root": data, "low_scale": 0.125, "batch_size": 8, "min_tissue": min_tissue,
                 "n_attention_maps": 0},
        "model": {"n_patches": 8, "patch_hw": 32, "feature_dim": 32, "entropy_lambda": 1e-3, "band_scaled": True},
        "optim": {"epochs": epochs, "lr": 3e-3, "seed": seed},
        "runtime": {"progress": False, "num_workers": 1, "num_patch_servers": 0}})
    session = TimedSession(folder)
    train_loop({"config": cfg.to_dict(), "run_id": ""}, session)
    errors = [r["test_error"] for r in session.inner.reports]
    hit = next((t for t, e in zip(session.times, errors) if e <= 0.2), None)
    return {"min_tissue": min_tissue, "seed": seed, "test_error": errors, "seconds": session.times,
            "time_to_0.2": hit, "load": os.getloadavg()[0]}


def learn(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    root = Path(args.cache)
    t = time.monotonic()
    data = build(root, args.n_train, args.n_test, args.side)
    print(f"data: {args.n_train} train + {args.n_test} test slides of {args.side} px in {time.monotonic() - t:.0f} s; "
          f"load average {load_average()}", flush=True)
    results = []
    for seed in args.seeds:
        for min_tissue in (0.5, 0.0):
            with tempfile.TemporaryDirectory() as folder:
                r = train(data, min_tissue, seed, args.epochs, Path(folder))
            results.append(r)
            steps = " ".join(f"{e:.3f}@{s:.0f}s" for e, s in zip(r["test_error"], r["seconds"]))
            print(f"seed {seed} min_tissue {min_tissue}: test error per epoch {steps}; first <= 0.2 at "
                  f"{r['time_to_0.2'] if r['time_to_0.2'] is None else round(r['time_to_0.2'])} s; "
                  f"load {r['load']:.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def real(args: argparse.Namespace) -> None:
    import torch

    from pipeline import datasets
    from pipeline.ingest import WriteOptions, ingest_sources
    from pipeline.reader import PatchReader
    from training import config as C
    from training.data import LowResViews, load_split
    from training.models import build_model

    samples = datasets.fetch_samples()
    names = ["cmu_small_region.svs", "slide.tiff"]
    with tempfile.TemporaryDirectory() as tmp:
        report = ingest_sources(tmp, [str(samples[n]) for n in names], options=WriteOptions(mask="tissue"),
                                workers=2)
        assert report.complete, report.summary()
        reader = PatchReader(tmp)
        examples, classes = load_split(tmp, "train")
        shares = {}
        for min_tissue in (0.0, 0.5):
            views = LowResViews(reader, 1 / 16, min_tissue)
            torch.manual_seed(0)
            cfg = C.from_dict({"model": {"n_patches": 10, "patch_hw": 128}})
            model = build_model(cfg.model, 3, max(2, len(classes))).core
            for e in examples:
                batch = views.batch([e])
                level0_mask = reader.mask(e.image_id, 0)
                on, total = 0, 0
                for draw in range(args.draws):
                    plan = model.plan(batch.low, batch.level0_hw, batch.low_hw, low_scale=batch.low_scale,
                                      generator=torch.Generator().manual_seed(draw), **batch.masking)
                    for y0, x0, h, w in plan.boxes[0].tolist():
                        box = level0_mask[max(y0, 0):y0 + h, max(x0, 0):x0 + w]
                        on += box.sum() >= 0.5 * h * w
                        total += 1
                shares[(e.image_id, min_tissue)] = on / total
        for e in examples:
            info = reader.info(e.image_id)
            print(f"{e.image_id}: {info.height}x{info.width} px, tissue fraction {info.tissue_fraction:.3f}; patches "
                  f"on tissue at initialisation: {shares[(e.image_id, 0.0)]:.3f} unmasked, "
                  f"{shares[(e.image_id, 0.5)]:.3f} with data.min_tissue 0.5 ({args.draws} draws of 10)")
        if args.png:
            draw_masks(reader, [e.image_id for e in examples], args.png)
    print(f"load average {load_average()}")


def draw_masks(reader, image_ids: list[str], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(image_ids), figsize=(5 * len(image_ids), 5.5))
    for ax, image_id in zip(np.atleast_1d(axes), image_ids):
        info = reader.info(image_id)
        level = min(2, info.levels - 1)
        ax.imshow(reader.low_res(image_id, level)[:3].transpose(1, 2, 0))
        ax.contour(reader.mask(image_id, level), levels=[0.5], colors="lime", linewidths=1.2)
        ax.set_title(f"{image_id}: tissue {info.tissue_fraction:.0%}")
        ax.axis("off")
    fig.suptitle("jobs/ingest.py --mask tissue: the stored OME-NGFF label (green outline)")
    fig.tight_layout()
    fig.savefig(png, dpi=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("real", help="masks and on-tissue shares on the real sample slides")
    r.add_argument("--draws", type=int, default=50)
    r.add_argument("--png", default="")
    lr = sub.add_parser("learn", help="time-to-accuracy with and without masks on generated slides")
    lr.add_argument("--epochs", type=int, default=30)
    lr.add_argument("--seeds", type=int, nargs="+", default=[0])
    lr.add_argument("--n-train", type=int, default=192)
    lr.add_argument("--n-test", type=int, default=64)
    lr.add_argument("--side", type=int, default=SIDE)
    lr.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "gats-tissue-learn"))
    lr.add_argument("--json", default="")
    lr.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs")
    args = p.parse_args()
    print(f"load average at start: {load_average()}", flush=True)
    if args.what == "real":
        real(args)
    else:
        if args.smoke:
            args.epochs, args.seeds, args.n_train, args.n_test, args.side = 1, [0], 8, 4, 256
        learn(args)


if __name__ == "__main__":
    main()
