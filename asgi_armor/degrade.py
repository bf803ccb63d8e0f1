"""Graceful degradation: answer with what is available instead of failing the whole request.

``gather_partial`` runs a page's components concurrently, each under its own timeout; a
component that fails, times out or sits behind an open circuit breaker is replaced by its
fallback and named in ``errors``, and the result encodes to ``{data, partial, errors}``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Literal

import anyio
import anyio.lowlevel
import msgspec

from asgi_armor import _checks
from asgi_armor.errors import CircuitOpenError, ConfigError

__all__ = ["Component", "ComponentError", "Partial", "Target", "gather_partial"]

logger = logging.getLogger("asgi_armor")

#: What a component runs: an async function of no arguments, an awaitable (a coroutine
#: object), or a sync function of no arguments (run inline on the event loop).
Target = Callable[[], Awaitable[Any]] | Callable[[], Any] | Awaitable[Any]

#: ``(target, fallback)`` or ``(target, fallback, timeout_seconds_or_None)``.
Component = tuple[Target, Any] | tuple[Target, Any, float | None]


class ComponentError(msgspec.Struct, frozen=True):
    """A component that took its fallback; encodes as ``{"component": ..., "error": ...}``.

    ``error`` is always ``"unavailable"``: the real cause (exception, timeout, open
    breaker) is logged server-side under the ``asgi_armor`` logger, never sent.
    """

    component: str
    error: Literal["unavailable"] = "unavailable"


class Partial(msgspec.Struct, frozen=True):
    """The result of ``gather_partial``: ``{"data": {...}, "partial": bool, "errors": [...]}``.

    Attributes:
        data: every component's value, or its fallback, in the order the components were given.
        partial: True when at least one component took its fallback.
        errors: one entry per component that took its fallback, in the same order.
    """

    data: dict[str, Any]
    partial: bool
    errors: list[ComponentError]


def _parse(name: str, component: object, timeout: float | None) -> tuple[Any, Any, float | None]:
    if not isinstance(component, tuple) or len(component) not in (2, 3):
        raise ConfigError(
            f"gather_partial: component {name!r} must be (fn, fallback) or (fn, fallback, timeout)"
        )
    target = component[0]
    if not (callable(target) or inspect.isawaitable(target)):
        raise ConfigError(
            f"gather_partial: component {name!r}: {type(target).__name__} is neither "
            "callable nor awaitable"
        )
    seconds: object = component[2] if len(component) == 3 else timeout
    if seconds is None:
        return target, component[1], None
    return (
        target,
        component[1],
        _checks.seconds(seconds, f"gather_partial: component {name!r}: timeout"),
    )


def _close_unstarted(targets: Iterable[object]) -> None:
    # A coroutine object that never ran (a malformed sibling, or the caller cancelled
    # before its task's first step) would warn "coroutine ... was never awaited".
    for target in targets:
        if inspect.iscoroutine(target) and inspect.getcoroutinestate(target) == "CORO_CREATED":
            target.close()


# The ``timeout`` keyword is the documented API (docs/degradation.md); it is applied per component
# with anyio cancel scopes, which is what ASYNC109 asks for.
async def gather_partial(
    components: Mapping[str, Component],
    *,
    timeout: float | None = 1.0,  # noqa: ASYNC109
) -> Partial:
    """Run every component concurrently; each that fails or times out takes its fallback.

    A component is ``(fn, fallback)`` or ``(fn, fallback, timeout)``: ``fn`` is an async
    function of no arguments (a sync one returning the value also works, but runs inline on
    the event loop) or an awaitable such as a coroutine object. Each runs under its own
    ``timeout`` (the per-component one if given, else the keyword; None waits forever), so
    the whole call takes about as long as the slowest component, not the sum. A component
    that raises an ``Exception`` (``CircuitOpenError`` included: it counts as unavailable
    at once), or is still running at its timeout, takes its fallback and adds
    ``ComponentError(name)``; the cause is logged, not returned. Component exceptions never
    escape; cancellation of the caller does, cancelling every component.

    Args:
        components: name -> component; ``data`` keeps this order.
        timeout: default seconds each component may take (None: no limit).

    Raises:
        ConfigError: a component is not a 2- or 3-tuple of (callable or awaitable,
            fallback[, timeout > 0]); raised before anything runs.
    """
    try:
        plan = [(name, *_parse(name, c, timeout)) for name, c in components.items()]
    except ConfigError:
        given: list[object] = list(components.values())
        _close_unstarted(c[0] for c in given if isinstance(c, tuple) and c)
        raise
    results: dict[str, Any] = {}
    failed: set[str] = set()

    async def run(name: str, target: Any, seconds: float | None) -> None:
        with anyio.move_on_after(seconds) as scope:
            try:
                value = target if inspect.isawaitable(target) else target()
                if inspect.isawaitable(value):
                    value = await value
            except CircuitOpenError as exc:
                failed.add(name)
                logger.warning(
                    "component %r unavailable: circuit breaker %r open (retry after %.3gs)",
                    name,
                    exc.name,
                    exc.retry_after,
                )
                return
            except Exception:
                failed.add(name)
                logger.exception("component %r unavailable: it raised", name)
                return
            results[name] = value
        if scope.cancelled_caught:
            failed.add(name)
            logger.warning("component %r unavailable: no answer within %gs", name, seconds)

    try:
        # A checkpoint even when every component finishes without one (trio's rule), so a
        # caller that is already cancelled always sees its cancellation.
        await anyio.lowlevel.checkpoint_if_cancelled()
        async with anyio.create_task_group() as tg:
            for name, target, _fallback, component_timeout in plan:
                tg.start_soon(run, name, target, component_timeout, name=f"gather_partial:{name}")
    finally:
        _close_unstarted(target for _name, target, _fallback, _timeout in plan)

    data: dict[str, Any] = {}
    errors: list[ComponentError] = []
    for name, _target, fallback, _timeout in plan:
        if name in failed or name not in results:
            data[name] = fallback
            errors.append(ComponentError(name))
        else:
            data[name] = results[name]
    return Partial(data=data, partial=bool(errors), errors=errors)
