"""ArmorConfig: TOML loading, durations, and errors that name the entry at fault."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from asgi_armor import ArmorConfig, ConfigError, armor
from asgi_armor.config import parse_duration
from asgi_armor.demo.app import BUNDLED_CONFIG


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (30, 30.0),
        (0.5, 0.5),
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("24h", 86400.0),
        ("7d", 604800.0),
        ("2", 2.0),
    ],
)
def test_durations(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-1s", "5 weeks", "1e9999", True])
def test_bad_durations(text: str | bool) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "armor.toml"
    path.write_text(text)
    return path


def test_bundled_demo_config_loads() -> None:
    config = ArmorConfig.from_toml(BUNDLED_CONFIG)
    assert [r.rate for r in config.rate_limit] == ["1000/minute", "10/minute", "5/hour", "20/hour"]
    assert config.idempotency[0].ttl == 86400.0
    assert config.timeout[0].seconds == 5.0


def test_defaults_give_errors_and_limits_only() -> None:
    armored = armor(lambda scope, receive, send: None, ArmorConfig())  # type: ignore[arg-type, return-value]
    assert [type(layer).__name__ for layer in armored.layers] == ["ErrorMiddleware", "InputLimits"]


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            '[[rate_limit]]\nroute = "* /api/*"\nrate = "10/minuet"\n',
            r"rate_limit\[0\].*'10/minuet' is not a rate",
        ),
        (
            '[[rate_limit]]\nroute = "* /a"\nrate = "1/s"\n'
            '[[rate_limit]]\nroute = "/b"\nrate = "1/s"\nkey = "cookie"\n',
            r"rate_limit\[1\].*cookie",
        ),
        (
            '[[timeout]]\nroute = "GET /x"\nseconds = "soon"\n',
            r"timeout\[0\]\.seconds: 'soon' is not a duration",
        ),
        ('[[timeout]]\nroute = "GET x"\nseconds = 1\n', r"timeout\[0\]\.route: route 'GET x'"),
        ('[limits]\nmax_body_bytes = "big"\n', r"limits\.max_body_bytes: Expected `int`"),
        ("[limits]\nmax_bodybytes = 1\n", r"limits\.max_bodybytes: unknown setting"),
        ('store = "mongodb://x"\n', r"store: 'mongodb://x' is not 'memory' or a redis:// URL"),
        ('trusted_proxies = ["10.0.0.1", "proxy"]\n', r"trusted_proxies\[1\]: 'proxy'"),
        (
            '[[signature]]\nroute = "POST /hook"\nsecret_env = "ARMOR_TEST_SURELY_UNSET"\n',
            r"signature\[0\]: environment variable 'ARMOR_TEST_SURELY_UNSET' is not set",
        ),
        ('[[signature]]\nroute = "POST /hook"\n', r"signature\[0\]: set secret_env"),
        (
            '[[idempotency]]\nroute = "POST /pay"\nttl = "forever"\n',
            r"idempotency\[0\]\.ttl: 'forever'",
        ),
        (
            '[[rate_limit]]\nroute = "/x"\nrate = "1/s"\n'
            '[[rate_limit]]\nroute = "/x"\nrate = "1/s"\nkey = "user"\n',
            r"rate_limit\[1\]\.key: 'user' needs an identify hook",
        ),
        (
            '[[rate_limit]]\nroute = "/x"\nrate = "1/s"\nname = "a"\n'
            '[[rate_limit]]\nroute = "/y"\nrate = "2/s"\nname = "a"\n',
            r"rate_limit\[1\]\.name: 'a' is already the name of another rule",
        ),
        ('identify = "no_such_module:fn"\n', r"identify: cannot import 'no_such_module:fn'"),
        (
            "[shedding]\nmax_queue = 3\n",
            r"shedding: Object missing required field `max_concurrent`",
        ),
        ("this is = not toml", r"not valid TOML"),
        (
            'store = "redis://127.0.0.1:6379/15"\nstore_timeout = 0\n',
            r"store_timeout: must be more",
        ),
        (
            'store = "redis://127.0.0.1:6379/15"\nstore_prefix = ""\n',
            r"store_prefix: must not be empty",
        ),
    ],
)
def test_every_mistake_names_its_entry(tmp_path: Path, toml: str, message: str) -> None:
    """The message starts with the entry at fault (after the file, for mistakes found
    while reading it): a message that only mentions it somewhere does not count."""
    path = write(tmp_path, toml)
    with pytest.raises(ConfigError) as caught:
        armor(lambda s, r, x: None, ArmorConfig.from_toml(path))  # type: ignore[arg-type, return-value]
    text = str(caught.value).removeprefix(f"{path}: ")
    assert re.match(message, text), text
    assert str(path) not in text


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        ArmorConfig.from_toml(tmp_path / "nope.toml")


def test_identify_from_config_is_imported(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'identify = "asgi_armor.demo.app:demo_identify"\n'
        '[[rate_limit]]\nroute = "* /api/*"\nrate = "5/hour"\nkey = "user"\n',
    )
    armored = armor(lambda s, r, x: None, ArmorConfig.from_toml(path))  # type: ignore[arg-type, return-value]
    assert "RateLimitMiddleware" in repr(armored)


def test_with_store_copies() -> None:
    config = ArmorConfig()
    assert config.with_store("redis://127.0.0.1:6379/15").store == "redis://127.0.0.1:6379/15"
    assert config.store == "memory"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("ipv6_prefix = 0\n", r"ipv6_prefix: 0 is not a prefix length from 1 to 128"),
        ("ipv6_prefix = 129\n", r"ipv6_prefix: 129 is not a prefix length"),
        ('ipv6_prefix = "64"\n', r"ipv6_prefix: Expected `int`"),
        ('trusted_proxies = ["unix", "unix:/run/x.sock"]\n', r"trusted_proxies\[1\]"),
    ],
)
def test_proxy_and_ipv6_mistakes_name_their_entry(tmp_path: Path, toml: str, message: str) -> None:
    # ipv6_prefix is checked even without a rate limit: a mistake never waits for one.
    with pytest.raises(ConfigError, match=message):
        armor(lambda s, r, x: None, ArmorConfig.from_toml(write(tmp_path, toml)))  # type: ignore[arg-type, return-value]


def test_ipv6_prefix_reaches_the_rate_limiter(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'ipv6_prefix = 56\ntrusted_proxies = ["unix", "*"]\n'
        '[[rate_limit]]\nroute = "* /api/*"\nrate = "5/hour"\n',
    )
    armored = armor(lambda s, r, x: None, ArmorConfig.from_toml(path))  # type: ignore[arg-type, return-value]
    limiter = next(x for x in armored.layers if type(x).__name__ == "RateLimitMiddleware")
    assert limiter.ipv6_prefix == 56  # type: ignore[attr-defined]
    assert ArmorConfig().ipv6_prefix == 64
