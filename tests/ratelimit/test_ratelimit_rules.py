"""Rules: key specs checked at start-up, stable distinct names, costs."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from asgi_armor._asgi import Scope
from asgi_armor.errors import ConfigError
from asgi_armor.ratelimit import Rate, Rule
from asgi_armor.ratelimit import rules as r


def tenant(scope: Scope, params: Mapping[str, str]) -> str | None:
    return None


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        ("ip", r.KEY_IP),
        ("user", r.KEY_USER),
        ("global", r.KEY_GLOBAL),
        ("path:project_id", r.KEY_PATH),
        ("header:X-Api-Key", r.KEY_HEADER),
        (tenant, r.KEY_CALLABLE),
    ],
)
def test_key_kinds(key: str | r.KeyFunc, kind: int) -> None:
    rule = Rule("POST /api/projects/{project_id}/builds", "20/hour", key)
    assert rule.key_kind == kind
    assert rule.rate == Rate(20, 3600)
    assert rule.cost == 1


def test_header_and_path_arguments() -> None:
    assert Rule("* /x", "1/s", "header:X-Api-Key").header == b"x-api-key"
    assert Rule("* /p/{id}", "1/s", "path:id").param == "id"


@pytest.mark.parametrize(
    ("route", "rate", "key", "kwargs", "message"),
    [
        ("* /api/*", "10/minuet", "ip", {}, "rule '* /api/*': '10/minuet' is not a rate"),
        ("* /api/*", "10/minute", "cookie", {}, "rule '* /api/*': unknown key 'cookie'"),
        ("* /api/*", "10/minute", "path:", {}, "unknown key 'path:'"),
        ("* /a/{id}", "10/minute", "path:pid", {}, "key 'path:pid' names no parameter"),
        ("* /a", "10/minute", "header:bad header", {}, "is not a header name"),
        ("* /a", "10/minute", 42, {}, "key must be a string or a callable"),
        ("* /a", "10/minute", "ip", {"name": "a:b"}, "rule 'a:b': the name must be"),
        ("* /a", "10/minute", "ip", {"name": ""}, "the name must be"),
        ("* /a", "10/minute", "ip", {"name": "x" * 65}, "the name must be"),
        ("* /a", "10/minute", "ip", {"cost": 11}, "cost 11 exceeds the burst of 10/minute"),
        ("* /a", "10/minute", "ip", {"cost": -1}, "cost must be a whole number >= 0"),
        ("GET a", "10/minute", "ip", {}, "must start with '/'"),
    ],
)
def test_config_errors_name_the_rule(
    route: str, rate: str, key: object, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Rule(route, rate, key, **kwargs)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_default_names_are_stable_readable_and_distinct() -> None:
    a = Rule("* /api/*", "1000/minute", "ip")
    assert a.name == Rule("* /api/*", "1000/min", "ip").name
    assert a.name.startswith("ip-")
    others = {
        Rule("* /api/*", "1000/minute", "user").name,
        Rule("* /api/x", "1000/minute", "ip").name,
        Rule("* /api/*", "999/minute", "ip").name,
        a.name,
    }
    assert len(others) == 4
    assert Rule("* /p/{id}", "1/s", "path:id").name.startswith("path.id-")
    assert Rule("* /p", "1/s", tenant).name.startswith("tenant-")


def test_explicit_name_and_repr() -> None:
    rule = Rule("POST /api/send-email", Rate(5, 3600), "user", name="email", cost=2)
    assert rule.name == "email"
    assert repr(rule) == "Rule('POST /api/send-email', '5/hour', key='user', name='email', cost=2)"
