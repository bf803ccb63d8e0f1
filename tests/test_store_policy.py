"""The store-failure policy every stateful concern shares: count, log once per interval, apply."""

from __future__ import annotations

import logging

import pytest

from asgi_armor._store_policy import StorePolicy
from asgi_armor.errors import ConfigError, ServiceUnavailable
from asgi_armor.stores.base import StoreError
from tests.conftest import FakeClock

log = logging.getLogger("tests.store_policy")


def _policy(on_store_error: str, clock: FakeClock) -> StorePolicy:
    return StorePolicy(
        on_store_error,  # type: ignore[arg-type]
        what="test store",
        allowing="request runs unprotected",
        denying="request denied",
        entry="test on_store_error",
        logger=log,
        clock=clock,
    )


def test_allow_counts_every_failure_and_logs_once_per_interval(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    policy = _policy("allow", clock)
    caplog.set_level(logging.WARNING, logger=log.name)
    for _ in range(50):
        policy.failed(StoreError("down"), "req_1")
    assert policy.failures == 50
    assert [r.getMessage() for r in caplog.records] == [
        "test store failed (1 so far), request runs unprotected [request_id=req_1]: "
        "StoreError: down"
    ]
    clock.advance(60)
    policy.failed(StoreError("down"))
    assert len(caplog.records) == 2


def test_deny_raises_service_unavailable(clock: FakeClock) -> None:
    policy = _policy("deny", clock)
    with pytest.raises(ServiceUnavailable) as info:
        policy.failed(StoreError("down"))
    assert info.value.headers == {"Retry-After": "1"}
    assert policy.failures == 1


def test_bad_policy_names_the_entry(clock: FakeClock) -> None:
    with pytest.raises(ConfigError, match=r"^test on_store_error: 'maybe' is not"):
        _policy("maybe", clock)
