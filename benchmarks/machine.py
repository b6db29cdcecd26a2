"""What the benchmarks print about the machine they ran on (imported by the scripts in this folder)."""
from __future__ import annotations


def load_average() -> str:
    """The 1, 5 and 15-minute load averages, or "n/a" where /proc/loadavg does not exist."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"
