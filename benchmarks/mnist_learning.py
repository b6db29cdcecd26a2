"""Controlled Megapixel MNIST learning runs in one process: what makes ATS take off (issue 16).

    PYTHONPATH=. .venv/bin/python benchmarks/mnist_learning.py --steps 1500 --batch 16 --feature mnist_paper
    PYTHONPATH=. .venv/bin/python benchmarks/mnist_learning.py --smoke        # seconds; what the tests run

The paper's images (1500 px, 5 digits of which 3 give the label, 50 noise patterns) are made in memory by
pipeline.megapixel_mnist (the pixels jobs/ingest.py stores) and the view is their 8x box mean (188 px, the pyramid
level nearest 0.12). The model is ATSModel with the chosen nets and knobs, trained by plain torch on one thread: no
Ray, no store, so a variant costs minutes and two variants differ only in the knob under test. Every `--log-every`
steps it prints the window's train loss and error, `attention_on_objects` (the attention mass on the cells whose
patch centre lies in a label digit's box, the metric jobs/train.py logs) and the share of sampled patches that hold
a whole digit; at the end the sampled test error. The result is one JSON line (`--out` appends it to a file).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ats_model.ats import ATSConfig, ATSModel  # noqa: E402
from ats_model.memory_reader import InMemoryReader  # noqa: E402
from ats_model.nets import BandScaled, create_attention, create_feature, initialise  # noqa: E402
from benchmarks.machine import load_average  # noqa: E402
from training.objects import cells_in_boxes  # noqa: E402

VIEW_FACTOR = 8  # 1500 / 8 = 188 px: the pyramid level nearest the paper's 0.12


@dataclass(frozen=True, slots=True)
class Data:
    reader: InMemoryReader
    views: torch.Tensor  # (M, 1, h, w) float in [0, 1]
    labels: torch.Tensor  # (M,)
    targets: torch.Tensor  # (M, h, w) bool: cells whose level-0 centre lies in a label digit's box
    any_digit: torch.Tensor  # (M, h, w) float: 1 on cells whose level-0 centre lies in any digit's box
    any_object: torch.Tensor  # (M, h, w) bool: cells whose level-0 centre lies in any object's box (noise too)
    digits: list[np.ndarray]  # per image (n_digits, 4) level-0 (y0, x0, h, w) of every digit


def make_data(split: str, n: int, size: int, n_digits: int, n_noise: int, n_classes: int = 10) -> Data:
    from pipeline import megapixel_mnist as mm

    config = mm.MegapixelMNISTConfig(size=size, n_digits=n_digits, n_noise=n_noise, n_classes=n_classes)
    bank = mm.load_bank(split)
    images, labels, boxes = [], [], []
    for index in range(n):
        sample = mm.make_image(bank, split, index, config)
        images.append(sample.image)
        labels.append(int(sample.label))
        boxes.append(sample.boxes)
    reader = InMemoryReader(images)
    views = torch.cat([reader.low_res([i], VIEW_FACTOR) for i in range(n)])  # (M, 1, h, w)
    grid = tuple(views.shape[-2:])
    centre0, step = (VIEW_FACTOR / 2, VIEW_FACTOR / 2), (VIEW_FACTOR, VIEW_FACTOR)  # level-0 cell centres

    def cells(image_boxes, keep) -> torch.Tensor:  # (h, w) bool: cells inside the kept boxes
        kept = np.array([(b.y0, b.x0, b.h, b.w) for b in image_boxes if keep(b)], dtype=np.float64).reshape(-1, 4)
        return torch.from_numpy(cells_in_boxes(grid, centre0, step, kept))

    targets = torch.stack([cells(bs, lambda b, y=y: b.digit == y) for y, bs in zip(labels, boxes)])
    any_digit = torch.stack([cells(bs, lambda b: b.digit >= 0) for bs in boxes])
    any_object = torch.stack([cells(bs, lambda b: True) for bs in boxes])
    digits = [np.array([(b.y0, b.x0, b.h, b.w) for b in bs if b.digit >= 0]).reshape(-1, 4) for bs in boxes]
    return Data(reader, views, torch.tensor(labels), targets, any_digit.float(), any_object, digits)


def whole_digit_share(boxes: torch.Tensor, digits: list[np.ndarray], ids: list[int]) -> float:
    """The share of the sampled patches (B, N, 4) that contain a whole digit box."""
    hits = total = 0
    for row, i in zip(boxes.numpy(), ids):
        d = digits[i]  # (n, 4)
        inside = ((row[:, None, 0] <= d[None, :, 0]) & (row[:, None, 1] <= d[None, :, 1])
                  & (row[:, None, 0] + row[:, None, 2] >= d[None, :, 0] + d[None, :, 2])
                  & (row[:, None, 1] + row[:, None, 3] >= d[None, :, 1] + d[None, :, 3]))  # (N, n)
        hits += int(inside.any(1).sum())
        total += row.shape[0]
    return hits / max(total, 1)


class Scale(torch.nn.Module):
    def __init__(self, s: float) -> None:
        super().__init__()
        self.s = s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.s * x


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    train = make_data("train", args.n_train, args.size, args.n_digits, args.n_noise, args.n_classes)
    test = make_data("test", args.n_test, args.size, args.n_digits, args.n_noise, args.n_classes)
    print(f"data: {args.n_train} + {args.n_test} images in {time.perf_counter() - t0:.0f} s; view "
          f"{tuple(train.views.shape[-2:])}", flush=True)
    attention = initialise(create_attention(args.attention, 1), args.init)
    feature = initialise(create_feature(args.feature, 1, out_dim=args.feature_dim), args.init)
    if args.band_scaled:  # the nets read (x - mean) / std of level 0's pixels, as model.band_scaled in training
        pixels = np.stack(train.reader.images[:200]).astype(np.float64) / 255.0
        mean, std = [float(pixels.mean())], [float(pixels.std())]
        del pixels
        attention, feature = BandScaled(attention, mean, std), BandScaled(feature, mean, std)
    config = ATSConfig(n_patches=args.n_patches, patch_hw=(args.patch, args.patch), replace=args.oracle,
                       estimator=args.estimator, smoothing=args.smoothing, entropy_lambda=args.entropy)
    model = ATSModel(attention, feature, args.n_classes, config)
    initialise(model.classifier, args.init)
    if args.pooled_scale != 1.0:  # the classifier reads s * pooled: its logits can reach s times further at once
        model.classifier = torch.nn.Sequential(Scale(args.pooled_scale), model.classifier)
    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.Generator().manual_seed(args.seed + 1)
    perm, cursor = torch.randperm(args.n_train, generator=order), 0
    window: dict[str, list[float]] = {"loss": [], "err": [], "att": [], "att_any": [], "whole": []}
    history = []
    t_train = time.perf_counter()
    for step in range(1, args.steps + 1):
        if cursor + args.batch > args.n_train:
            perm, cursor = torch.randperm(args.n_train, generator=order), 0
        ids = perm[cursor:cursor + args.batch].tolist()
        cursor += args.batch
        model.train()
        low = train.views[ids]
        level0 = train.reader.level0_hw(ids)
        oracle = {"tissue": train.any_digit[ids], "min_tissue": 0.05} if args.oracle else {}
        if args.ink_mask > 0:  # what `jobs/ingest.py --mask nodata --nodata 0` + data.min_tissue give: cells whose
            oracle = {"tissue": (low[:, 0] > 0).float(), "min_tissue": args.ink_mask}  # patch holds some ink
        out = model(low, train.reader, ids, level0, low_scale=float(VIEW_FACTOR), generator=gen, **oracle)
        y = train.labels[ids]
        loss = model.loss(out, y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimiser.step()
        with torch.no_grad():
            att = model.attention_map(low)  # (B, h, w)
            window["att"].append(float((att * train.targets[ids]).sum((1, 2)).mean()))
            window["att_any"].append(float((att * train.any_object[ids]).sum((1, 2)).mean()))
        window["loss"].append(float(loss.detach()))
        window["err"].append(float((out.logits.argmax(1) != y).float().mean()))
        window["whole"].append(whole_digit_share(out.boxes, train.digits, ids))
        if step % args.log_every == 0 or step == args.steps:
            row = {k: float(np.mean(v)) for k, v in window.items()}
            row.update(step=step, samples=step * args.batch, train_s=round(time.perf_counter() - t_train, 1))
            history.append(row)
            print(f"step {step:5d}  samples {row['samples']:6d}  {row['train_s']:6.0f} s  loss {row['loss']:.3f}  "
                  f"err {row['err']:.3f}  attention_on_objects {row['att']:.4f}  on any object {row['att_any']:.4f}  "
                  f"whole-digit patches "
                  f"{row['whole']:.3f}", flush=True)
            window = {k: [] for k in window}
    train_s = time.perf_counter() - t_train
    model.eval()
    errors = 0
    with torch.no_grad():
        for start in range(0, args.n_test, 32):
            ids = list(range(start, min(start + 32, args.n_test)))
            out = model(test.views[ids], test.reader, ids, test.reader.level0_hw(ids), low_scale=float(VIEW_FACTOR),
                        generator=gen)
            errors += int((out.logits.argmax(1) != test.labels[ids]).sum())
    result = {"args": vars(args), "test_error": errors / args.n_test, "train_s": round(train_s, 1),
              "ms_per_sample": round(1000 * train_s / (args.steps * args.batch), 2), "history": history,
              "load_average": load_average()}
    print(f"test error {result['test_error']:.3f} ({args.n_test} images, sampled); {result['ms_per_sample']} ms / "
          f"sample; load {result['load_average']}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--size", type=int, default=1500)
    p.add_argument("--n-digits", type=int, default=5)
    p.add_argument("--n-noise", type=int, default=50)
    p.add_argument("--n-classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0: off)")
    p.add_argument("--attention", default="mnist_tanh")
    p.add_argument("--feature", default="mnist_paper")
    p.add_argument("--feature-dim", type=int, default=32)
    p.add_argument("--n-patches", type=int, default=10)
    p.add_argument("--patch", type=int, default=50)
    p.add_argument("--estimator", default="unordered")
    p.add_argument("--smoothing", type=float, default=1e-5)
    p.add_argument("--entropy", type=float, default=1e-4)
    p.add_argument("--init", default="torch", help="torch | glorot (ats_model.nets.initialise)")
    p.add_argument("--pooled-scale", type=float, default=1.0,
                   help="the classifier reads this times the pooled (unit-ball) feature; 1: the paper")
    p.add_argument("--band-scaled", action="store_true", help="both nets read per-band standardised input")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--oracle", action="store_true", help="training draws only patches on digits (a diagnosis: "
                   "the attention is given, does the feature net learn?); replace=true so few cells suffice")
    p.add_argument("--ink-mask", type=float, default=0.0, help="sample only cells whose patch has at least this "
                   "share of non-zero view pixels (a nodata mask at value 0); 0: off")
    p.add_argument("--out", default="", help="append the result as one JSON line to this file")
    p.add_argument("--smoke", action="store_true", help="tiny images and steps: seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.n_train, args.n_test, args.size, args.n_noise, args.steps = 8, 4, 256, 4, 4
        args.batch, args.log_every = 4, 2
    result = run(args)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
