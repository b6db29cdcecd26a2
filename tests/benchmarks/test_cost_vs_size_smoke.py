"""benchmarks/cost_vs_size.py --smoke runs end to end: pyramids generated lazily, one fresh process per
configuration, the table, the ratios, the targets, the plot and the raw JSON, with one estimated OOM forced by the
smoke's tight cap on CNN-1 (the numbers themselves are the benchmark's business; here the wiring and their sanity)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.benchmarks.runner import run_benchmark


@pytest.mark.slow
@pytest.mark.network  # the pyramids are drawn from real MNIST digits (load_bank)
@pytest.mark.bench_smoke
def test_cost_vs_size_smoke(tmp_path: Path) -> None:
    plot, raw = tmp_path / "cost.png", tmp_path / "cost.json"
    done = run_benchmark("cost_vs_size.py", "--smoke", "--plot", str(plot), "--json", str(raw), timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    out = done.stdout
    assert "| method | 256 px | 512 px | 1,024 px |" in out
    for row in ("| ATS-10 |", "| Deep MIL |", "| CNN-1 |"):
        assert row in out
    assert "| CNN-1 | " in out and "OOM (est. " in out  # the forced estimate, not run
    assert "load average at start:" in out and "load average at end:" in out and "Targets:" in out
    assert "(c) ATS-10 time and step memory at most 1.2x the 256 px figure up to 1,024 px" in out
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"

    rows = json.loads(raw.read_text())
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 6 and {r["method"] for r in ok} == {"ATS-10", "Deep MIL", "CNN-1"}
    for r in ok:
        assert math.isfinite(r["ms"]) and r["ms"] > 0 and math.isfinite(r["mb"]) and r["mb"] > 0, r
        assert r["steps"] == 2 and r["raw"]["threads"] == 1
    [est] = [r for r in rows if r["status"] == "oom-est"]
    assert (est["method"], est["side"]) == ("CNN-1", 512) and est["est_mb"] > 0
    ats = [r for r in ok if r["method"] == "ATS-10"]
    assert [r["side"] for r in ats] == [256, 512, 1024] and {tuple(r["raw"]["level_hw"]) for r in ats} == {(64, 64)}
