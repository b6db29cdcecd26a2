"""Patch serving over Ray: `PatchServer` actors (thin wrappers over PatchReader) and a routing `PatchClient`.

- `PatchServer(root)` is a plain class whose methods call one `PatchReader`; `start_servers` runs N of them as
  named, restartable, concurrency-limited (threaded) Ray actors: `max_restarts` brings a killed server back and
  `max_task_retries` re-runs the calls it had in flight, so no request is lost.
- `PatchClient` routes each image id to one server by a stable hash (the same image always hits the same server,
  whose opened-array cache stays warm), sends one call per server per step, bounds the calls in flight with
  `ray.wait`, and returns results in request order. Every answer carries its request's index and image id and the
  client checks both, so a request is never answered with another request's data.

This is the only module of `pipeline/` that imports ray.
"""
from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from pipeline.pyramid import PyramidInfo
from pipeline.reader import PatchReader, ReadStats

Request = tuple[str, Any] | tuple[str, Any, int]  # (image_id, boxes (n, 4) level-0, [level])
_Wire = list[tuple[int, str, np.ndarray, int]]  # (request index, image_id, boxes, level)


class PatchServer:
    """What one actor does: answer batches of patch requests from a `PatchReader` over ROOT."""

    def __init__(self, root: str, max_open: int = 256) -> None:
        self.reader = PatchReader(root, max_open=max_open)

    def read_many(self, requests: _Wire) -> list[tuple[int, str, np.ndarray]]:
        """[(index, image_id, boxes, level)] -> [(index, image_id, patches (n, C, h, w))], same order."""
        return [(idx, image_id, self.reader.read(image_id, boxes, level)) for idx, image_id, boxes, level in requests]

    def low_res(self, image_id: str, level: int) -> np.ndarray:
        return self.reader.low_res(image_id, level)

    def info(self, image_id: str) -> PyramidInfo:
        return self.reader.info(image_id)

    def stats(self) -> ReadStats:
        return self.reader.stats

    def ping(self) -> int:
        """The server's process id (changes when Ray restarts it)."""
        return os.getpid()


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """Ray options of the server actors; defaults suit a 2-CPU laptop and a cluster alike."""

    name_prefix: str = "gats-patch-server"
    namespace: str | None = None
    max_concurrency: int = 4  # threads per actor (PatchReader is thread-safe)
    max_restarts: int = -1  # restart forever
    max_task_retries: int = -1  # re-run in-flight calls of a restarted server
    num_cpus: float = 0.0  # I/O bound: do not take CPUs from training workers

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError(f"Expected max_concurrency >= 1. Got {self.max_concurrency}.")
        if self.num_cpus < 0:
            raise ValueError(f"Expected num_cpus >= 0. Got {self.num_cpus}.")


def server_name(options: ServerOptions, index: int) -> str:
    return f"{options.name_prefix}-{index}"


def start_servers(root: str, n_servers: int, options: ServerOptions = ServerOptions()) -> list[ray.actor.ActorHandle]:
    """Start (or attach to, by name) N PatchServer actors over ROOT; needs `ray.init` to have run."""
    if n_servers < 1:
        raise ValueError(f"Expected n_servers >= 1. Got {n_servers}.")
    cls = ray.remote(PatchServer)
    handles = [
        cls.options(
            name=server_name(options, i),
            namespace=options.namespace,
            get_if_exists=True,
            max_concurrency=options.max_concurrency,
            max_restarts=options.max_restarts,
            max_task_retries=options.max_task_retries,
            num_cpus=options.num_cpus,
        ).remote(root)
        for i in range(n_servers)
    ]
    ray.get([h.ping.remote() for h in handles])
    return handles


def route(image_id: str, n_servers: int) -> int:
    """Stable server index for an image id (same in every process, unlike hash())."""
    digest = hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n_servers


