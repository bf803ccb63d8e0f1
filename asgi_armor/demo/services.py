"""The demo's fake dependencies, each with a fault switch (``PUT /demo/faults/{component}``)."""

from __future__ import annotations

from typing import Literal

import anyio
import msgspec

__all__ = ["COMPONENTS", "DependencyError", "Fault", "FaultBoard", "UserRecord"]

COMPONENTS = ("db", "search", "user", "notifications")


class DependencyError(Exception):
    """A fake dependency failed (the kind of error a real driver raises)."""


class Fault(msgspec.Struct, forbid_unknown_fields=True):
    """How a component behaves: answer, fail, or answer after ``delay`` seconds.

    ``mode`` is required: ``PUT /demo/faults/{component}`` without it is a 422, not "ok".
    """

    mode: Literal["ok", "fail", "slow"]
    delay: float = msgspec.field(default=10.0)

    def __post_init__(self) -> None:
        if not 0 <= self.delay <= 120:
            raise msgspec.ValidationError("delay must be between 0 and 120 seconds - at `$.delay`")


class UserRecord(msgspec.Struct, frozen=True):
    """A row of the fake users table."""

    id: int
    email: str
    name: str


_USERS = {
    1: UserRecord(1, "ada@example.com", "Ada Lovelace"),
    2: UserRecord(2, "grace@example.com", "Grace Hopper"),
    3: UserRecord(3, "alan@example.com", "Alan Turing"),
}


class FaultBoard:
    """The fault mode of every fake component, and the fake components themselves."""

    def __init__(self) -> None:
        self.faults: dict[str, Fault] = {name: Fault("ok") for name in COMPONENTS}

    async def _behave(self, component: str) -> None:
        fault = self.faults[component]
        if fault.mode == "fail":
            # What a real driver would say: the envelope must never show it.
            raise DependencyError(f"{component}: connection refused (10.0.0.12:5432)")
        if fault.mode == "slow":
            await anyio.sleep(fault.delay)

    async def get_user(self, user_id: int) -> UserRecord | None:
        """The fake database: users 1, 2 and 3."""
        await self._behave("db")
        return _USERS.get(user_id)

    async def search(self, query: str) -> list[str]:
        """The fake search engine."""
        await self._behave("search")
        words = ("armor", "asgi", "breaker", "idempotency", "rate limit", "timeout", "webhook")
        return [word for word in words if query.lower() in word]

    async def current_user(self) -> dict[str, object]:
        """The dashboard's user component."""
        await self._behave("user")
        return {"id": 1, "name": "Ada Lovelace"}

    async def notifications(self) -> list[dict[str, object]]:
        """The dashboard's notifications component."""
        await self._behave("notifications")
        return [{"id": 1, "text": "Your build finished"}]
