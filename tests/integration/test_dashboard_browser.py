"""The demo's live dashboard in a real headless chromium, driven over the DevTools protocol.

No browser download: Debian's ``chromium`` (``make test`` installs it when missing), spoken
to with the ``websockets`` package uvicorn[standard] brings. Under
``ARMOR_REQUIRE_BROWSER=1`` (``make test``) a missing chromium fails the test instead of
skipping it. The screenshot lands in ``.artifacts/dashboard.png`` (the path is printed).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from asgi_armor.demo import create_demo
from tests.integration.conftest import serve

ARTIFACTS = Path(__file__).resolve().parents[2] / ".artifacts"
START_TIMEOUT = 30.0
WAIT = 15.0


def chromium_path() -> str:
    """The chromium binary, or a skip (a failure under ARMOR_REQUIRE_BROWSER=1)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "chromium is not installed (apt-get install -y chromium; `make test` does)"
        if os.environ.get("ARMOR_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return found


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator[str]:
    """A headless chromium; yields its DevTools browser websocket URL."""
    process = subprocess.Popen(
        [
            chromium_path(),
            "--headless=new",
            "--remote-debugging-port=0",
            "--remote-debugging-address=127.0.0.1",
            f"--user-data-dir={profile}",
            "--no-sandbox",  # CI runs as root, where chromium's sandbox refuses to start
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--window-size=1280,1000",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        deadline = time.monotonic() + START_TIMEOUT
        lines: list[str] = []
        url = None
        while url is None:
            line = process.stderr.readline()
            if not line:
                pytest.fail(f"chromium exited ({process.poll()}): {''.join(lines)[-2000:]}")
            lines.append(line)
            found = re.search(r"DevTools listening on (ws://\S+)", line)
            if found:
                url = found.group(1)
            elif time.monotonic() > deadline:
                pytest.fail(f"chromium did not start within {START_TIMEOUT:g}s")
        # Drained from here on, so chromium never blocks on a full pipe.
        threading.Thread(target=process.stderr.read, daemon=True).start()
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        if process.stderr is not None:
            process.stderr.close()


class Page:
    """One page target over CDP: commands, and the console errors seen so far."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        #: (source, text) of every console error: "network" for failed fetches.
        self.errors: list[tuple[str, str]] = []
        self.loaded = False

    def _event(self, message: dict[str, Any]) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            self.errors.append(("console", json.dumps(params["args"])))
        elif method == "Runtime.exceptionThrown":
            self.errors.append(("exception", json.dumps(params["exceptionDetails"])))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.errors.append((params["entry"]["source"], params["entry"]["text"]))
        elif method == "Page.loadEventFired":
            self.loaded = True

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self.ids)
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(WAIT))
            if message.get("id") == ident:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message["result"]  # type: ignore[no-any-return]
            self._event(message)

    def evaluate(self, expression: str) -> Any:
        result = self.send(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str) -> Any:
        """Poll ``expression`` in the page until it is truthy (the page polls each second)."""
        deadline = time.monotonic() + WAIT
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                text = self.evaluate("document.body.innerText")
                raise AssertionError(f"timed out waiting for {what}; page shows:\n{text}")
            time.sleep(0.1)


def test_dashboard_shows_the_breaker_and_rejections(tmp_path: Path) -> None:
    chromium_path()
    app, _ = create_demo()
    with serve(app) as base, chromium(tmp_path / "profile") as browser_ws:
        port = re.search(r":(\d+)/", browser_ws).group(1)  # type: ignore[union-attr]
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=WAIT).json()
        [target] = [t for t in targets if t["type"] == "page"]
        with connect(target["webSocketDebuggerUrl"], max_size=None, open_timeout=WAIT) as ws:
            page = Page(ws)
            for domain in ("Runtime", "Log", "Page"):
                page.send(f"{domain}.enable")
            page.send("Page.navigate", url=base + "/")
            page.wait_for(
                "document.body && document.body.dataset.ready === '1'", "the first /demo/state"
            )
            assert page.evaluate("document.getElementById('breaker-db').textContent") == "closed"
            page.send("Runtime.evaluate", expression="0")  # take in the events so far
            assert page.errors == []  # the page loads with no console errors

            # The db fault button, then six user lookups from the page's own button.
            page.evaluate("document.getElementById('fault-db-fail').click()")
            page.wait_for("document.getElementById('fault-db-fail').disabled", "db in fail mode")
            statuses = []
            for _ in range(6):
                before = page.evaluate("document.getElementById('lookup-result').textContent")
                page.evaluate("document.getElementById('lookup-user').click()")
                changed = f"(t => t !== {json.dumps(before)} && t)"
                after = page.wait_for(
                    changed + "(document.getElementById('lookup-result').textContent)",
                    "a lookup's result",
                )
                statuses.append(int(after.split()[0]))
            assert statuses == [500, 500, 500, 500, 500, 503]
            page.wait_for(
                "document.getElementById('breaker-db').textContent === 'open'", "breaker open"
            )

            # A 429 from outside the page shows up in the list with its request id.
            with httpx.Client(base_url=base, timeout=WAIT) as client:
                answers = [client.post("/api/expensive-operation") for _ in range(11)]
            assert [r.status_code for r in answers] == [200] * 10 + [429]
            request_id = answers[-1].headers["x-request-id"]
            selector = f'#rejections tr[data-request-id="{request_id}"]'
            row = page.wait_for(
                f"(r => r && r.innerText)(document.querySelector({json.dumps(selector)}))",
                "the 429 row",
            )
            assert "429" in row
            assert "rate_limited" in row
            assert request_id in row
            assert "POST /api/expensive-operation" in row
            layer = page.evaluate("document.querySelector('#layer-rate_limit').innerText")
            assert layer.split() == ["rate_limit", "1"]

            shot = page.send("Page.captureScreenshot", format="png")
            ARTIFACTS.mkdir(exist_ok=True)
            path = ARTIFACTS / "dashboard.png"
            path.write_bytes(base64.b64decode(shot["data"]))
            print(f"dashboard screenshot: {path}")
            assert path.stat().st_size > 10_000
            page.send("Runtime.evaluate", expression="0")
            # Since then, only the browser's own notes of the lookups answered 500 and 503
            # (chromium logs every failed fetch): no script error.
            assert page.errors
            for source, text in page.errors:
                assert source == "network", text
                assert re.fullmatch(
                    r"Failed to load resource: the server responded with a status of "
                    r"(500 \(Internal Server Error\)|503 \(Service Unavailable\))",
                    text,
                ), text
