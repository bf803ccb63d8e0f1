"""``asgi-armor``: serve an armored app, check a config, or run the demo (uvicorn underneath)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from asgi_armor.errors import ConfigError

__all__ = ["armored_from_env", "main"]

_DESCRIPTION = """\
asgi_armor wraps any ASGI app (Starlette, FastAPI, Quart, Litestar, a bare callable) in
input limits, layered rate limits, idempotency keys, circuit breakers, timeouts, request
signing and load shedding, all answering errors with one JSON envelope and a request id.
"""

_EPILOG = """\
examples:
  asgi-armor demo                                  the example API at http://127.0.0.1:8000
  asgi-armor demo --store redis://127.0.0.1:6379/0 the same, state shared through Redis
  asgi-armor check armor.toml                      validate a config and print the stack
  asgi-armor run myproject.main:app --config armor.toml --port 8080

docs: README.md and docs/ (`make docs` builds the site)
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asgi-armor",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def serving(sub: argparse.ArgumentParser, default_port: int) -> None:
        sub.add_argument(
            "--host", default="127.0.0.1", help="interface to bind (default: %(default)s)"
        )
        sub.add_argument(
            "--port", type=int, default=default_port, help="port (default: %(default)s)"
        )

    demo = commands.add_parser(
        "demo",
        help="serve the example API protected by every capability",
        description="Serve the example API of the docs (validation, layered rate limits, "
        "idempotent payments, a breaker on a fake database, a search timeout, a partial "
        "dashboard, a signed webhook, load shedding) with a bundled armor.toml.",
    )
    serving(demo, 8000)
    demo.add_argument(
        "--store",
        default=None,
        help="'memory' (default) or a Redis URL such as redis://127.0.0.1:6379/0",
    )
    demo.add_argument(
        "--config", default=None, help="an armor.toml to use instead of the bundled one"
    )

    run = commands.add_parser(
        "run",
        help="serve your ASGI app wrapped by an armor.toml",
        description="Import APP ('module:attribute'), wrap it with the protections described "
        "in --config, and serve it with uvicorn. Forwarding headers are trusted only as "
        "'trusted_proxies' in the config says (uvicorn's own proxy headers are off).",
    )
    run.add_argument("app", metavar="APP", help="the ASGI app to serve, as module:attribute")
    run.add_argument("--config", required=True, help="path of the armor.toml")
    serving(run, 8000)
    run.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")

    check = commands.add_parser(
        "check",
        help="validate an armor.toml and print the resulting stack",
        description="Load and validate CONFIG exactly as 'run' would, then print the layers, "
        "routes and limits it builds. Exits 1 with the entry at fault on any mistake.",
    )
    check.add_argument("config", metavar="CONFIG", help="path of the armor.toml")
    return parser


_RUN_APP = "ARMOR_RUN_APP"
_RUN_CONFIG = "ARMOR_RUN_CONFIG"


def armored_from_env() -> Any:
    """The app ``asgi-armor run --workers N`` serves: each worker process builds its own."""
    from asgi_armor.config import ArmorConfig
    from asgi_armor.stack import armor

    return armor(_import_app(os.environ[_RUN_APP]), ArmorConfig.from_toml(os.environ[_RUN_CONFIG]))


def _serve(app: Any, *, host: str, port: int, limits: Any = None, workers: int = 1) -> None:
    try:
        import uvicorn
    except ImportError:  # pragma: no cover - depends on the install
        raise SystemExit(
            "asgi-armor: serving needs uvicorn: pip install 'asgi-armor[cli]'"
        ) from None
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        # uvicorn trusts X-Forwarded-For from 127.0.0.1 by default; trusted_proxies
        # must be the only source of that trust.
        "proxy_headers": False,
        "server_header": False,
        "lifespan": "auto",
        "workers": workers,
        "factory": isinstance(app, str),
    }
    if limits is not None:
        # Let a request line and headers as large as [limits] allows reach armor, so an
        # oversize request gets the 414/431 envelope rather than h11's bare 400.
        options["h11_max_incomplete_event_size"] = (
            limits.max_url_bytes + limits.max_header_bytes + 4096
        )
    uvicorn.run(app, **options)


def _import_app(spec: str) -> Any:
    from asgi_armor.stack import import_callable

    # Like uvicorn: the app's module is found from the directory the command runs in.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return import_callable(spec, "APP")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``asgi-armor``; returns the exit code."""
    args = _parser().parse_args(argv)
    from asgi_armor.config import ArmorConfig
    from asgi_armor.stack import armor, describe

    try:
        if args.command == "check":
            config = ArmorConfig.from_toml(args.config)
            print(describe(config))
            return 0
        if args.command == "run":
            config = ArmorConfig.from_toml(args.config)
            app: Any = armor(_import_app(args.app), config)  # fail here, once, on any mistake
            if args.workers > 1:
                # Worker processes import the app by name and build their own stack.
                os.environ[_RUN_APP] = args.app
                os.environ[_RUN_CONFIG] = os.path.abspath(args.config)
                app = "asgi_armor.cli:armored_from_env"
            _serve(app, host=args.host, port=args.port, limits=config.limits, workers=args.workers)
            return 0
        from asgi_armor.demo import banner, create_demo

        demo, config = create_demo(config_path=args.config, store=args.store)
        print(banner(config, args.host, args.port), flush=True)
        _serve(demo, host=args.host, port=args.port, limits=config.limits)
        return 0
    except ConfigError as exc:
        print(f"asgi-armor: configuration error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
