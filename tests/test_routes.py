"""Route patterns."""

from __future__ import annotations

import pytest

from asgi_armor.errors import ConfigError
from asgi_armor.routes import Route, RouteMap


@pytest.mark.parametrize(
    ("pattern", "method", "path", "expected"),
    [
        ("POST /api/payments", "POST", "/api/payments", {}),
        ("POST /api/payments", "POST", "/api/payments/", {}),
        ("POST /api/payments", "GET", "/api/payments", None),
        ("POST /api/payments", "POST", "/api/payments/x", None),
        ("POST /api/payments", "POST", "/api/paymentsx", None),
        ("GET /healthz", "HEAD", "/healthz", {}),
        ("GET|POST /a", "POST", "/a", {}),
        ("GET|POST /a", "PUT", "/a", None),
        ("* /api/*", "DELETE", "/api/x/y", {}),
        ("* /api/*", "GET", "/api", {}),
        ("* /api/*", "GET", "/apix", None),
        ("/api/*", "PATCH", "/api/x", {}),
        ("* *", "GET", "/anything/at/all", {}),
        ("*", "GET", "/", {}),
        (
            "POST /api/projects/{project_id}/builds",
            "POST",
            "/api/projects/p-42/builds",
            {"project_id": "p-42"},
        ),
        ("POST /api/projects/{project_id}/builds", "POST", "/api/projects//builds", None),
        ("POST /api/projects/{project_id}/builds", "POST", "/api/projects/a/b/builds", None),
        ("GET /u/{a}/{b}", "GET", "/u/1/2", {"a": "1", "b": "2"}),
        ("GET /files/{name}/*", "GET", "/files/x/deep/er", {"name": "x"}),
        ("GET /a.b", "GET", "/aXb", None),
        ("GET /line", "GET", "/line\n", None),
    ],
)
def test_match(pattern: str, method: str, path: str, expected: dict[str, str] | None) -> None:
    result = Route(pattern).match(method, path)
    assert (None if result is None else dict(result)) == expected


@pytest.mark.parametrize(
    "pattern",
    [
        "get /x",
        "POST api/x",
        "POST /a/*/b",
        "POST /a/{b",
        "POST /a/{1x}",
        "GET /a/{x}/{x}",
        "GET /a//b",
    ],
)
def test_bad_patterns_fail_at_start_up(pattern: str) -> None:
    with pytest.raises(ConfigError, match="route"):
        Route(pattern)


def test_route_map_first_and_all() -> None:
    table = RouteMap(
        [
            ("POST /api/send-email", "email"),
            ("* /api/*", "global"),
            ("POST /api/projects/{project_id}/builds", "builds"),
        ]
    )
    assert table.first("POST", "/api/send-email") == ("email", {})
    assert [v for v, _ in table.all("POST", "/api/send-email")] == ["email", "global"]
    matches = table.all("POST", "/api/projects/7/builds")
    assert [(v, dict(p)) for v, p in matches] == [("global", {}), ("builds", {"project_id": "7"})]
    assert table.first("GET", "/other") is None
    assert len(table) == 3
    assert not RouteMap([])
