"""benchmarks/reliability_s3.py --smoke runs end to end (its own moto server behind the fault proxy): faults of every
kind injected and retried, the faulty ingest equal to the clean one, the outage stopped with the endpoint named and
finished by a rerun (the figures themselves are the benchmark's business; here the wiring and their sanity)."""
from __future__ import annotations

import re

import pytest

from tests.benchmarks.runner import run_benchmark


@pytest.mark.slow
@pytest.mark.network  # the images are drawn from real MNIST digits
@pytest.mark.bench_smoke
def test_reliability_s3_smoke() -> None:
    done = run_benchmark("reliability_s3.py", "--smoke", timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    out = done.stdout
    assert "load average at start:" in out and "load average at end:" in out
    clean = re.search(r"^\| clean \| [0-9.]+ \| (\d+) \| 0 \(0%\) \| 0 \| 0 \| 0 \| 0 \| 0 \| 0 \| 4/4 \|$", out, re.M)
    faulty = re.search(r"^\| faulty \(seed 7\) \| [0-9.]+ \| (\d+) \| (\d+) \(\d+%\) \| (\d+) \| (\d+) \| (\d+) "
                       r"\| (\d+) \| (\d+) \| 0 \| 4/4 \|$", out, re.M)
    assert clean and faulty, out
    requests, faults, *kinds, retried = (int(v) for v in faulty.groups())
    assert faults == sum(kinds) and all(k > 0 for k in kinds) and retried > 0 and requests > int(clean.group(1))
    assert "faulty ingest == clean ingest (every level of every image, checksums): yes" in out
    outage = re.search(r"^\| ([0-9.]+) \| [0-9.]+ \| storage unreachable: http://127\.0\.0\.1:\d+ .*\| not written \| "
                       r"[0-9.]+ \| \d+ / 4 \|$", out, re.M)
    assert outage and float(outage.group(1)) < 20, out
    assert "after the rerun, the outage root == clean ingest: yes" in out
