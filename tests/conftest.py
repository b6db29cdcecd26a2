"""Shared test configuration: the `gpu` marker skips cleanly without CUDA; the S3 server fixtures."""
from __future__ import annotations

import pytest
import torch

from tests.s3_server import s3_root, s3_server  # noqa: F401  (fixtures shared by every package's tests)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
