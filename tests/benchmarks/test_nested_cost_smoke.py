"""benchmarks/nested_cost.py --smoke runs end to end: one fresh process per row (features alone, nested M = 2 and
single-level n = 8 at 8192 and 16384 px), the tables, the ratios, the targets and the raw JSON (the numbers themselves
are the benchmark's business; here the wiring and their sanity: nested attention pixels flat in the side,
single-level's growing as side^2). Plus the generated image's coordinates: a region read equals the view's crop."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from tests.benchmarks.runner import run_benchmark

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.nested_cost import SyntheticSlide  # noqa: E402


def test_synthetic_slide_reads_agree_with_its_views() -> None:
    slide = SyntheticSlide(5000, seed=3)
    view = slide.view(16)  # (1, 3, 313, 313): ceil(5000 / 16)
    assert view.shape == (1, 3, 313, 313) and 0 <= float(view.min()) and float(view.max()) <= 1
    assert float(view.std()) > 0.05  # not a flat image
    regions = slide.read_regions(["a", "a"], torch.tensor([[0, 0, 4096, 4096], [4096, 0, 4096, 4096]]), 16)
    assert regions.shape == (2, 3, 256, 256)
    assert torch.equal(regions[0], view[0, :, :256, :256])  # the same pixel centres, the same values
    assert torch.equal(regions[1, :, :57], view[0, :, 256:, :256])  # 313 - 256 = 57 rows inside
    assert float(regions[1, :, 57:].abs().max()) == 0  # outside the image: zero
    patches = slide.read_patches(["a"], torch.tensor([[[-128, 100, 256, 256], [4990, 4990, 256, 256]]]))
    assert patches.shape == (1, 2, 3, 256, 256) and slide.patches_read == 2 and slide.regions_read == 2
    assert float(patches[0, 0, :, :128].abs().max()) == 0 and float(patches[0, 0, :, 128:].min()) > 0
    again = SyntheticSlide(5000, seed=3).read_patches(["a"], torch.tensor([[[-128, 100, 256, 256]]]))
    assert torch.equal(again[0, 0], patches[0, 0])  # deterministic


@pytest.mark.slow
@pytest.mark.bench_smoke
def test_nested_cost_smoke(tmp_path: Path) -> None:
    raw = tmp_path / "nested_cost.json"
    done = run_benchmark("nested_cost.py", "--smoke", "--json", str(raw), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "load average at start:" in out and "load average at end:" in out
    assert done.stderr.count("load average before") == 5 and done.stderr.count("load average after") == 5
    for line in ("| side (px) | model | patches | attention px / sample |", "| 8,192 | nested M=2, N=4 | 8 |",
                 "| 16,384 | single-level 1/16, n=8 | 8 |", "| patches | time (ms) | step memory (MB) |",
                 "| side (px) | M (n) | time ratio | step memory ratio |", "| side (px) | model | coarse net |",
                 "Targets:", "- nested M=2 flat in the side (8,192 .. 16,384 px): attention px max/min 1.02x"):
        assert line in out, line

    data = json.loads(raw.read_text())
    rows = {(r["kind"], r["side"]): r for r in data["rows"]}
    assert set(rows) == {("features", 0), ("nested", 8192), ("nested", 16384), ("single", 8192), ("single", 16384)}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["threads"] == 1 and len(r["times_s"]) == 2 and all(t > 0 for t in r["times_s"])
        assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0 and math.isfinite(r["step_mb"]) and r["step_mb"] > 0
        assert r["patches_read"] == 8 and r["load_before"] and r["load_after"]
        assert sum(r["split_ms"].values()) == pytest.approx(r["median_ms"], rel=0.5)
    for side in (8192, 16384):  # attention px: the model's own count (nested), the view's pixels (single)
        assert rows[("nested", side)]["attention_px"] == math.ceil(side / 256) ** 2 + 2 * 256**2
        assert rows[("nested", side)]["regions_per_sample"] == 2 and rows[("nested", side)]["regions_read"] == 2
        assert rows[("single", side)]["attention_px"] == (side // 16) ** 2
    nested = rows[("nested", 16384)]["attention_px"] / rows[("nested", 8192)]["attention_px"]
    single = rows[("single", 16384)]["attention_px"] / rows[("single", 8192)]["attention_px"]
    assert nested < 1.05 and single == pytest.approx(4.0, rel=0.1)  # flat vs side^2
