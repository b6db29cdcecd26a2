"""jobs/verify.py (gats-verify): exit 0 on a sound dataset, 1 naming each damaged image, 2 without a manifest;
--repair then an ingest rerun restores exactly the damaged images."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from jobs import verify
from pipeline.ingest import WriteOptions, ingest_sources
from pipeline.manifest import read_manifest


def test_verify_reports_repairs_and_exits_by_outcome(tmp_path: Path, capsys) -> None:
    sources = []
    for i in range(3):
        np.save(tmp_path / f"s{i}.npy", np.random.default_rng(i).integers(0, 256, (70, 64), dtype=np.uint8))
        sources.append(str(tmp_path / f"s{i}.npy"))
    root = str(tmp_path / "root")
    options = WriteOptions(chunk=32, min_size=32, patch_size=16)
    assert ingest_sources(root, sources, options=options).complete
    assert verify.main([root, "--no-progress"]) == 0
    assert "3/3 complete images verified" in capsys.readouterr().out

    chunk = tmp_path / "root" / "images" / "s1.zarr" / "0" / "c" / "0" / "1" / "1"
    chunk.write_bytes(chunk.read_bytes()[:-1])
    assert verify.main([root, "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "1 damaged" in out and "s1: damaged: Chunk '0/c/0/1/1'" in out and "level 0, chunk (y=1, x=1)" in out
    assert verify.main([root, "--images", "s0", "s2", "--no-progress"]) == 0  # the others are sound
    capsys.readouterr()

    assert verify.main([root, "--repair", "--no-progress"]) == 1
    assert "repaired: removed 1 damaged pyramids (s1)" in capsys.readouterr().out
    assert [r.status for r in read_manifest(root)[0]] == ["complete", "failed", "complete"]
    rerun = ingest_sources(root, sources, options=options)
    assert [o.skipped for o in rerun.outcomes] == [True, False, True] and rerun.complete
    assert verify.main([root, "--no-progress"]) == 0

    assert verify.main([str(tmp_path / "nothing"), "--no-progress"]) == 2
    assert "verify: error:" in capsys.readouterr().err
