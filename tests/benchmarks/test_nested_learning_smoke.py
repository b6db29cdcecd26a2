"""benchmarks/nested_learning.py: the task's premise holds (the glyphs change the coarse view by about one grey level
and the fine level by tens; the class is readable at level 0 only), its readers return what the levels hold, the
attention it scores is a distribution, and --smoke runs end to end (the numbers are the benchmark's business)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.benchmarks.runner import run_benchmark

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.nested_learning import (  # noqa: E402
    Scene, Setup, Slides, Task, band_stats, build, glyph_mask, joint_attention, make_scene, pooled_levels, render,
)

TASK = Task(side=512, train_glyphs=(12, 12), test_glyphs=12)


def test_glyphs_are_invisible_at_the_coarse_view_and_plain_at_the_fine_level() -> None:
    scene = make_scene(TASK, "train", 1)
    bare = Scene(scene.label, scene.discs, scene.glyphs[:0], scene.stain, scene.noise_yx)
    (fine, coarse), (fine0, coarse0) = pooled_levels(TASK, scene), pooled_levels(TASK, bare)
    coarse_shift = np.abs(coarse.astype(int) - coarse0.astype(int))
    fine_shift = np.abs(fine.astype(int) - fine0.astype(int))
    assert coarse_shift.max() <= 10 and fine_shift[1].max() >= 40  # green: a grey level or so vs a bright block
    tissue = coarse0[2].astype(float)  # blue: the tissue channel
    inside = tissue > 40
    lap = tissue[1:-1, 1:-1] - (tissue[:-2, 1:-1] + tissue[2:, 1:-1] + tissue[1:-1, :-2] + tissue[1:-1, 2:]) / 4
    assert coarse_shift.mean(0)[inside].mean() < lap[inside[1:-1, 1:-1]].std()  # below the stain's own roughness
    y0, x0 = (int(v) for v in scene.glyphs[0])  # level 0: bars along the class's axis
    box = render(TASK, scene, y0, x0, TASK.glyph, TASK.glyph)[..., 1] > 200  # (g, g) lit green
    assert np.array_equal(box, glyph_mask(scene.label, TASK.glyph))
    assert glyph_mask(0, 16).sum() == glyph_mask(1, 16).sum()  # same ink either way: no class at low resolution


def test_levels_are_means_of_level_0_and_the_readers_return_them() -> None:
    data = Slides(TASK, "test", 2)
    scene = data.scenes[0]
    level0 = render(TASK, scene, 0, 0, TASK.side, TASK.side)  # (s, s, 3)
    f = TASK.fine
    expected = level0.reshape(TASK.side // f, f, TASK.side // f, f, 3).mean((1, 3))
    assert np.abs(data.fine[0].transpose(1, 2, 0).astype(float) - expected).max() <= 0.5 + 1e-4  # rounded mean
    regions = data.read_regions([0, 1], torch.tensor([[0, 256, 256, 256], [-64, 0, 256, 256]]), f)
    assert regions.shape == (2, 3, 32, 32)
    assert torch.equal(regions[0], torch.from_numpy(data.fine[0][:, :32, 32:64]).float() / 255)
    assert float(regions[1, :, :8].abs().max()) == 0  # above the slide: zero
    patches = data.read_patches([0], torch.tensor([[[100, 200, 32, 32]]]))
    assert patches.shape == (1, 1, 3, 32, 32)
    assert torch.allclose(patches[0, 0], torch.from_numpy(level0[100:132, 200:232].transpose(2, 0, 1)) / 255)
    with pytest.raises(ValueError, match="fine level"):
        data.read_regions([0], torch.tensor([[0, 0, 256, 256]]), 16)
    with pytest.raises(ValueError, match="coarse or fine level"):
        data.view([0], 16)


@pytest.mark.parametrize("name", ["nested", "ats-coarse", "ats-fine"])
def test_the_scored_attention_is_a_distribution_over_readable_patches(name: str) -> None:
    data = Slides(TASK, "test", 2)
    model = build(name, TASK, Setup())
    q, boxes, heat = joint_attention(name, model, data, [0, 1])
    assert q.shape[:2] == boxes.shape[:2] and torch.allclose(q.sum(1), torch.ones(2, dtype=q.dtype))
    assert torch.allclose(heat.flatten(1).sum(1), torch.ones(2, dtype=heat.dtype))
    assert bool((boxes[..., 2:] == 32).all())  # the 32-px patches every model reads
    expected = {"nested": (512 // 8) ** 2, "ats-coarse": (512 // 64) ** 2, "ats-fine": (512 // 8) ** 2}[name]
    assert q.shape[1] == expected  # nested: every position of every region; single-level: every cell of its view


def test_band_stats_measure_what_each_net_reads_and_build_scales_every_net() -> None:
    data = Slides(TASK, "train", 3)
    stats = band_stats(data, n_patches=64)
    coarse = data.coarse.astype(np.float64) / 255  # (n, 3, h, w)
    np.testing.assert_allclose(stats["coarse"][0], coarse.mean((0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(stats["coarse"][1], coarse.std((0, 2, 3)), rtol=1e-4)
    assert all(len(m) == len(sd) == 3 and min(sd) > 0 for m, sd in stats.values())
    assert stats["patch"][1][1] > stats["fine"][1][1]  # level 0 is rougher than its 8x mean pool
    nested, single = build("nested", TASK, Setup(), stats), build("ats-fine", TASK, Setup(), stats)
    for net, key in [(nested.coarse_net, "coarse"), (nested.fine_net, "fine"), (nested.feature_net, "patch"),
                     (single.attention_net, "fine"), (single.feature_net, "patch")]:
        assert torch.allclose(net.mean.flatten(), torch.tensor(stats[key][0])), key
    raw = build("nested", TASK, Setup())
    assert not hasattr(raw.feature_net, "mean")  # no stats: the nets read [0, 1] pixels as they are


@pytest.mark.slow
@pytest.mark.bench_smoke
def test_nested_learning_smoke(tmp_path: Path) -> None:
    raw, png = tmp_path / "learning.json", tmp_path / "heat.png"
    done = run_benchmark("nested_learning.py", "--smoke", "--json", str(raw), "--png", str(png), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "load average at start:" in out and "load average at end:" in out
    assert "| model | seed | error at" in out
    for name in ("nested", "ats-coarse", "ats-fine"):
        assert f"| {name} | 0 |" in out, name
    data = json.loads(raw.read_text())
    assert [r["model"] for r in data["results"]] == ["nested", "ats-coarse", "ats-fine"]
    for r in data["results"]:
        assert len(r["curve"]) >= 2 and r["curve"][-1]["steps"] > 0 and r["ms_per_sample"] > 0
        assert all(0 <= c["test_error"] <= 1 and 0 <= c["p_hit"] <= 1 for c in r["curve"])
    assert png.stat().st_size > 10_000
    again = run_benchmark("nested_learning.py", "--report", str(raw), timeout=120)
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert again.returncode == 0 and again.stdout.splitlines() == table  # the saved curves give the same table
    oracle = run_benchmark("nested_learning.py", "--smoke", "--oracle", "1", "4", "--oracle-steps", "3", timeout=300)
    assert oracle.returncode == 0, oracle.stdout[-3000:] + oracle.stderr[-3000:]
    assert "oracle, 1 of 4 patches on glyphs, seed 0: training loss every 50 steps [" in oracle.stdout
