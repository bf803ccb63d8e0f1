"""Rules: key specs checked at start-up, stable distinct names, costs."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from asgi_armor._asgi import Scope
from asgi_armor.errors import ConfigError
from asgi_armor.ratelimit import Rate, Rule
from asgi_armor.ratelimit import rules as r
from asgi_armor.ratelimit.rules import unique_names


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
    assert Rule("* /api/*", "1000/minute", "ip").name == "ip"
    assert Rule("* /api/*", "999/min", "ip").name == "ip"  # the rate is no part of it
    assert Rule("POST /api/expensive-operation", "10/minute").name == "ip-expensive-operation"
    assert Rule("POST /api/send-email", "5/hour", "user").name == "user-send-email"
    assert Rule("* /p/{id}", "1/s", "path:id").name == "path.id-p"
    assert Rule("* /p/{pid}/builds", "1/s", "path:pid").name == "path.pid-builds"
    assert Rule("* /p", "1/s", tenant).name == "tenant-p"
    assert Rule("* /p", "1/s", "header:X-Api-Key").name == "header.X-Api-Key-p"
    assert Rule("*", "1/s", "global").name == "global"


def test_unique_names_keep_the_first_and_number_the_others() -> None:
    rules = [
        Rule("GET /api/items", "10/minute"),
        Rule("POST /api/items", "5/minute"),
        Rule("* /api/items", "3/minute"),
        Rule("* /api/items", "2/minute"),
        Rule("* /x", "1/minute", name="ip-items-2"),  # an explicit name is taken first
        Rule("* /api/*", "1000/minute"),
    ]
    unique_names(rules)
    assert [rule.name for rule in rules] == [
        "ip-items",
        "ip-items-3",
        "ip-items-4",
        "ip-items-5",
        "ip-items-2",
        "ip",
    ]
    unique_names(rules)  # stable: a second pass changes nothing
    assert rules[1].name == "ip-items-3"


def test_count_and_shadow_options() -> None:
    rule = Rule("POST /api/login", "5/15minutes", count="failures", shadow=True)
    assert (rule.count, rule.shadow) == ("failures", True)
    assert repr(rule) == (
        "Rule('POST /api/login', '5/900s', key='ip', name='ip-login', cost=1, "
        "count='failures', shadow=True)"
    )
    with pytest.raises(ConfigError, match="count 'errors' is not 'requests' or 'failures'"):
        Rule("* /a", "1/s", count="errors")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="shadow must be true or false"):
        Rule("* /a", "1/s", shadow=1)  # type: ignore[arg-type]


def test_explicit_name_and_repr() -> None:
    rule = Rule("POST /api/send-email", Rate(5, 3600), "user", name="email", cost=2)
    assert rule.name == "email"
    assert repr(rule) == "Rule('POST /api/send-email', '5/hour', key='user', name='email', cost=2)"
