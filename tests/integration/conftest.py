"""Run ASGI apps under a real uvicorn, in a background thread, for integration tests.

Use the ``serve`` fixture (or the ``serve`` / ``running_server`` context managers)::

    def test_health(serve):
        with serve(app) as url:
            assert httpx.get(url + "/healthz").status_code == 200

The server binds 127.0.0.1 on a free port (the socket is bound here, before uvicorn
starts, so there is no port race), runs on asyncio with lifespan off and warnings-only
logging, and is stopped and joined when the block exits. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
import uvicorn

T = TypeVar("T")

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


@dataclass
class Served:
    """A running uvicorn server: its base URL, the server, its thread and its event loop."""

    url: str
    server: uvicorn.Server
    thread: threading.Thread
    loop: asyncio.AbstractEventLoop | None = None
    main_task: asyncio.Task[Any] | None = None
    errors: list[BaseException] = field(default_factory=list)

    def call(self, fn: Callable[[], Coroutine[Any, Any, T]], timeout: float = 5.0) -> T:
        """Run ``fn()`` on the server's event loop and return its result (e.g. to count tasks)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(timeout)

    def tasks(self) -> list[asyncio.Task[Any]]:
        """The tasks alive on the server's loop, other than the server's own and this query's."""

        async def collect() -> list[asyncio.Task[Any]]:
            me = asyncio.current_task()
            return [t for t in asyncio.all_tasks() if t is not me and t is not self.main_task]

        return self.call(collect)


@contextlib.contextmanager
def running_server(app: Any, *, uds: str | None = None, **uvicorn_kwargs: Any) -> Iterator[Served]:
    """Serve ``app`` under uvicorn on 127.0.0.1 (a free port) until the block exits.

    Args:
        app: the ASGI app.
        uds: serve on this unix socket path instead, as ``uvicorn --uds`` does (the URL
            is then ``http://localhost``: connect with ``httpx.HTTPTransport(uds=...)``).
        uvicorn_kwargs: extra ``uvicorn.Config`` settings (override the defaults below).
    """
    options: dict[str, Any] = {
        "loop": "asyncio",
        "lifespan": "off",
        "log_level": "warning",
        "timeout_graceful_shutdown": 3,
    }
    options.update(uvicorn_kwargs)
    sock: socket.socket | None = None
    if uds is None:
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only when the
        # proto says TCP; without it every answer after the first on a connection waits
        # ~40 ms (Nagle against delayed ACKs).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        port = sock.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=port, **options)
        url, name = f"http://127.0.0.1:{port}", str(port)
    else:
        # uvicorn binds the path itself: the same code path as `uvicorn --uds`.
        config = uvicorn.Config(app, uds=uds, **options)
        url, name = "http://localhost", uds
    server = uvicorn.Server(config)
    served = Served(url, server, threading.Thread())

    async def main() -> None:
        served.loop = asyncio.get_running_loop()
        served.main_task = asyncio.current_task()
        await server.serve(sockets=None if sock is None else [sock])

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # a SystemExit from a failed start-up included
            served.errors.append(exc)

    thread = threading.Thread(target=run, name=f"uvicorn-{name}", daemon=True)
    served.thread = thread
    thread.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not server.started:
            if not thread.is_alive():
                pytest.fail(f"uvicorn did not start: {served.errors!r}")
            if time.monotonic() > deadline:
                pytest.fail(f"uvicorn did not start within {START_TIMEOUT:g}s")
            time.sleep(0.01)
        yield served
    finally:
        server.should_exit = True
        thread.join(STOP_TIMEOUT)
        if thread.is_alive():
            server.force_exit = True
            thread.join(STOP_TIMEOUT)
        if sock is not None:
            sock.close()
        if thread.is_alive():
            pytest.fail(f"uvicorn did not stop within {2 * STOP_TIMEOUT:g}s")


@contextlib.contextmanager
def serve(app: Any, **uvicorn_kwargs: Any) -> Iterator[str]:
    """Serve ``app`` under uvicorn until the block exits; yields the base URL."""
    with running_server(app, **uvicorn_kwargs) as served:
        yield served.url


@pytest.fixture(name="serve")
def serve_fixture() -> Callable[..., contextlib.AbstractContextManager[str]]:
    """The ``serve(app, **uvicorn_kwargs)`` context manager, as a fixture."""
    return serve


@pytest.fixture(name="running_server")
def running_server_fixture() -> Callable[..., contextlib.AbstractContextManager[Served]]:
    """The ``running_server(app, **uvicorn_kwargs)`` context manager, as a fixture."""
    return running_server
