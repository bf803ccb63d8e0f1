"""Framework adapters: render ``ArmorError`` raised inside routes as the envelope."""

__all__: list[str] = []
