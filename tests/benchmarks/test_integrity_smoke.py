"""benchmarks/integrity.py --smoke runs end to end: the codec timings side by side, every flip of one chunk (all typed
with crc32c, some silent without: the reason for the codec), and the train job's fail-fast cases (exit 2, one line)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks.runner import run_benchmark


@pytest.mark.slow
@pytest.mark.network  # real MNIST digits and the real H&E sample
@pytest.mark.bench_smoke
def test_integrity_smoke(tmp_path: Path) -> None:
    raw = tmp_path / "integrity.json"
    done = run_benchmark("integrity.py", "--smoke", "--json", str(raw), timeout=300)
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