class PatchClient:
    """Routes patch requests over PatchServer actors; picklable, so training workers can share one."""

    def __init__(self, servers: Sequence[ray.actor.ActorHandle], *, max_in_flight: int = 8) -> None:
        if not servers:
            raise ValueError("Expected at least one PatchServer handle: call start_servers(root, n) first.")
        if max_in_flight < 1:
            raise ValueError(f"Expected max_in_flight >= 1. Got {max_in_flight}.")
        self.servers = list(servers)
        self.max_in_flight = max_in_flight

    @classmethod
    def start(cls, root: str, n_servers: int = 2, *, options: ServerOptions = ServerOptions(),
              max_in_flight: int = 8) -> PatchClient:
        return cls(start_servers(root, n_servers, options), max_in_flight=max_in_flight)

    def _server(self, image_id: str) -> ray.actor.ActorHandle:
        return self.servers[route(image_id, len(self.servers))]

    def _submit(self, requests: Sequence[Request], level: int) -> list[ray.ObjectRef]:
        """One `read_many` call per server holding any of this step's images."""
        per_server: dict[int, _Wire] = {}
        for idx, req in enumerate(requests):
            image_id, boxes = req[0], np.asarray(req[1])
            req_level = int(req[2]) if len(req) > 2 else level  # type: ignore[misc]
            per_server.setdefault(route(image_id, len(self.servers)), []).append((idx, image_id, boxes, req_level))
        return [self.servers[s].read_many.remote(batch) for s, batch in sorted(per_server.items())]

    @staticmethod
    def _collect(requests: Sequence[Request], answers: Iterable[list[tuple[int, str, np.ndarray]]]) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(requests)
        for answer in answers:
            for idx, image_id, patches in answer:
                if image_id != requests[idx][0] or out[idx] is not None:
                    raise RuntimeError(
                        f"PatchServer answered request {idx} with image {image_id!r} (expected {requests[idx][0]!r}); "
                        "this is a bug in pipeline.serving, please report it."
                    )
                out[idx] = patches
        missing = [i for i, o in enumerate(out) if o is None]
        if missing:
            raise RuntimeError(f"PatchServer answers lack requests {missing[:5]}; this is a bug in pipeline.serving.")
        return out  # type: ignore[return-value]

    def read(self, requests: Sequence[Request], level: int = 0) -> list[np.ndarray]:
        """Patches (n_i, C, h, w) for each (image_id, boxes[, level]) in request order; one call per server."""
        return next(self.read_steps([requests], level))

    def read_steps(self, steps: Iterable[Sequence[Request]], level: int = 0) -> Iterator[list[np.ndarray]]:
        """Pipelined `read` over many steps: yields each step's results in step order while later steps are in
        flight; at most `max_in_flight` server calls are outstanding (`ray.wait` bounds them)."""
        pending: deque[tuple[Sequence[Request], list[ray.ObjectRef]]] = deque()
        done: set[ray.ObjectRef] = set()

        def in_flight() -> list[ray.ObjectRef]:
            return [r for _, refs in pending for r in refs if r not in done]

        def drain_ready() -> Iterator[list[np.ndarray]]:
            while pending and all(r in done for r in pending[0][1]):
                reqs, refs = pending.popleft()
                done.difference_update(refs)
                yield self._collect(reqs, ray.get(refs))

        for step in steps:
            step = list(step)
            while pending and len(in_flight()) >= self.max_in_flight:
                ready, _ = ray.wait(in_flight(), num_returns=1)
                done.update(ready)
                yield from drain_ready()
            pending.append((step, self._submit(step, level)))
            yield from drain_ready()
        while pending:
            ready, _ = ray.wait(in_flight(), num_returns=len(in_flight()))
            done.update(ready)
            yield from drain_ready()

    def low_res(self, image_id: str, level: int) -> np.ndarray:
        """A whole level (C, H_l, W_l), read by the image's server."""
        return ray.get(self._server(image_id).low_res.remote(image_id, level))

    def info(self, image_id: str) -> PyramidInfo:
        return ray.get(self._server(image_id).info.remote(image_id))

    def stats(self) -> list[ReadStats]:
        """Per-server read totals (they restart from zero when a server restarts)."""
        return ray.get([s.stats.remote() for s in self.servers])
