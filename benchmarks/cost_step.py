"""One configuration (method x image side) of benchmarks/cost_vs_size.py, run alone in a fresh process.

    python benchmarks/cost_vs_size.py --one '<Job as JSON>'      prints one line "RESULT <json>" on stdout

The step is the training job's own: `training.data.LowResViews.batch` (the low-res view, or the CNN's level, read
whole from the stored pyramid), the model's training forward (`training.models`) with a `training.data.DirectFetcher`
over a `PatchReader` (ATS/U read their sampled patches, Deep MIL every grid patch, from the same pyramid), backward, Adam step. The view cache
is emptied after every step, so each timed step reads its pixels again: the cost of a sample seen for the first
time. Deep MIL never looks at `batch.low`, so its batch carries a 1-pixel placeholder view instead of a read one.

Order in the process: imports, torch.set_num_threads(1), the address space the imports took (VmSize), the memory
cap (RLIMIT_AS = that + cap; on CUDA a per-process memory fraction instead), set-up, warm-up steps, then the timed
steps inside `training.memory.StepMemory` (CPU) or between `torch.cuda.reset_peak_memory_stats` and
`max_memory_allocated` (CUDA). An allocation failure is reported as status "oom", not raised.
"""
from __future__ import annotations

import dataclasses
import json
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

MB = 2**20


@dataclass(frozen=True, slots=True)
class Method:
    """A row of the table: a training.config.ModelConfig name plus the knobs that differ between rows."""

    name: str  # "ATS-10", "Deep MIL", "CNN-0.5", ...
    model: str  # ats | uniform | deepmil | cnn
    n_patches: int = 10
    cnn_scale: float = 1.0  # cnn only: the pyramid level nearest this fraction of level 0

    @property
    def capped(self) -> bool:
        """Deep MIL and the CNN grow with the image: estimated first, run under the cap."""
        return self.model in ("deepmil", "cnn")


@dataclass(frozen=True, slots=True)
class Job:
    """Everything the child process needs, passed as JSON."""

    method: Method
    side: int
    image_id: str
    label: int
    root: str
    view_px: int  # ats/uniform: the level nearest this side is the low-res view
    warmup: int  # at most this many warm-up steps; one when the first takes over a third of budget_s
    min_steps: int
    max_steps: int
    budget_s: float  # timed steps: as many as fit in this, within [min_steps, max_steps]
    cap_gb: float  # extra address space (CPU) or device memory (CUDA) allowed after the imports
    device: str = "cpu"
    seed: int = 0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @staticmethod
    def from_json(text: str) -> Job:
        values = json.loads(text)
        return Job(**{**values, "method": Method(**values["method"])})


def is_allocation_error(error: BaseException) -> bool:
    """MemoryError, or a RuntimeError of a failed allocation (torch's CPU/CUDA allocators, thread stacks)."""
    if isinstance(error, MemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("can't allocate", "cannot allocate", "out of memory", "can't start new thread",
                            "bad_alloc", "unable to allocate"))


def _make_step(job: Job, device: Any) -> tuple[Callable[[], float], dict[str, Any]]:
    """Set-up (reader, model, optimiser, generator) and the step function, which returns its own seconds."""
    import torch

    from training.config import ModelConfig, OptimConfig
    from training.data import Batch, DirectFetcher, Example, LowResViews
    from training.models import build_model
    from pipeline.reader import PatchReader

    m = job.method
    reader = PatchReader(job.root)
    info = reader.info(job.image_id)
    fetcher = DirectFetcher(reader)
    model = build_model(ModelConfig(name=m.model, n_patches=m.n_patches), info.channels, 10).to(device).train()
    optim = OptimConfig()
    optimiser = torch.optim.Adam(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    generator = torch.Generator(device=device).manual_seed(job.seed)
    example = Example(job.image_id, job.label, info.height, info.width, info.channels)
    views = None
    if m.model != "deepmil":
        scale = m.cnn_scale if m.model == "cnn" else min(1.0, job.view_px / max(info.height, info.width))
        views = LowResViews(reader, scale)
    level = reader.level_for_scale(job.image_id, views.scale) if views else -1
    extra = {"level": level, "level_hw": list(info.shapes[level]) if views else [1, 1],
             "params": sum(p.numel() for p in model.parameters())}

    def step() -> float:
        start = time.perf_counter()
        if views is None:  # Deep MIL reads every grid patch itself; the view is never used
            batch = Batch([example.image_id], torch.tensor([example.label]), torch.zeros(1, info.channels, 1, 1),
                          torch.tensor([[1, 1]]), torch.tensor([[info.height, info.width]]),
                          torch.tensor([[1.0, 1.0]], dtype=torch.float64))
        else:
            batch = views.batch([example])  # low (1, C, h, w) read whole from the pyramid level
        batch = batch.to(device)
        optimiser.zero_grad(set_to_none=True)
        loss, _ = model(batch, fetcher, None, generator)
        loss.backward()
        optimiser.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        took = time.perf_counter() - start
        if views is not None:
            views.cache.clear()  # the next step reads the view again
        return took

    return step, extra


def run_job(job: Job) -> dict[str, Any]:
    """Run one configuration in this process; the result dict is what the parent tabulates."""
    import torch

    import training.data  # noqa: F401  (the imports the step needs, before the address space is measured)
    import training.models  # noqa: F401
    from training.memory import StepMemory, vm_size_mb

    torch.set_num_threads(1)
    out: dict[str, Any] = {"method": job.method.name, "side": job.side, "threads": torch.get_num_threads()}
    if job.device == "cuda" and not torch.cuda.is_available():
        return {**out, "status": "no-cuda"}
    device = torch.device(job.device)
    vm_base = vm_size_mb()
    out["vm_after_imports_mb"] = vm_base
    if device.type == "cpu":
        limit = int((vm_base + job.cap_gb * 1024) * MB)
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    else:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, job.cap_gb * 1024**3 / total), device)
    try:
        step, extra = _make_step(job, device)
        out.update(extra)
        warm = [step()]
        while len(warm) < job.warmup and warm[0] < job.budget_s / 3:  # a slow config warms up once
            warm.append(step())
        out["warmup_s"] = warm
        n = max(job.min_steps, min(job.max_steps, int(job.budget_s / max(min(warm), 1e-6))))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            resting = torch.cuda.memory_allocated(device)
            times = [step() for _ in range(n)]
            step_mb = (torch.cuda.max_memory_allocated(device) - resting) / MB
            method = "torch.cuda.max_memory_allocated minus memory_allocated at the start"
        else:
            with StepMemory() as mem:
                times = [step() for _ in range(n)]
            step_mb, method = mem.step_mb, mem.method
    except (MemoryError, RuntimeError) as error:
        if not is_allocation_error(error):
            raise
        return {**out, "status": "oom", "error": f"{type(error).__name__}: {str(error)[:300]}"}
    return {**out, "status": "ok", "times_s": times, "median_ms": 1000 * statistics.median(times),
            "step_mb": step_mb, "memory_method": method}
