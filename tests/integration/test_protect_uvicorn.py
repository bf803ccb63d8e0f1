"""``@protect`` under a real uvicorn, on Starlette, FastAPI, Quart and Litestar: each
declared route answers exactly as the same rule in the config (status, body and armor
headers, request id and clock aside), and a bad declaration fails the server's start-up."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from asgi_armor import armor
from tests.integration.conftest import serve
from tests.integration.protect_apps import (
    FRAMEWORKS,
    SECRET,
    SECRET_ENV,
    build,
    exercise,
    snapshot,
)
from tests.servers import free_port, start_uvicorn

pytestmark = [pytest.mark.anyio, pytest.mark.asyncio_only]

HERE = Path(__file__).parent


async def served(framework: str, declared: bool) -> dict[str, list[Any]]:
    app, config = build(framework, declared)
    with serve(armor(app, config)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            answers = await exercise(client)
    return {name: [snapshot(r) for r in responses] for name, responses in answers.items()}


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_declared_routes_answer_like_configured_ones(
    framework: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    declared = await served(framework, True)
    configured = await served(framework, False)
    assert declared == configured
    assert [status for status, _, _ in declared["items"]] == [200, 200, 429]
    assert dict(declared["items"][2][2])["retry-after"] == "30"
    assert [status for status, _, _ in declared["payments"]] == [400, 201, 201, 422]
    assert [status for status, _, _ in declared["webhook"]] == [401, 401, 200]
    assert declared["slow"][0][0] == 504
    assert declared["slow"][0][1]["error"] == "timeout"  # type: ignore[index]


def test_a_bad_declaration_fails_the_start_up_naming_the_endpoint() -> None:
    proc = start_uvicorn("protect_apps:bad_app", free_port(), app_dir=HERE, env={})
    try:
        _, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("uvicorn started despite a bad @protect")
    assert proc.returncode != 0
    assert (
        "ConfigError: @protect on create_payment (POST /api/payments): rate_limit[0]: "
        "'10/minuet' is not a rate" in stderr.decode()
    )
