"""The I/O benchmark runs end to end on tiny sizes (local + S3 via its own moto server) and reads exactly the
chunk-touched minimum of bytes. Ray rows are left to test_serving.py, which starts Ray already."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_io_patches_smoke() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "io_patches.py"), "--smoke", "--no-ray"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "| local | direct PatchReader | 256 |" in out and "| s3 | direct PatchReader | 256 |" in out
    byte_rows = [line for line in out.splitlines() if line.startswith("| 128 |") or line.startswith("| 512 |")]
    assert len(byte_rows) == 2 and all("| 1.000 |" in line for line in byte_rows)
