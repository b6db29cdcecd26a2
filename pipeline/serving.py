"""Patch serving over Ray: `PatchServer` actors (thin wrappers over PatchReader) and a routing `PatchClient`.

- `PatchServer(root)` is a plain class whose methods call one `PatchReader`; `start_servers` runs N of them as
  named, restartable, concurrency-limited (threaded) Ray actors: `max_restarts` brings a killed server back and
  `max_task_retries` re-runs the calls it had in flight, so no request is lost.
- `PatchClient` routes each image id to one server by a stable hash (the same image always hits the same server,
  whose opened-array cache stays warm) and sends one call per server per request list. Its non-blocking API is
  `submit` (-> `PendingRead`s) / `wait_any` / `result`; the blocking `read` and the pipelined `read_steps` (calls in
  flight bounded with `ray.wait`) are built on it and return results in request order. Every answer carries its
  request's index and image id and `result` checks both, so a request is never answered with another's data.

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

# (image_id, boxes (n, 4) level-0, [level, [out_hw]]): out_hw resamples to that size (PatchReader.read)
Request = tuple[str, Any] | tuple[str, Any, int] | tuple[str, Any, int, tuple[int, int] | None]
# (request index, image_id, boxes, level, out_hw)
_Wire = list[tuple[int, str, np.ndarray, int, tuple[int, int] | None]]


class PatchServer:
    """What one actor does: answer batches of patch requests from a `PatchReader` over ROOT."""

    def __init__(self, root: str, max_open: int = 256) -> None:
        self.reader = PatchReader(root, max_open=max_open)

    def read_many(self, requests: _Wire) -> list[tuple[int, str, np.ndarray]]:
        """[(index, image_id, boxes, level, out_hw)] -> [(index, image_id, patches (n, C, h, w))], same order."""
        return [(idx, image_id, self.reader.read(image_id, boxes, level, out_hw))
                for idx, image_id, boxes, level, out_hw in requests]

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


@dataclass(frozen=True, slots=True)
class PendingRead:
    """One `read_many` call in flight: the request indices (positions in the submitted list) it answers, in the order
    sent, their image ids, and the call's ObjectRef. Made by `PatchClient.submit`, resolved by `PatchClient.result`."""

    indices: tuple[int, ...]
    image_ids: tuple[str, ...]
    ref: ray.ObjectRef


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

    def submit(self, requests: Sequence[Request], level: int = 0) -> list[PendingRead]:
        """Send REQUESTS without waiting: one `read_many` call per server holding any of their images, in server
        order. Each PendingRead knows the request indices (positions in REQUESTS) it answers; a request without its
        own level is read at LEVEL."""
        per_server: dict[int, _Wire] = {}
        for idx, req in enumerate(requests):
            image_id, boxes = req[0], np.asarray(req[1])
            req_level = int(req[2]) if len(req) > 2 else level  # type: ignore[misc]
            out_hw = req[3] if len(req) > 3 else None  # type: ignore[misc]
            per_server.setdefault(route(image_id, len(self.servers)), []).append(
                (idx, image_id, boxes, req_level, out_hw))
        return [PendingRead(tuple(w[0] for w in wire), tuple(w[1] for w in wire),
                            self.servers[s].read_many.remote(wire))
                for s, wire in sorted(per_server.items())]

    @staticmethod
    def wait_any(pending: Sequence[PendingRead]) -> tuple[list[PendingRead], list[PendingRead]]:
        """Block until at least one of PENDING is done (`ray.wait`, num_returns=1); returns (ready, rest), both in
        submission order."""
        if not pending:
            raise ValueError("Expected at least one PendingRead to wait for. Got none.")
        ready_refs, _ = ray.wait([p.ref for p in pending], num_returns=1)
        ready = set(ready_refs)
        return [p for p in pending if p.ref in ready], [p for p in pending if p.ref not in ready]

    @staticmethod
    def result(pending: PendingRead) -> list[tuple[int, np.ndarray]]:
        """[(request index, patches (n, C, h, w))] in the order of `pending.indices`; blocks if the call is not done,
        and raises the server's error if it failed. Every answer's index and image id are checked against what was
        sent (RuntimeError otherwise: a bug, never another request's data)."""
        answers = ray.get(pending.ref)  # [(index, image_id, patches)]
        got = [(idx, image_id) for idx, image_id, _ in answers]
        sent = list(zip(pending.indices, pending.image_ids))
        if got != sent:
            wrong = next(((g, w) for g, w in zip(got, sent) if g != w), None)
            detail = (f"request {wrong[1][0]} ({wrong[1][1]!r}) was answered as request {wrong[0][0]} "
                      f"({wrong[0][1]!r})" if wrong else f"{len(got)} answers to {len(sent)} requests")
            raise RuntimeError(f"PatchServer answers do not match the requests sent: {detail}; this is a bug in "
                               "pipeline.serving, please report it.")
        return [(idx, patches) for idx, _, patches in answers]

    def _assemble(self, n_requests: int, pending: Iterable[PendingRead]) -> list[np.ndarray]:
        """Results of one submitted request list, in request order, from its PendingReads."""
        out: list[np.ndarray | None] = [None] * n_requests
        for p in pending:
            for idx, patches in self.result(p):
                out[idx] = patches
        missing = [i for i, o in enumerate(out) if o is None]
        if missing:
            raise RuntimeError(f"PatchServer answers lack requests {missing[:5]}; this is a bug in pipeline.serving.")
        return out  # type: ignore[return-value]

    def read(self, requests: Sequence[Request], level: int = 0) -> list[np.ndarray]:
        """Patches (n_i, C, h, w) for each (image_id, boxes[, level[, out_hw]]) in request order; one call per
        server."""
        return next(self.read_steps([requests], level))

    def read_steps(self, steps: Iterable[Sequence[Request]], level: int = 0) -> Iterator[list[np.ndarray]]:
        """Pipelined `read` over many steps: yields each step's results in step order while later steps are in
        flight; at most `max_in_flight` server calls are outstanding (`wait_any` bounds them)."""
        queue: deque[tuple[int, list[PendingRead]]] = deque()  # (n requests, its calls) per step, in step order
        in_flight: list[PendingRead] = []
        done: set[PendingRead] = set()

        def drain() -> Iterator[list[np.ndarray]]:
            while queue and all(p in done for p in queue[0][1]):
                n_requests, calls = queue.popleft()
                done.difference_update(calls)
                yield self._assemble(n_requests, calls)

        def wait() -> None:
            nonlocal in_flight
            ready, in_flight = self.wait_any(in_flight)
            done.update(ready)

        for step in steps:
            step = list(step)
            while in_flight and len(in_flight) >= self.max_in_flight:
                wait()
                yield from drain()
            calls = self.submit(step, level)
            queue.append((len(step), calls))
            in_flight += calls
            yield from drain()
        while queue:
            wait()
            yield from drain()

    def low_res(self, image_id: str, level: int) -> np.ndarray:
        """A whole level (C, H_l, W_l), read by the image's server."""
        return ray.get(self._server(image_id).low_res.remote(image_id, level))

    def info(self, image_id: str) -> PyramidInfo:
        return ray.get(self._server(image_id).info.remote(image_id))

    def stats(self) -> list[ReadStats]:
        """Per-server read totals (they restart from zero when a server restarts)."""
        return ray.get([s.stats.remote() for s in self.servers])
