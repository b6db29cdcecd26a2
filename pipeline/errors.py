"""Typed errors for the data pipeline.

Every error subclasses the built-in it refines (so `except FileNotFoundError` still works) and its message names
the fix. Raise sites build the message; these classes only carry the type.
"""
from __future__ import annotations


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


class WriteCancelled(PipelineError, RuntimeError):
    """A pyramid write stopped before its next block because a stop was requested; nothing was marked complete."""
