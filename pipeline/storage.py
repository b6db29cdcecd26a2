"""Storage roots: a local folder or `s3://bucket/prefix`, behind one small interface.

Everything the pipeline writes lives under a ROOT (see DESIGN "Storage layout"). This module is the only place that
knows whether ROOT is a folder or an object store:

- `Storage(root)` reads, writes (atomically on a folder: temp file + rename; one PUT on S3), lists and deletes keys
  relative to ROOT, with bounded retries.
- `Storage.zarr_store(key)` gives a zarr v3 store for a sub-path (LocalStore or FsspecStore) wrapped in
  `CountingStore`, which counts the bytes and keys it fetched and retries transient errors on the same key.

S3 endpoint and credentials come from the standard AWS environment variables (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, ...); they are never logged. Transient
object-store errors are retried `RetryPolicy.attempts` times with exponential backoff on the SAME key, then raise
`StorageError` naming the key; a failed read is never replaced by anything else.

Retry layers (docs/reliability.md): an S3 request can be retried by botocore, by s3fs and by us. Only ours is left
on: botocore gets `total_max_attempts=1` and s3fs `retries=1`, so one operation makes at most
`RetryPolicy.attempts` requests, each bounded by `S3_CONNECT_TIMEOUT_S` to connect and `S3_READ_TIMEOUT_S` per read.
The worst case for one key is `RetryPolicy.worst_case_s()`; with the endpoint refusing connections it is well under
a second.
"""
from __future__ import annotations

import asyncio
import functools
import os
import posixpath
import re
import shutil
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from pipeline.errors import CorruptChunkError, ImageNotFoundError, StorageError

T = TypeVar("T")

IMAGES_DIR = "images"
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded exponential backoff: waits base_delay_s * 2**k before retry k (k = 0 .. attempts-2)."""

    attempts: int = 4
    base_delay_s: float = 0.05
    max_delay_s: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"Expected RetryPolicy.attempts >= 1. Got {self.attempts}.")
        if self.base_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError("Expected non-negative RetryPolicy delays.")

    def delay_s(self, retry: int) -> float:
        return min(self.max_delay_s, self.base_delay_s * (2**retry))

    def worst_case_s(self, request_timeout_s: float = 0.0) -> float:
        """Longest one operation can take before it raises: every attempt times out, every backoff is waited."""
        return self.attempts * request_timeout_s + sum(self.delay_s(k) for k in range(self.attempts - 1))


DEFAULT_RETRY = RetryPolicy()
S3_CONNECT_TIMEOUT_S = 5.0  # botocore: seconds to open a connection
S3_READ_TIMEOUT_S = 30.0  # botocore: seconds without a byte from an open connection
_CHUNK_KEY = re.compile(r"^(?P<level>\d+)/c/(?P<coords>\d+(?:/\d+)*)$")  # zarr v3 default chunk key of a level


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying on the same key (network, throttling, 5xx); False for missing keys etc."""
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
        return True
    module = type(exc).__module__ or ""
    if module.startswith(("botocore", "aiobotocore", "aiohttp", "urllib3")):
        return True
    return isinstance(exc, OSError)


@functools.cache
def _retryable_errors() -> tuple[type[BaseException], ...]:
    """What an object-store call can raise that `is_transient` may classify as worth retrying: OSError (fsspec and
    s3fs translate most failures into it; ConnectionError and TimeoutError are OSErrors) and the HTTP stack's own
    error types (botocore, aiohttp, urllib3). Anything else is a bug or a permanent error and propagates at once."""
    types: list[type[BaseException]] = [OSError, asyncio.TimeoutError]
    try:
        import botocore.exceptions

        types += [botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError]
    except ImportError:  # s3fs (and so botocore) is only needed for s3:// roots
        pass
    try:
        import aiohttp

        types.append(aiohttp.ClientError)
    except ImportError:
        pass
    try:
        import urllib3.exceptions

        types.append(urllib3.exceptions.HTTPError)
    except ImportError:
        pass
    return tuple(types)


def _fail(key: str, attempts: int, exc: BaseException) -> StorageError:
    return StorageError(
        f"Object-store operation on {key!r} failed after {attempts} attempt(s): {type(exc).__name__}: {exc}. "
        "Check that the endpoint (AWS_ENDPOINT_URL) is reachable and the credentials are valid, then re-run; "
        "raise RetryPolicy.attempts for a flaky network."
    )


