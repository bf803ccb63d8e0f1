"""Shared fixtures: anyio backends, a fake clock, the shared Redis, private Redis servers,
a private Redis Cluster and a private Sentinel group."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_groups import RedisClusterServers, SentinelGroup

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
    """For tests of asyncio-only parts (redis.asyncio, uvicorn): their trio runs are deselected."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Drop the trio copies of asyncio-only tests rather than reporting them as skipped.

    A skip would hide a Redis test that did not run; a deselection says what it is.
    """
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        trio_run = callspec is not None and callspec.params.get("anyio_backend") == "trio"
        fixtures = getattr(item, "fixturenames", ())
        asyncio_part = "asyncio_only" in fixtures or "redis_prefix" in fixtures
        if trio_run and (asyncio_part or item.get_closest_marker("asyncio_only")):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


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
    return REDIS_URL


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A unique key prefix for one test; its keys are deleted afterwards."""
    import redis

    prefix = f"armortest:{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


class RedisServer:
    """A private ``redis-server`` on a free port: for tests that count, kill or pause Redis."""

    def __init__(self) -> None:
        from tests.servers import free_port

        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import shutil
        import socket
        import time

        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed")
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        pytest.fail("private redis-server did not start within 10 s")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A private Redis for this test only, stopped afterwards (never the shared one)."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _hypothesis_profiles() -> None:
    """``--hypothesis-profile=mutate`` (``make mutate``): the same examples every run, and
    no shrinking: a mutant only needs to be caught, not explained."""
    from hypothesis import Phase, settings

    settings.register_profile(
        "mutate", derandomize=True, database=None, phases=[Phase.explicit, Phase.generate]
    )


_hypothesis_profiles()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """A private 6-node Redis Cluster (3 primaries, 3 replicas) for the whole test run.

    Tests share it and keep apart by key prefix; a test that kills nodes uses
    ``private_redis_cluster`` instead.
    """
    servers = RedisClusterServers(tmp_path_factory.mktemp("cluster"))
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    """A private Sentinel group (1 primary, 1 replica, 3 sentinels) for the whole test run."""
    group = SentinelGroup(tmp_path_factory.mktemp("sentinel"))
    try:
        group.start()
        yield group
    finally:
        group.stop()


@pytest.fixture
def private_redis_cluster(tmp_path: Path) -> Iterator[RedisClusterServers]:
    """A Redis Cluster for this test only (it may kill nodes), stopped afterwards."""
    servers = RedisClusterServers(tmp_path)
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


@pytest.fixture
def private_sentinel(tmp_path: Path) -> Iterator[SentinelGroup]:
    """A Sentinel group for this test only (it may kill the master), stopped afterwards."""
    group = SentinelGroup(tmp_path)
    try:
        group.start()
        yield group
    finally:
        group.stop()
