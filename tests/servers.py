"""Real servers for tests: free loopback ports, uvicorn worker processes, readiness."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio
import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free loopback port (for a process that binds it itself)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start_uvicorn(
    factory: str,
    port: int,
    *,
    app_dir: Path,
    env: Mapping[str, str],
    extra_args: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """Start ``python -m uvicorn --factory`` on 127.0.0.1:``port`` (stderr kept for failures)."""
    command = [sys.executable, "-m", "uvicorn", "--factory", "--app-dir", str(app_dir), factory]
    command += ["--host", "127.0.0.1", "--port", str(port), "--lifespan", "off"]
    command += ["--log-level", "warning", "--no-access-log", *extra_args]
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def wait_ready(
    client: httpx.AsyncClient,
    ports: Sequence[int],
    procs: Sequence[subprocess.Popen[bytes]],
    *,
    path: str,
    seconds: float,
) -> None:
    """Poll ``path`` on every port until each answers 200; fail the test on exit or timeout."""
    deadline = time.monotonic() + seconds
    pending = set(ports)
    while pending:
        for proc in procs:
            if proc.poll() is not None:
                stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                pytest.fail(f"worker exited: {stderr}")
        if time.monotonic() > deadline:
            pytest.fail(f"workers on ports {sorted(pending)} not ready within {seconds:g} s")
        for port in list(pending):
            try:
                response = await client.get(f"http://127.0.0.1:{port}{path}")
            except httpx.TransportError:
                continue
            if response.status_code == 200:
                pending.discard(port)
        await anyio.sleep(0.05)
