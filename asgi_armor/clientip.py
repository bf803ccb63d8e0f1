"""The client's address, trusting forwarding headers only from configured proxies.

By default the address is the TCP peer (``scope["client"]``): ``X-Forwarded-For`` and
``Forwarded`` are written by the client itself unless a proxy you run overwrites them, so
trusting them by default would let anyone pick their own rate-limit key. When the peer is a
trusted proxy, the client is the right-most address in the forwarding chain that is not
itself a listed proxy (everything left of it may be forged).

Rate-limit keys group IPv6 clients by network (``ipv6_group``): one host usually holds a
whole /64, so per-address buckets would give it 2**64 of them.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import socket
from collections.abc import Iterable
from typing import Literal

from asgi_armor._asgi import Scope
from asgi_armor.errors import ConfigError

__all__ = ["UNKNOWN_CLIENT", "ClientIP", "check_ipv6_prefix", "ipv6_group"]

logger = logging.getLogger("asgi_armor")

#: The address used when the server gives none (e.g. a unix socket).
UNKNOWN_CLIENT = "unknown"
# The trusted_proxies entries for any immediate peer, and for a peer without an address.
_TRUST_ANY = "*"
_TRUST_UNIX = "unix"

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
# Distinct IPv6 addresses whose group is remembered; a flood of new ones only evicts.
_GROUP_CACHE = 4096
_MAPPED = bytes(10) + b"\xff\xff"  # the first 12 bytes of ::ffff:a.b.c.d


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


def check_ipv6_prefix(prefix: int) -> int:
    """``prefix`` if it is a valid IPv6 prefix length (1..128).

    Raises:
        ConfigError: naming ``ipv6_prefix``.
    """
    if type(prefix) is not int or not 1 <= prefix <= 128:  # bool is an int, and no length
        raise ConfigError(f"ipv6_prefix: {prefix!r} is not a prefix length from 1 to 128")
    return prefix


@functools.lru_cache(maxsize=_GROUP_CACHE)
def ipv6_group(address: str, prefix: int = 64) -> str:
    """The network ``address`` is counted in: its ``/prefix`` for IPv6, itself otherwise.

    An IPv4-mapped address (``::ffff:192.0.2.1``) is the IPv4 address it maps; text that
    is not an IPv6 address is returned unchanged. Call it only when ``":" in address``:
    IPv4 addresses then cost nothing.

    Args:
        address: a client address, as ``ClientIP`` returns it.
        prefix: the prefix length, 1..128 (see ``check_ipv6_prefix``).
    """
    try:
        # inet_pton/ntop: a tenth of the time ipaddress takes for the same work.
        packed = socket.inet_pton(socket.AF_INET6, address.partition("%")[0])
    except (OSError, ValueError):
        return address
    if packed[:12] == _MAPPED:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    host_bits = 128 - prefix
    network = int.from_bytes(packed) >> host_bits << host_bits
    text = socket.inet_ntop(socket.AF_INET6, network.to_bytes(16))
    return text if prefix == 128 else f"{text}/{prefix}"


class ClientIP:
    """Resolve the client address of a request.

    Args:
        trusted_proxies: addresses or CIDR networks of your own proxies (``"10.0.0.0/8"``);
            ``"*"`` to trust any immediate peer as one proxy that appended one hop (the
            client is then the right-most forwarded entry; list longer chains by address);
            ``"unix"`` to trust a peer without an address (``uvicorn --uds``).
        header: the forwarding header your proxies write: ``"x-forwarded-for"`` (nginx,
            load balancers, CDNs) or ``"forwarded"`` (RFC 7239). Only that one is read:
            most proxies append to one and pass the other through untouched, so reading
            both would let a client write its own address into the one left alone.

    Raises:
        ConfigError: an entry is not an address, a network, ``"*"`` or ``"unix"``, or
            ``header`` is unknown.
    """

    __slots__ = ("_header", "_networks", "_trust_all", "_trust_unix", "_warned")

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
        self._trust_all = self._trust_unix = self._warned = False
        for index, entry in enumerate(trusted_proxies):
            if entry == _TRUST_ANY:
                self._trust_all = True
                continue
            if entry == _TRUST_UNIX:
                self._trust_unix = True
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except (TypeError, ValueError):
                raise ConfigError(
                    f"trusted_proxies[{index}]: {entry!r} is not an IP address or network, "
                    f"{_TRUST_ANY!r} or {_TRUST_UNIX!r}"
                ) from None
        self._networks = tuple(networks)

    @property
    def enabled(self) -> bool:
        """Whether any proxy is trusted (otherwise the peer address is always used)."""
        return self._trust_all or self._trust_unix or bool(self._networks)

    def _listed(self, address: _Address | None) -> bool:
        return address is not None and any(address in network for network in self._networks)

    def _no_peer(self) -> str:
        if not self._warned:
            self._warned = True
            logger.warning(
                "requests arrive without a peer address (a unix socket?): every client "
                'counts as one, "%s"; if a proxy sits in front, add "%s" to '
                "trusted_proxies so that its forwarding header names the client",
                UNKNOWN_CLIENT,
                _TRUST_UNIX,
            )
        return UNKNOWN_CLIENT

    def __call__(self, scope: Scope) -> str:
        """The client address for ``scope``, as a normalised string."""
        client = scope.get("client")
        if client and client[0]:
            peer: str = client[0]
            if ":" in peer and peer[:7].lower() == "::ffff:":
                # A dual-stack socket reports IPv4 clients as IPv4-mapped IPv6.
                mapped = _parse_node(peer)
                peer = peer if mapped is None else str(mapped)
            if not self.enabled or not (self._trust_all or self._listed(_parse_node(peer))):
                return peer
        elif self._trust_unix or self._trust_all:
            peer = UNKNOWN_CLIENT
        else:
            return self._no_peer()
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
            # "*" vouches for the peer only: the hop it appended is the client unless
            # that hop is itself a listed proxy.
            if not self._listed(address):
                break
        return client_ip

    def __repr__(self) -> str:
        names = [_TRUST_ANY] if self._trust_all else []
        names += [_TRUST_UNIX] if self._trust_unix else []
        return f"ClientIP(trusted_proxies={names + [str(n) for n in self._networks]!r})"
