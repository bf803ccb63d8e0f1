"""``asgi-armor demo`` and ``asgi-armor run`` as a user runs them: real processes, real HTTP."""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import ROOT, free_port


class Served:
    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "asgi_armor.cli", *args, "--port", str(self.port)],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"server exited: {self.stop()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        pytest.fail("server did not start within 20 s")

    def stop(self) -> str:
        self.process.terminate()
        try:
            output, _ = self.process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            output, _ = self.process.communicate()
        return output


@pytest.fixture
def demo_server() -> Iterator[Served]:
    served = Served(["demo"], env={"ARMOR_DEMO_WEBHOOK_SECRET": ""})
    yield served
    served.stop()


def test_demo_serves_the_contract(demo_server: Served) -> None:
    with httpx.Client(base_url=demo_server.url, timeout=10) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        user = client.post("/api/users", json={"email": " Ada@Example.com", "name": " Ada "})
        assert user.status_code == 201
        assert user.json()["email"] == "ada@example.com"
        statuses = [client.post("/api/expensive-operation").status_code for _ in range(11)]
        assert statuses == [200] * 10 + [429]
        body = b'{"id": "evt_9"}'
        signature = hmac.new(b"demo-webhook-secret", body, hashlib.sha256).hexdigest()
        hook = client.post(
            "/api/webhooks/payment",
            content=body,
            headers={"X-Signature": signature, "content-type": "application/json"},
        )
        assert hook.json() == {"received": True}
        # uvicorn's own limit must not answer before armor does: the 431 is the envelope.
        huge = client.get("/api/users/1", headers={"X-Big": "x" * 20_000})
        assert huge.status_code == 431
        assert huge.json()["error"] == "headers_too_large"
        long_url = client.get("/api/search", params={"q": "x" * 9000})
        assert long_url.status_code == 414
        assert long_url.json()["request_id"] == long_url.headers["x-request-id"]
    output = demo_server.stop()
    assert "asgi_armor demo: http://127.0.0.1:" in output
    assert "demo-webhook-secret" in output  # the demo announces its secret


def test_run_serves_a_user_app_without_trusting_forwarded_headers(tmp_path: Path) -> None:
    config = tmp_path / "armor.toml"
    config.write_text('[[rate_limit]]\nroute = "*"\nrate = "2/minute"\n')
    served = Served(["run", "tests.integration.sample_app:app", "--config", str(config)])
    try:
        with httpx.Client(base_url=served.url, timeout=10) as client:
            first = client.get(
                "/", headers={"X-Forwarded-For": "203.0.113.5", "X-Request-ID": "trace-1"}
            )
            assert first.json() == {"client": "127.0.0.1", "request_id": "trace-1"}
            assert client.get("/").status_code == 200
            limited = client.get("/", headers={"X-Forwarded-For": "203.0.113.6"})
            assert limited.status_code == 429
            assert limited.json()["error"] == "rate_limited"
    finally:
        served.stop()


def test_run_with_two_workers(tmp_path: Path) -> None:
    config = tmp_path / "armor.toml"
    config.write_text("")
    served = Served(
        ["run", "tests.integration.sample_app:app", "--config", str(config), "--workers", "2"]
    )
    try:
        with httpx.Client(base_url=served.url, timeout=10) as client:
            deadline = time.monotonic() + 20
            while True:
                try:
                    response = client.get("/")
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            assert response.status_code == 200
            assert response.headers["x-request-id"].startswith("req_")
    finally:
        served.stop()
