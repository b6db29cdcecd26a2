"""Typed errors for the data pipeline.

Every error subclasses the built-in it refines (so `except FileNotFoundError` still works) and its message names
the fix. Raise sites build the message; these classes only carry the type.
"""
from __future__ import annotations

from typing import TypeVar

E = TypeVar("E", bound=BaseException)


class PipelineError(Exception):
    """Base class of every error raised by `pipeline`."""


class ImageNotFoundError(PipelineError, FileNotFoundError):
    """A source path, image id or store location does not exist."""


class UnsupportedImageError(PipelineError, ValueError):
    """The file is not an image this pipeline can read (unknown suffix, not an image at all)."""


class CorruptImageError(PipelineError, ValueError):
    """The file looks like a supported image but cannot be decoded (truncated, damaged)."""


class ImageTooSmallError(PipelineError, ValueError):
    """The image is smaller than one patch or than the requested low-resolution view."""


class LabelError(PipelineError, ValueError):
    """A label is empty or not among the known classes."""


class SourceListError(PipelineError, ValueError):
    """A CSV of sources has missing or wrong columns, or a bad split name."""


class IncompleteImageError(PipelineError, RuntimeError):
    """A pyramid exists but was not marked complete (an interrupted ingest); re-run ingest to finish it."""


class StorageError(PipelineError, OSError):
    """An object-store operation failed after the bounded retries."""


class DatasetFetchError(PipelineError, RuntimeError):
    """A dataset or sample file could not be fetched into the cache."""


class CorruptChunkError(PipelineError, ValueError):
    """A stored chunk is missing, truncated or fails its checksum: the pyramid was damaged after it was written.
    The message names the image, the level and the chunk; re-ingest that image."""


class MaskError(PipelineError, ValueError):
    """A foreground mask cannot be made or used: wrong size or bands, a nodata value the dtype cannot hold, no
    foreground at all, or no mask stored where training asks for one. The message names the fix."""


class WriteCancelled(PipelineError, RuntimeError):
    """A pyramid write stopped before its next block because a stop was requested; nothing was marked complete."""


def find_error(exc: BaseException, kind: type[E]) -> E | None:
    """The first `kind` inside `exc`, breadth first: `exc` itself, what it was raised from or while handling
    (`__cause__`, `__context__`), the members of an exception group, and what wrappers carry (`.cause`, as Ray's
    RayTaskError; `.worker_failures` values, as Ray Train's WorkerGroupError); None when there is none. zarr, dask,
    s3fs and Ray wrap and re-raise, so the outermost type alone can hide a storage or data error."""
    pending: list[object] = [exc]
    seen: set[int] = set()
    while pending:
        e = pending.pop(0)
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kind):
            return e
        pending += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        if isinstance(e, BaseExceptionGroup):
            pending += list(e.exceptions)
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            pending += list(failures.values())
    return None


class ResolutionError(PipelineError, ValueError):
    """Training asks for a physical resolution (micrometres or metres per pixel) an image cannot serve: none is
    recorded, or it would have to be enlarged. The message names the fix."""