@dataclass(slots=True)
class RetryTotals:
    """Process-wide counts of what the retry layer did (for reliability measurements and logs)."""

    retried: int = 0  # transient errors followed by another attempt
    failed: int = 0  # operations that raised StorageError after the last attempt


RETRY_TOTALS = RetryTotals()
_totals_lock = threading.Lock()


def _note(retried: int = 0, failed: int = 0) -> None:
    with _totals_lock:
        RETRY_TOTALS.retried += retried
        RETRY_TOTALS.failed += failed


def call_with_retries(fn: Callable[[], T], key: str, policy: RetryPolicy = DEFAULT_RETRY) -> T:
    """Call `fn` (one operation on `key`), retrying transient errors with backoff; never switches keys."""
    for attempt in range(policy.attempts):
        try:
            return fn()
        except _retryable_errors() as exc:
            if not is_transient(exc):
                raise
            if attempt == policy.attempts - 1:
                _note(failed=1)
                raise _fail(key, policy.attempts, exc) from exc
            _note(retried=1)
            time.sleep(policy.delay_s(attempt))
    raise AssertionError("unreachable")


async def acall_with_retries(fn: Callable[[], Awaitable[T]], key: str, policy: RetryPolicy = DEFAULT_RETRY) -> T:
    """Async twin of `call_with_retries`."""
    for attempt in range(policy.attempts):
        try:
            return await fn()
        except _retryable_errors() as exc:
            if not is_transient(exc):
                raise
            if attempt == policy.attempts - 1:
                _note(failed=1)
                raise _fail(key, policy.attempts, exc) from exc
            _note(retried=1)
            await asyncio.sleep(policy.delay_s(attempt))
    raise AssertionError("unreachable")


@dataclass(slots=True)
class IOStats:
    """Mutable counters of what a `CountingStore` fetched (value bytes, keys); retries are counted process-wide in
    `RETRY_TOTALS`."""

    bytes_read: int = 0
    keys_read: int = 0


class CountingStore(WrapperStore[Store]):
    """A zarr store wrapper that counts fetched bytes and retries transient errors on the same key (reads, writes,
    existence checks and deletes alike).

    `stats` is shared with stores derived by `with_read_only`, so one counter follows one image. With `strict` (a
    pyramid whose every chunk was written, `gats.all_chunks`), a chunk key that is absent raises CorruptChunkError
    instead of reading as the fill value: a deleted chunk can never pass for an empty one. `label` (the image id)
    and `uri` name the image in that error.
    """

    def __init__(self, store: Store, stats: IOStats | None = None, policy: RetryPolicy = DEFAULT_RETRY, *,
                 strict: bool = False, label: str = "", uri: str = "") -> None:
        super().__init__(store)
        self.stats = stats if stats is not None else IOStats()
        self.policy = policy
        self.strict = strict
        self.label = label
        self.uri = uri
        self._lock = threading.Lock()

    def _with_store(self, store: Store) -> CountingStore:
        return CountingStore(store, self.stats, self.policy, strict=self.strict, label=self.label, uri=self.uri)

    def _check_present(self, key: str, buf: Buffer | None) -> None:
        if buf is None and self.strict and (m := _CHUNK_KEY.match(key)):
            raise CorruptChunkError(
                f"Chunk {key!r} of image {self.label!r} ({self.uri}) is missing: level {m['level']}, chunk "
                f"{_grid_position(m['coords'])} was written at ingest and is gone now. Re-ingest the "
                f"image: `gats-verify ROOT --repair` removes damaged pyramids, then re-run jobs/ingest.py with the "
                "same sources (only those are rewritten).")

    def _count(self, buffers: Iterable[Buffer | None]) -> None:
        n_bytes = 0
        n_keys = 0
        for buf in buffers:
            if buf is not None:
                n_bytes += len(buf)
                n_keys += 1
        with self._lock:
            self.stats.bytes_read += n_bytes
            self.stats.keys_read += n_keys

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        buf = await acall_with_retries(lambda: self._store.get(key, prototype, byte_range), key, self.policy)
        self._check_present(key, buf)
        self._count([buf])
        return buf

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        key_ranges = list(key_ranges)
        keys = ",".join(k for k, _ in key_ranges[:3])
        bufs = await acall_with_retries(
            lambda: self._store.get_partial_values(prototype, key_ranges), keys, self.policy
        )
        for (key, _), buf in zip(key_ranges, bufs):
            self._check_present(key, buf)
        self._count(bufs)
        return bufs

    async def _get_many(
        self, requests: Iterable[tuple[str, BufferPrototype, ByteRequest | None]]
    ) -> AsyncGenerator[tuple[str, Buffer | None], None]:
        # Route through self.get so batched fetches are counted and retried too.
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)

    async def set(self, key: str, value: Buffer) -> None:
        await acall_with_retries(lambda: self._store.set(key, value), key, self.policy)

    async def exists(self, key: str) -> bool:
        return await acall_with_retries(lambda: self._store.exists(key), key, self.policy)

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        await acall_with_retries(lambda: self._store.set_if_not_exists(key, value), key, self.policy)

    async def delete(self, key: str) -> None:
        # zarr deletes a chunk that became empty; that request gets the same bounded retries as a write
        await acall_with_retries(lambda: self._store.delete(key), key, self.policy)

    async def delete_dir(self, prefix: str) -> None:
        await acall_with_retries(lambda: self._store.delete_dir(prefix), prefix or "/", self.policy)

    async def getsize(self, key: str) -> int:
        return await acall_with_retries(lambda: self._store.getsize(key), key, self.policy)


