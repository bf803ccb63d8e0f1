"""asgi_armor: make any ASGI API survive contact with the real world."""

from __future__ import annotations

__all__: list[str] = []
