"""benchmarks/tissue_masks.py: the generated slides are what the task says (glyphs inside tissue, the class in their
orientation, the tissue rule finds the tissue), and `learn --smoke` runs end to end through ingest and the training
loop (the numbers are the benchmark's business)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.benchmarks.runner import run_benchmark

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.tissue_masks import GLYPH, glyph, make_slide  # noqa: E402
from pipeline.masks import tissue_mask  # noqa: E402


def test_the_slides_hold_glyphs_of_their_class_on_tissue_and_the_tissue_rule_finds_it() -> None:
    for label in (0, 1):
        slide = make_slide(seed=3 + label, label=label, side=512)  # (512, 512, 3)
        dark = (slide == np.array([70, 25, 100], np.uint8)).all(-1)  # the glyphs' bars
        assert dark.sum() >= 2 * glyph(True).sum() * 0.5
        ys, xs = np.nonzero(dark)
        assert np.ptp(xs if label == 0 else ys) >= GLYPH - 4  # bars run along x for class 0, along y for class 1
        mask = tissue_mask(slide.transpose(2, 0, 1))
        assert mask[dark].all()  # every glyph sits in what the mask calls tissue
        assert 0.02 < mask.mean() < 0.4  # tissue is a minority of the slide


@pytest.mark.slow
@pytest.mark.network  # the real sample slides
@pytest.mark.bench_smoke
def test_tissue_masks_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "learn.json"
    proc = run_benchmark("tissue_masks.py", "learn", "--smoke", "--cache", str(tmp_path / "cache"), "--json", str(out),
                         timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    runs = json.loads(out.read_text())
    assert sorted(r["min_tissue"] for r in runs) == [0.0, 0.5]
    for r in runs:
        assert len(r["test_error"]) == 1 and 0 <= r["test_error"][0] <= 1 and r["seconds"][0] > 0
    real = run_benchmark("tissue_masks.py", "real", "--draws", "3", timeout=600)
    assert real.returncode == 0, (real.stdout + real.stderr)[-4000:]
    shares = [line for line in real.stdout.splitlines() if "patches on tissue at initialisation" in line]
    assert len(shares) == 2 and all("with data.min_tissue 0.5" in line for line in shares)
