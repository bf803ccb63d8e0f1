"""The client's address, trusting forwarding headers only from configured proxies.

By default the address is the TCP peer (``scope["client"]``): ``X-Forwarded-For`` and
``Forwarded`` are written by the client itself unless a proxy you run overwrites them, so
trusting them by default would let anyone pick their own rate-limit key. When the peer is a
trusted proxy, the client is the right-most address in the forwarding chain that is not
itself a trusted proxy (everything left of it may be forged).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Literal

from asgi_armor._asgi import Scope
from asgi_armor.errors import ConfigError

__all__ = ["UNKNOWN_CLIENT", "ClientIP"]

#: The address used when the server gives none (e.g. a unix socket).
UNKNOWN_CLIENT = "unknown"

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _parse_node(node: str) -> _Address | None:
    """An address from an X-Forwarded-For entry or a Forwarded ``for=`` value, else None."""
    node = node.strip().strip('"')
    if node.startswith("["):  # "[2001:db8::1]:4711"
        node = node[1 : node.find("]")] if "]" in node else ""
    elif node.count(":") == 1:  # "192.0.2.1:8080"
        node = node.partition(":")[0]
    try:
        address = ipaddress.ip_address(node)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _forwarded_for(value: str) -> list[str]:
    """The ``for=`` values of an RFC 7239 ``Forwarded`` header, in order."""
    nodes = []
    for element in value.split(","):
        for pair in element.split(";"):
            name, _, node = pair.partition("=")
            if name.strip().lower() == "for":
                nodes.append(node)
    return nodes


class ClientIP:
    """Resolve the client address of a request.

    Args:
        trusted_proxies: addresses or CIDR networks of your own proxies (``"10.0.0.0/8"``),
            or ``"*"`` to trust every peer (only when the app is reachable solely through them).
        header: the forwarding header your proxies write: ``"x-forwarded-for"`` (nginx,
            load balancers, CDNs) or ``"forwarded"`` (RFC 7239). Only that one is read:
            most proxies append to one and pass the other through untouched, so reading
            both would let a client write its own address into the one left alone.

    Raises:
        ConfigError: an entry is not an address or network, or ``header`` is unknown.
    """

    __slots__ = ("_header", "_networks", "_trust_all")

    def __init__(
        self,
        trusted_proxies: Iterable[str] = (),
        *,
        header: Literal["x-forwarded-for", "forwarded"] = "x-forwarded-for",
    ) -> None:
        if header not in ("x-forwarded-for", "forwarded"):
            raise ConfigError(
                f"forwarded_header: {header!r} is not 'x-forwarded-for' or 'forwarded'"
            )
        self._header = header.encode()
        networks: list[_Network] = []
        self._trust_all = False
        for index, entry in enumerate(trusted_proxies):
            if entry == "*":
                self._trust_all = True
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                raise ConfigError(
                    f"trusted_proxies[{index}]: {entry!r} is not an IP address or network"
                ) from None
        self._networks = tuple(networks)

    @property
    def enabled(self) -> bool:
        """Whether any proxy is trusted (otherwise the peer address is always used)."""
        return self._trust_all or bool(self._networks)

    def _trusted(self, address: _Address | None) -> bool:
        if address is None:
            return False
        return self._trust_all or any(address in network for network in self._networks)

    def __call__(self, scope: Scope) -> str:
        """The client address for ``scope``, as a normalised string."""
        client = scope.get("client")
        peer = client[0] if client else UNKNOWN_CLIENT
        if not self.enabled or not self._trusted(_parse_node(peer)):
            return peer
        chain: list[str] = []
        for key, value in scope["headers"]:
            if key == self._header:
                text = value.decode("latin-1")
                chain.extend(_forwarded_for(text) if key == b"forwarded" else text.split(","))
        client_ip = peer
        for node in reversed(chain):
            address = _parse_node(node)
            if address is None:
                # Garbage where a proxy should have written an address: stop at the
                # last hop we can vouch for rather than key on attacker text.
                break
            client_ip = str(address)
            if not self._trusted(address):
                break
        return client_ip

    def __repr__(self) -> str:
        names = ["*"] if self._trust_all else []
        return f"ClientIP(trusted_proxies={names + [str(n) for n in self._networks]!r})"
