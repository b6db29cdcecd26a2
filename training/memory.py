"""Process memory on Linux, measured the way the benchmarks and the training job report it (DESIGN "What every run
records"): the memory a training step itself needs, not the interpreter's.

    settle()                 give freed heap back to the OS (glibc malloc_trim), then reset the RSS high-water mark
    rss_mb(), hwm_mb()       current RSS and its high-water mark since the last reset (VmRSS, VmHWM)
    with StepMemory() as m:  ... steps ...;  m.step_mb = high-water mark during the block minus RSS at its start
    m = StepMemory().start(); ... steps ...; m.stop()      the same without a block

Why not `ru_maxrss` minus a resting RSS: ru_maxrss never resets (set-up and warm-up peaks hide the step's), and RSS
sampled between steps misses the peak inside backward. Writing "5" to /proc/self/clear_refs resets VmHWM to the
current RSS (Linux >= 4.0); `malloc_trim(0)` first returns the heap the allocator kept from warm-up, so the resting
level is what is really in use. Where either is unavailable (not Linux, no glibc), `reset_ok` is False and the figure
is an upper bound that includes the earlier peaks; callers print the method next to the number.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
from dataclasses import dataclass

_STATUS = "/proc/self/status"


def _status_kb(field: str) -> float:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return float("nan")


def vm_size_mb() -> float:
    """Virtual address space now (VmSize), MiB: what RLIMIT_AS limits."""
    return _status_kb("VmSize") / 1024


def rss_mb() -> float:
    """Resident set size now, MiB."""
    return _status_kb("VmRSS") / 1024


def hwm_mb() -> float:
    """RSS high-water mark since the process started or since the last `reset_peak()`, MiB."""
    hwm = _status_kb("VmHWM")
    if hwm != hwm:  # no /proc: ru_maxrss (KiB on Linux) never resets
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return hwm / 1024


def trim() -> bool:
    """Collect garbage and return free heap pages to the OS (glibc only); True when malloc_trim ran."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS; True when the kernel accepted it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def settle() -> bool:
    """`trim()` then `reset_peak()`; True when the high-water mark was really reset."""
    trim()
    return reset_peak()


@dataclass
class StepMemory:
    """`step_mb` = RSS high-water mark between `start()` and `stop()` (or inside a `with` block) minus the RSS at the
    (settled) start."""

    resting_mb: float = 0.0
    step_mb: float = 0.0
    reset_ok: bool = False

    def start(self) -> StepMemory:
        self.reset_ok = settle()
        self.resting_mb = rss_mb()
        return self

    def stop(self) -> float:
        self.step_mb = max(0.0, hwm_mb() - self.resting_mb)
        return self.step_mb

    def __enter__(self) -> StepMemory:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def method(self) -> str:
        return ("RSS high-water mark (VmHWM, reset via /proc/self/clear_refs after malloc_trim) minus the RSS at the "
                "start" if self.reset_ok else "ru_maxrss minus the RSS at the start (upper bound: no HWM reset)")