def _grid_position(coords: str) -> str:
    """"0/3/1" (the chunk grid position of a (C, H, W) level) -> "(y=3, x=1)"; other ranks as a tuple."""
    parts = coords.split("/")
    if len(parts) == 3:
        return f"(y={parts[1]}, x={parts[2]})"
    return f"({', '.join(parts)})"


def _s3_options(asynchronous: bool) -> dict[str, Any]:
    """s3fs options from the standard AWS environment variables (values never logged). botocore's own retries are
    off (`total_max_attempts=1`) and its timeouts bounded, so `RetryPolicy` is the one retry bound (module doc)."""
    opts: dict[str, Any] = {
        "asynchronous": asynchronous, "use_listings_cache": False,
        "config_kwargs": {"retries": {"total_max_attempts": 1}, "connect_timeout": S3_CONNECT_TIMEOUT_S,
                          "read_timeout": S3_READ_TIMEOUT_S},
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    client_kwargs: dict[str, Any] = {}
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        client_kwargs["region_name"] = region
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    return opts


def _s3_filesystem(asynchronous: bool) -> fsspec.AbstractFileSystem:
    """An s3fs filesystem with its own retry loop off (`retries = 1`: one attempt per call; RetryPolicy retries)."""
    fs = fsspec.filesystem("s3", **_s3_options(asynchronous=asynchronous))
    fs.retries = 1
    return fs


def parse_root(root: str | os.PathLike[str]) -> tuple[str, str]:
    """Split ROOT into (protocol, path): ("file", absolute folder) or ("s3", "bucket/prefix")."""
    text = os.fspath(root)
    if not text:
        raise ValueError("Expected a ROOT folder or s3://bucket/prefix. Got an empty string.")
    if text.startswith("s3://"):
        path = text[len("s3://"):].strip("/")
        if not path:
            raise ValueError(f"Expected s3://bucket[/prefix]. Got {text!r}: add a bucket name.")
        return "s3", path
    if "://" in text and not text.startswith("file://"):
        raise ValueError(
            f"Expected a local folder or s3://bucket/prefix. Got {text!r}: other schemes are not supported.")
    if text.startswith("file://"):
        text = text[len("file://"):]
    return "file", os.path.abspath(text)


def image_key(image_id: str) -> str:
    """Key of one image's pyramid relative to ROOT: images/<image_id>.zarr."""
    return f"{IMAGES_DIR}/{image_id}.zarr"


def replace_folder(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Rename the complete local folder `src` to `dst`. An older `dst` is moved aside to a hidden `.<name>.old-<hex>`
    first and deleted after, so `dst` is always the old folder or the new one, never a mix."""
    src, dst = os.fspath(src), os.fspath(dst)
    if os.path.exists(dst):
        head, name = os.path.split(dst)
        old = os.path.join(head, f".{name}.old-{uuid.uuid4().hex[:12]}")
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old)
    else:
        os.rename(src, dst)


class Storage:
    """Keys (POSIX-style, relative) under one ROOT on a local folder or S3."""

    def __init__(self, root: str | os.PathLike[str], *, retry: RetryPolicy = DEFAULT_RETRY) -> None:
        self.protocol, self.base = parse_root(root)
        self.root = f"s3://{self.base}" if self.is_s3 else self.base
        self.retry = retry
        self._fs: fsspec.AbstractFileSystem | None = None

    @property
    def is_s3(self) -> bool:
        return self.protocol == "s3"

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """A synchronous fsspec filesystem for ROOT (created lazily; not pickled)."""
        if self._fs is None:
            if self.is_s3:
                self._fs = _s3_filesystem(asynchronous=False)
            else:
                self._fs = fsspec.filesystem("file")
        return self._fs

    def __getstate__(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "base": self.base, "root": self.root, "retry": self.retry}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.protocol, self.base, self.root, self.retry = (
            state["protocol"], state["base"], state["root"], state["retry"])
        self._fs = None

    def __repr__(self) -> str:
        return f"Storage({self.root!r})"

    @property
    def endpoint(self) -> str:
        """Where requests go, for messages: the S3 endpoint URL (AWS's default when none is set) or the folder."""
        if not self.is_s3:
            return self.base
        return (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                or "the default AWS S3 endpoint")

    def path(self, key: str) -> str:
        """Filesystem path of `key` (no scheme): a local path or bucket/prefix/key."""
        key = key.strip("/")
        if not key:
            return self.base
        if self.is_s3:
            return posixpath.join(self.base, key)
        return os.path.join(self.base, *key.split("/"))

    def uri(self, key: str) -> str:
        """Full URI of `key`: a local absolute path or s3://bucket/prefix/key."""
        return f"s3://{self.path(key)}" if self.is_s3 else self.path(key)

    def exists(self, key: str) -> bool:
        return call_with_retries(lambda: self.fs.exists(self.path(key)), key, self.retry)

    def read_bytes(self, key: str) -> bytes:
        """Bytes of `key`; ImageNotFoundError when it does not exist, StorageError after bounded retries."""
        try:
            return call_with_retries(lambda: self.fs.cat_file(self.path(key)), key, self.retry)
        except FileNotFoundError as exc:
            raise ImageNotFoundError(
                f"{self.uri(key)!r} does not exist: check ROOT ({self.root!r}) and that ingest wrote it."
            ) from exc

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write `key` atomically: temp file + os.replace on a folder, one PUT on S3."""
        if self.is_s3:
            call_with_retries(lambda: self.fs.pipe_file(self.path(key), data), key, self.retry)
            return
        final = self.path(key)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = f"{final}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def delete(self, key: str) -> None:
        """Delete `key` and everything under it; a missing key is fine."""
        path = self.path(key)
        try:
            if self.exists(key):
                call_with_retries(lambda: self.fs.rm(path, recursive=True), key, self.retry)
        except FileNotFoundError:
            pass

    def listdir(self, key: str) -> list[str]:
        """Names (not paths) directly under `key`; empty when it does not exist."""
        try:
            entries = call_with_retries(lambda: self.fs.ls(self.path(key), detail=False), key, self.retry)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(str(e).rstrip("/")) for e in entries)

    def size(self, key: str) -> int:
        """Stored size of `key` in bytes."""
        return int(call_with_retries(lambda: self.fs.size(self.path(key)), key, self.retry))

    def replace_local(self, src: str, dst: str) -> None:
        """Rename the complete folder key `src` to `dst` on a local root, replacing an older `dst` (replace_folder)."""
        if self.is_s3:
            raise StorageError("replace_local is for local folders; on S3 the complete marker alone decides.")
        replace_folder(self.path(src), self.path(dst))

    def zarr_store(self, key: str, *, read_only: bool = False, stats: IOStats | None = None, strict: bool = False,
                   label: str = "") -> CountingStore:
        """A zarr v3 store rooted at ROOT/key, counting bytes read into `stats`, retrying transient errors; `strict`
        makes an absent chunk key a CorruptChunkError naming `label` (CountingStore)."""
        if self.is_s3:
            inner: Store = FsspecStore(fs=_s3_filesystem(asynchronous=True), path=self.path(key), read_only=read_only)
        else:
            inner = LocalStore(self.path(key), read_only=read_only)
        return CountingStore(inner, stats, self.retry, strict=strict, label=label, uri=self.uri(key))
