"""Where a training loop runs: inside a Ray Train worker (`RaySession`) or in this process (`LocalSession`, tests).

A session answers the few questions the loop has of its surroundings: rank and world size, the device, how to wrap
the model for data parallelism, the newest complete checkpoint to resume from, and how to report an epoch's metrics
and checkpoint. `all_reduce` sums (or maxes) numbers over the workers, the identity without a process group.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Protocol, Sequence

import torch
from torch import nn

from training import checkpoint


class Session(Protocol):
    rank: int
    world: int
    is_ray: bool  # inside a Ray Train worker (progress bars go through Ray's tqdm)

    def device(self) -> torch.device: ...
    def prepare(self, model: nn.Module) -> nn.Module: ...
    def latest(self) -> str | None: ...
    def report(self, metrics: dict[str, float], folder: str | None) -> None: ...


class LocalSession:
    """World of one, checkpoints copied into `checkpoint_dir/epoch_<k>`; what tests use to run the loop without Ray."""

    is_ray = False

    def __init__(self, checkpoint_dir: str | Path, device: str = "cpu") -> None:
        self.dir = Path(checkpoint_dir)
        self.reports: list[dict[str, float]] = []
        self.rank, self.world = 0, 1
        self._device = torch.device(device)

    def device(self) -> torch.device:
        return self._device

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def latest(self) -> str | None:
        return checkpoint.latest([str(p) for p in self.dir.glob("epoch_*")])

    def report(self, metrics: dict[str, float], folder: str | None) -> None:
        self.reports.append(metrics)
        if folder:
            shutil.copytree(folder, self.dir / f"epoch_{int(metrics['epoch']):04d}", dirs_exist_ok=True)


class RaySession:
    """Inside a Ray Train worker. `run_dir`: the run's checkpoint folder on a local or shared file system."""

    is_ray = True

    def __init__(self, run_dir: str = "") -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.run_dir = run_dir

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def prepare(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def latest(self) -> str | None:
        """The newest complete checkpoint: Ray's, or a newer one found in the run folder. Ray Train registers a
        reported checkpoint when its controller next polls the workers, so a worker that dies right after
        `report` leaves a checkpoint on storage that Ray does not hand back; we would redo that epoch otherwise."""
        import ray.train

        candidates = []
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            candidates.append(ckpt.to_directory())
        if self.run_dir and Path(self.run_dir).is_dir():
            candidates += [str(p.parent) for p in Path(self.run_dir).glob(f"checkpoint_*/{checkpoint.EPOCH_FILE}")]
        return checkpoint.latest(candidates)

    def report(self, metrics: dict[str, float], folder: str | None) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None)


def all_reduce(values: Sequence[float], op: str = "sum") -> list[float]:
    """Sum (or max) over workers; identity without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()
