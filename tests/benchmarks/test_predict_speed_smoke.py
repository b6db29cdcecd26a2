"""benchmarks/predict_speed.py --smoke runs end to end: pyramids of 400 and 800 px, an untrained ATS-10 checkpoint,
`training.predict.predict` timed in one fresh process per side, the tiling baseline (measured whole, or estimated
from a sample when over the smoke's tiny budget: typically 400 px measured, 800 px estimated), the markdown table and the JSON (the numbers themselves are
the benchmark's business; here the wiring and their sanity)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.benchmarks.runner import run_benchmark

HEADER = "| side | MP | view | predict s/image |"
NUMBER = re.compile(r"[0-9][0-9,]*(?:\.([0-9]+))?")


def parse(cell: str) -> tuple[float, float]:
    """The first number of a table cell and half a unit of its last shown decimal (its rounding)."""
    match = NUMBER.search(cell)
    assert match, cell
    decimals = len(match.group(1) or "")
    return float(match.group(0).replace(",", "")), 0.5 * 10.0 ** -decimals


@pytest.mark.slow
@pytest.mark.network  # the pyramids are drawn from real MNIST digits (load_bank)
@pytest.mark.bench_smoke
def test_predict_speed_smoke(tmp_path: Path) -> None:
    raw = tmp_path / "predict_speed.json"
    done = run_benchmark("predict_speed.py", "--smoke", "--json", str(raw), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "load average at start:" in out and "load average at end:" in out
    assert done.stderr.count("load average at start") == 4 and done.stderr.count("load average at end") == 4

    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(HEADER))
    header = [c.strip() for c in lines[at].strip("|").split("|")]
    rows = {}
    for line in lines[at + 2:]:
        if not line.startswith("|"):
            break
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        rows[int(cells["side"].replace(",", ""))] = cells
    assert sorted(rows) == [400, 800]

    tiling = {}
    for side, cells in rows.items():
        (p, dp), (t, dt), (ratio, dr) = (parse(cells[k]) for k in ("predict s/image", "tiling s/image",
                                                                    "tiling / predict"))
        assert p > 0 and t > 0, cells
        # the ratio shown equals tiling / predict as shown, within the rounding of all three
        assert (t - dt) / (p + dp) - dr <= ratio <= (t + dt) / (p - dp) + dr, cells
        assert parse(cells["tiles"])[0] == (side // 50) ** 2
        tiling[side] = t
    assert tiling[800] > tiling[400], tiling  # 4x the tiles

    result = json.loads(raw.read_text())
    by_side = {r["side"]: r for r in result["rows"]}
    assert sorted(by_side) == [400, 800]
    for r in by_side.values():
        assert r["raw"]["predict"]["threads"] == 1 and r["raw"]["tiling"]["threads"] == 1
        assert r["predict_s"] > r["inference_s"] > 0 and r["split_s"]["patches"] > 0 and r["split_s"]["features"] > 0
        assert abs(sum(r["split_s"].values()) - r["predict_s"]) < 1e-6  # the split adds up to the total
        assert r["ratio"] == pytest.approx(r["tiling_s"] / r["predict_s"])
        # measured whole only when the sample's estimate fits the (tiny) budget; else the estimate, said so
        estimated = "(est. from" in rows[r["side"]]["tiling s/image"]
        assert estimated == (not r["tiling_measured"]) == (r["tiling_passes"] == 0)
        assert (r["tiling_estimate_s"] > r["raw"]["tiling"]["budget_s"]) == estimated
