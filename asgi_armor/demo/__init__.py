"""The demo API (``asgi-armor demo``): the article's example API, protected."""

from asgi_armor.demo.app import Demo, banner, create_demo, demo_identify

__all__ = ["Demo", "banner", "create_demo", "demo_identify"]
