"""The store-failure policy, one implementation for every concern that keeps state.

Rate limiting, idempotency and the signature replay cache each have their own
``on_store_error`` (docs/architecture.md, "Stores"): ``"allow"`` lets the request through
without the concern, ``"deny"`` answers 503 service_unavailable. Either way the failure is
counted and logged, at most once per ``warn_every`` seconds per concern, so a dead store
during a flood costs a counter increment per request, not a log line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from asgi_armor.errors import ConfigError, ServiceUnavailable

if TYPE_CHECKING:
    from asgi_armor.metrics import Metrics
    from asgi_armor.stores.base import OnStoreError

__all__ = ["StorePolicy", "check_policy"]


def check_policy(value: object, entry: str) -> OnStoreError:
    """``value`` if it is ``"allow"`` or ``"deny"``.

    Raises:
        ConfigError: it is not; the message names ``entry``.
    """
    if value == "allow":
        return "allow"
    if value == "deny":
        return "deny"
    raise ConfigError(f"{entry}: {value!r} is not 'allow' or 'deny'")


class StorePolicy:
    """Count, log and apply one concern's ``on_store_error``.

    Args:
        on_store_error: ``"allow"`` or ``"deny"``.
        what: the concern, as the log names it (``"rate-limit store"``).
        allowing: what happens to the request under ``"allow"``, for the log.
        denying: what happens to the request under ``"deny"``, for the log.
        entry: the config entry named when ``on_store_error`` is bad.
        logger: where failures are reported.
        warn_every: seconds between two warnings.
        clock: monotonic seconds, only for spacing the warnings.
        concern: the ``concern`` label of ``armor_store_errors_total`` and the ``layer`` of
            the 503 under ``"deny"`` (rate_limit, idempotency, signature).
        metrics: where failures are counted (the owning layer sets it).

    Raises:
        ConfigError: ``on_store_error`` is not ``"allow"`` or ``"deny"``.
    """

    __slots__ = (
        "_last_warning",
        "allowing",
        "clock",
        "concern",
        "denying",
        "failures",
        "logger",
        "metrics",
        "on_store_error",
        "warn_every",
        "what",
    )

    def __init__(
        self,
        on_store_error: OnStoreError,
        *,
        what: str,
        allowing: str,
        denying: str,
        entry: str = "on_store_error",
        logger: logging.Logger,
        warn_every: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        concern: str = "store",
        metrics: Metrics | None = None,
    ) -> None:
        self.on_store_error = check_policy(on_store_error, entry)
        self.concern = concern
        self.metrics = metrics
        self.what = what
        self.allowing = allowing
        self.denying = denying
        self.logger = logger
        self.warn_every = warn_every
        self.clock = clock
        self.failures = 0
        self._last_warning = -float("inf")

    def failed(self, exc: BaseException, request_id: str | None = None) -> None:
        """Count and (at most once per ``warn_every``) log a failure, then apply the policy:
        return under ``"allow"``.

        Raises:
            ServiceUnavailable: ``on_store_error`` is ``"deny"`` (``Retry-After: 1``: the
                store's breaker lets a trial call through after about a second).
        """
        self.failures += 1
        if self.metrics is not None:
            self.metrics.store_error(self.concern)
        now = self.clock()
        deny = self.on_store_error == "deny"
        if now - self._last_warning >= self.warn_every:
            self._last_warning = now
            self.logger.warning(
                "%s failed (%s so far), %s%s: %s: %s",
                self.what,
                self.failures,
                self.denying if deny else self.allowing,
                "" if request_id is None else f" [request_id={request_id}]",
                type(exc).__name__,
                exc,
            )
        if deny:
            unavailable = ServiceUnavailable(retry_after=1.0)
            if self.concern != "store":
                # Counted under the layer that refused, not the generic "error" layer.
                unavailable.layer = self.concern  # type: ignore[misc]
            raise unavailable from exc
