"""benchmarks/integrity.py --smoke runs end to end: the codec timings side by side, every flip of one chunk (all typed
with crc32c, some silent without: the reason for the codec), and the train job's fail-fast cases (exit 2, one line)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.network  # real MNIST digits and the real H&E sample
def test_integrity_smoke(tmp_path: Path) -> None:
    raw = tmp_path / "integrity.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "integrity.py"), "--smoke", "--json", str(raw)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "load average at start:" in done.stdout and "| blosc zstd-5 + crc32c (now) |" in done.stdout
    result = json.loads(raw.read_text())
    crc, plain = result["flips"]["crc32c"], result["flips"]["plain"]
    assert crc["typed"] == crc["bytes"] > 0 and crc["wrong_pixels"] == crc["same_pixels"] == crc["other_error"] == 0
    assert plain["wrong_pixels"] + plain["same_pixels"] > 0  # without the checksum some flips decode
    assert crc["bytes"] == plain["bytes"] + 4  # the codec's whole price in bytes: 4 per chunk
    assert all(r["exit"] == 2 and r["one_line"] for r in result["fail_fast"])
    for image in ("codec", "codec_he"):
        for variant in ("crc32c", "plain"):
            assert result[image][variant]["write"] > 0 and result[image][variant]["read"] > 0
