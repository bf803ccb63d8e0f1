"""Store URLs naming several hosts: ``redis+cluster://`` and ``redis+sentinel://``.

``redis+cluster://[user:password@]host:port[,host:port...][/0][?options]`` names a few
nodes of a Redis Cluster (the rest are discovered); ``redis+sentinel://[user:password@]
host:port[,host:port...]/<service>[/<db>][?options]`` names the sentinels watching
``<service>``. ``rediss+`` is the TLS form; ``valkey`` / ``valkeys`` are accepted wherever
``redis`` / ``rediss`` are. ``options`` are redis-py's URL query arguments, applied to
every data node (``?socket_keepalive=true``). Credentials are the data nodes'.
"""

from __future__ import annotations

from typing import Literal, NamedTuple
from urllib.parse import unquote

__all__ = ["ALIASES", "HostsURL", "canonical", "parse_hosts_url", "single_node_url"]

#: Valkey's schemes, read as the Redis ones they are compatible with.
ALIASES = {"valkey": "redis", "valkeys": "rediss"}

Kind = Literal["cluster", "sentinel"]
_DEFAULT_PORT: dict[str, int] = {"cluster": 6379, "sentinel": 26379}


class HostsURL(NamedTuple):
    """A parsed multi-host store URL."""

    kind: Kind
    tls: bool
    userinfo: str  # "user:password@" as written (still percent-encoded), or ""
    hosts: tuple[tuple[str, int], ...]
    service: str  # the Sentinel service name ("" for a cluster)
    db: int
    query: str  # redis-py URL options, as written

    @property
    def password(self) -> str | None:
        """The data nodes' password, if the URL has one."""
        if ":" not in self.userinfo:
            return None
        return unquote(self.userinfo[:-1].partition(":")[2])

    @property
    def username(self) -> str | None:
        """The data nodes' user name, if the URL has one."""
        name = unquote(self.userinfo[:-1].partition(":")[0]) if self.userinfo else ""
        return name or None


def canonical(url: str) -> str:
    """``url`` with a ``valkey://`` / ``valkeys://`` scheme read as ``redis://`` / ``rediss://``."""
    scheme, sep, rest = url.partition("://")
    alias = ALIASES.get(scheme.lower())
    return f"{alias}://{rest}" if sep and alias else url


def _host(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):  # an IPv6 address: [::1]:7000
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r} is not host:port")
        port_text = rest[1:] if rest else ""
    else:
        host, _, port_text = text.partition(":")
    if not host or any(c in host for c in " /?#@[]"):
        raise ValueError(f"{text!r} is not host:port")
    if not port_text:
        return host, default_port
    if not (port_text.isdigit() and port_text.isascii()) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"the port of {text!r} must be a number in 1..65535")
    return host, int(port_text)


def parse_hosts_url(url: str) -> HostsURL:
    """Parse a ``redis+cluster://`` or ``redis+sentinel://`` URL (or a ``rediss+`` /
    ``valkey+`` / ``valkeys+`` form).

    Raises:
        ValueError: the URL is malformed; the message says what is wrong (never the
            password).
    """
    scheme, sep, rest = url.partition("://")
    base, plus, kind_text = scheme.lower().partition("+")
    base = ALIASES.get(base, base)
    if not sep or not plus or base not in ("redis", "rediss") or kind_text not in _DEFAULT_PORT:
        raise ValueError(
            "the scheme must be redis+cluster://, redis+sentinel:// (or rediss+, valkey+, valkeys+)"
        )
    kind: Kind = "cluster" if kind_text == "cluster" else "sentinel"
    rest, _, fragment = rest.partition("#")
    if fragment:
        raise ValueError("a store URL has no #fragment")
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    if not hostlist:
        raise ValueError("name at least one host:port")
    hosts = tuple(_host(item, _DEFAULT_PORT[kind]) for item in hostlist.split(","))
    parts = [unquote(part) for part in path.split("/")] if slash and path else []
    if parts and parts[-1] == "":
        parts.pop()  # a trailing slash
    service = ""
    if kind == "sentinel":
        if not parts or not parts[0]:
            raise ValueError("name the Sentinel service: redis+sentinel://host:port/<service>")
        service = parts.pop(0)
    if len(parts) > 1:
        raise ValueError(f"the path must be {'/<service>' if service else ''}[/<db>]")
    db_text = parts[0] if parts else "0"
    if not (db_text.isdigit() and db_text.isascii()):
        raise ValueError(f"the database must be a number, not {db_text!r}")
    db = int(db_text)
    if kind == "cluster" and db != 0:
        raise ValueError("Redis Cluster has database 0 only")
    return HostsURL(
        kind=kind,
        tls=base == "rediss",
        userinfo=userinfo + at,
        hosts=hosts,
        service=service,
        db=db,
        query=query,
    )


def single_node_url(parsed: HostsURL, host: str, port: int) -> str:
    """The ``redis://`` (or ``rediss://``) URL of one data node, with the URL's credentials,
    database and options."""
    shown = f"[{host}]" if ":" in host else host
    query = f"?{parsed.query}" if parsed.query else ""
    scheme = "rediss" if parsed.tls else "redis"
    return f"{scheme}://{parsed.userinfo}{shown}:{port}/{parsed.db}{query}"
