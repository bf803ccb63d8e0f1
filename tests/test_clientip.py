"""Client address resolution: forwarding headers only from trusted proxies."""

from __future__ import annotations

import pytest

from asgi_armor.clientip import ClientIP
from asgi_armor.errors import ConfigError


def scope(peer: str | None, *headers: tuple[str, str]) -> dict[str, object]:
    return {
        "type": "http",
        "client": None if peer is None else (peer, 1234),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
    }


def test_peer_by_default_and_spoofed_forwarding_ignored() -> None:
    resolve = ClientIP()
    assert resolve(scope("203.0.113.7")) == "203.0.113.7"
    spoofed = scope("203.0.113.7", ("X-Forwarded-For", "1.1.1.1"), ("Forwarded", "for=2.2.2.2"))
    assert resolve(spoofed) == "203.0.113.7"


def test_untrusted_peer_cannot_spoof_even_with_proxies_configured() -> None:
    resolve = ClientIP(["10.0.0.0/8"])
    assert resolve(scope("203.0.113.7", ("X-Forwarded-For", "1.1.1.1"))) == "203.0.113.7"


def test_rightmost_untrusted_address_from_trusted_proxy() -> None:
    resolve = ClientIP(["10.0.0.0/8", "192.168.1.1"])
    request = scope("10.0.0.5", ("X-Forwarded-For", "6.6.6.6, 198.51.100.4, 192.168.1.1"))
    # 6.6.6.6 was written by the client itself; 198.51.100.4 is who connected to our proxy.
    assert resolve(request) == "198.51.100.4"


def test_several_xff_headers_form_one_chain() -> None:
    resolve = ClientIP(["10.0.0.0/8"])
    request = scope("10.0.0.5", ("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", "198.51.100.4"))
    assert resolve(request) == "198.51.100.4"


def test_only_the_configured_header_is_read() -> None:
    # A proxy that appends X-Forwarded-For passes a client's own Forwarded through.
    request = scope(
        "10.0.0.1", ("Forwarded", "for=198.51.100.99"), ("X-Forwarded-For", "203.0.113.7")
    )
    assert ClientIP(["10.0.0.0/8"])(request) == "203.0.113.7"
    assert ClientIP(["10.0.0.0/8"], header="forwarded")(request) == "198.51.100.99"


def test_forwarded_header_handles_ports_and_ipv6() -> None:
    resolve = ClientIP(["127.0.0.1"], header="forwarded")
    request = scope(
        "127.0.0.1",
        ("Forwarded", 'for=6.6.6.6, for="[2001:db8::1]:4711";proto=https'),
        ("X-Forwarded-For", "9.9.9.9"),
    )
    assert resolve(request) == "2001:db8::1"
    assert resolve(scope("127.0.0.1", ("Forwarded", "for=192.0.2.60:8080"))) == "192.0.2.60"


def test_all_hops_trusted_gives_leftmost() -> None:
    resolve = ClientIP(["10.0.0.0/8"])
    assert resolve(scope("10.0.0.5", ("X-Forwarded-For", "10.1.1.1, 10.2.2.2"))) == "10.1.1.1"


def test_garbage_in_chain_stops_at_last_trusted_hop() -> None:
    resolve = ClientIP(["10.0.0.0/8"])
    request = scope("10.0.0.5", ("X-Forwarded-For", "1.2.3.4, not-an-ip"))
    assert resolve(request) == "10.0.0.5"


def test_trust_all_and_missing_client() -> None:
    resolve = ClientIP(["*"])
    assert resolve(scope("8.8.8.8", ("X-Forwarded-For", "1.2.3.4"))) == "1.2.3.4"
    assert ClientIP()(scope(None)) == "unknown"


def test_ipv4_mapped_ipv6_peer_is_normalised() -> None:
    resolve = ClientIP(["10.0.0.0/8"])
    assert resolve(scope("::ffff:10.0.0.1", ("X-Forwarded-For", "1.2.3.4"))) == "1.2.3.4"


def test_bad_proxy_entry_names_the_entry() -> None:
    with pytest.raises(ConfigError, match=r"trusted_proxies\[1\]: 'nope'"):
        ClientIP(["10.0.0.1", "nope"])
