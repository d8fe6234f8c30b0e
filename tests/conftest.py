"""Shared fixtures: a real Redis (127.0.0.1:6379 unless MMC4_TEST_REDIS_URL says otherwise)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
import redis.asyncio as aioredis

TEST_REDIS_URL = os.environ.get("MMC4_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def namespace() -> Iterator[str]:
    """A key namespace of its own for each test; its keys are removed afterwards."""
    ns = f"t{uuid.uuid4().hex[:10]}"
    yield ns
    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{ns}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
async def aredis() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(TEST_REDIS_URL)
    yield client
    await client.aclose()


# ---- crawling against the loopback image web ----------------------------------------------

from collections.abc import Iterator as _Iterator  # noqa: E402

from testweb import ImageWeb  # noqa: E402


@pytest.fixture(scope="session")
def web() -> _Iterator[ImageWeb]:
    """Six loopback hosts, 127.0.0.2-7, on one port, shared by the session's tests."""
    with ImageWeb(hosts=6, seed=7).running_in_thread() as w:
        yield w


# ---- object storage: a private SeaweedFS (S3 gateway) on loopback -------------------------

from s3_server import BUCKET as S3_BUCKET  # noqa: E402
from s3_server import SeaweedFS  # noqa: E402


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> _Iterator[SeaweedFS]:
    """One SeaweedFS per test process with the bucket S3_BUCKET; do not restart it (a test
    that restarts a server starts its own `SeaweedFS`)."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        server.create_bucket(S3_BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_output(s3_server: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh ``s3://mmc4-test/<random>`` output, with the server's AWS_* variables set in
    this process's environment (pass ``s3_server.env()`` to subprocesses)."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:10]}"
