"""A real S3-compatible server for the tests: moto's standalone server on a free 127.0.0.1 port (started by
pipeline.local_s3, which benchmarks use too).

`s3_server` (session) starts it once, points the standard AWS environment variables at it (restored afterwards)
and yields its endpoint; `s3_root` gives each test a fresh prefix in bucket BUCKET. Registered in tests/conftest.py
so every package's tests share one server.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from pipeline.local_s3 import BUCKET, S3_ENV, start_moto_server, stop_moto_server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Endpoint of a running moto S3 server with bucket BUCKET; AWS env vars point at it for the session."""
    proc, endpoint = start_moto_server()
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        stop_moto_server(proc)


@pytest.fixture()
def s3_root(s3_server: str) -> str:
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:10]}"
