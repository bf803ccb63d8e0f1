"""Route patterns."""

from __future__ import annotations

import pytest

from asgi_armor.errors import ConfigError
from asgi_armor.routes import Route, RouteMap, target


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


@pytest.mark.parametrize(
    ("scope", "expected"),
    [
        ({"method": "POST", "path": "/api/pay"}, ("POST", "/api/pay")),
        ({"method": "post", "path": "/api/pay"}, ("POST", "/api/pay")),
        ({"method": "Post", "path": "//api//pay//"}, ("POST", "/api/pay")),
        ({"method": "GET", "path": "/api/pay/"}, ("GET", "/api/pay")),
        ({"method": "GET", "path": "///"}, ("GET", "/")),
        # root_path is removed only where it prefixes the path at a segment boundary.
        ({"method": "GET", "path": "/svc/api/pay", "root_path": "/svc"}, ("GET", "/api/pay")),
        ({"method": "GET", "path": "/svc", "root_path": "/svc"}, ("GET", "/")),
        ({"method": "GET", "path": "/svc/api", "root_path": "/svc/"}, ("GET", "/api")),
        ({"method": "GET", "path": "/svcx/api", "root_path": "/svc"}, ("GET", "/svcx/api")),
        ({"method": "GET", "path": "/api/pay", "root_path": "/svc"}, ("GET", "/api/pay")),
        ({"method": "GET", "path": "/svc//api", "root_path": "/svc"}, ("GET", "/api")),
        ({"method": "GET", "path": "/api", "root_path": "/"}, ("GET", "/api")),
        # An absolute-form target (RFC 9112 section 3.2.2), as uvicorn's h11 leaves it.
        ({"method": "post", "path": "http://127.0.0.1:8000//api/pay"}, ("POST", "/api/pay")),
        ({"method": "GET", "path": "http://127.0.0.1"}, ("GET", "/")),
        # A websocket handshake is a GET.
        ({"type": "websocket", "path": "/ws"}, ("GET", "/ws")),
    ],
)
def test_target_is_what_the_app_routes(scope: dict[str, str], expected: tuple[str, str]) -> None:
    assert target(scope) == expected


def test_target_keeps_the_scope_untouched() -> None:
    scope = {"method": "post", "path": "/svc//x", "root_path": "/svc"}
    target(scope)
    assert scope == {"method": "post", "path": "/svc//x", "root_path": "/svc"}
