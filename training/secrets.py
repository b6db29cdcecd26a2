"""Credentials never reach what a run records: params, tags, config.yaml, checkpoints and log lines.

URIs may carry `user:password@` (an `mlflow server` behind basic auth, a Ray address, an s3:// storage path through
a proxy). The processes that connect need them, so the config handed to workers keeps them; everything that is
written down goes through `redact` first, which replaces the user-info part of every URI in a text by `***@`.
Credentials that come from the environment (AWS_*, MLFLOW_TRACKING_PASSWORD, ...) are never recorded at all: no
code here copies environment variables into params, tags or artifacts.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

from training import config as C

_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s'\"]+@")


def redact(text: str) -> str:
    """`scheme://user:password@host/...` -> `scheme://***@host/...`, for every URI in `text`."""
    return _USERINFO.sub(r"\g<scheme>***@", text)


def redact_value(value: Any) -> Any:
    """`redact` on strings, and on the strings inside lists and tuples; anything else unchanged."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(v) for v in value)
    return value


def redact_config(config: C.TrainConfig) -> C.TrainConfig:
    """A copy of `config` whose every string field has its credentials replaced (for config.yaml, params, logs)."""
    sections = {}
    for section in dataclasses.fields(config):
        part = getattr(config, section.name)
        changes = {f.name: redact_value(getattr(part, f.name)) for f in dataclasses.fields(part)}
        sections[section.name] = dataclasses.replace(part, **changes)
    return dataclasses.replace(config, **sections)


class RedactingFilter(logging.Filter):
    """A logging filter that redacts each record's formatted message (install it on handlers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True
