"""Pipeline fixtures: storage roots. `root` is parametrized over ["local", "s3"] so one contract suite runs against
both backends; the S3 server itself (`s3_server`, `s3_root`) comes from tests/s3_server.py via tests/conftest.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture()
def local_root(tmp_path: Path) -> str:
    return str(tmp_path / "root")


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest) -> str:
    """A fresh, empty ROOT on each backend."""
    return request.getfixturevalue(f"{request.param}_root")
