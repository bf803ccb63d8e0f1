"""Shared fixtures: anyio backends, a fake clock, and the shared Redis."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

REDIS_URL = os.environ.get("ARMOR_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture(
    params=[
        pytest.param("asyncio", id="asyncio"),
        pytest.param("trio", id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every async test runs on asyncio and on trio."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def asyncio_only(anyio_backend: str) -> None:
    """For tests of asyncio-only parts (redis.asyncio, uvicorn)."""
    if anyio_backend != "asyncio":
        pytest.skip("asyncio only (redis.asyncio / uvicorn)")


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _redis_available() -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The shared Redis (DB 15): fails loudly under ARMOR_REQUIRE_REDIS=1 if it is not there."""
    if not _redis_available():
        if os.environ.get("ARMOR_REQUIRE_REDIS") == "1":
            pytest.fail("ARMOR_REQUIRE_REDIS=1 but no Redis answers at 127.0.0.1:6379")
        pytest.skip("no Redis at 127.0.0.1:6379")
    yield REDIS_URL


@pytest.fixture
async def redis_prefix(redis_url: str, asyncio_only: None) -> AsyncIterator[str]:
    """A unique key prefix for one test; its keys are deleted afterwards."""
    import redis.asyncio as aioredis

    prefix = f"armortest:{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
