"""Client address resolution: forwarding headers only from trusted proxies."""

from __future__ import annotations

import logging

import pytest

from asgi_armor.clientip import ClientIP, ipv6_group
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


def test_trust_all_is_one_appending_hop_so_the_client_is_the_rightmost_entry() -> None:
    # Behind one proxy that appends the peer it saw, everything left of that entry is
    # what the client wrote itself: it must never pick the bucket.
    resolve = ClientIP(["*"])
    request = scope("10.9.9.9", ("X-Forwarded-For", "6.6.6.6, 1.1.1.1, 198.51.100.4"))
    assert resolve(request) == "198.51.100.4"
    forwarded = ClientIP(["*"], header="forwarded")
    request = scope("10.9.9.9", ("Forwarded", "for=6.6.6.6, for=198.51.100.4;proto=https"))
    assert forwarded(request) == "198.51.100.4"


def test_trust_all_with_listed_proxies_walks_over_the_listed_hops_only() -> None:
    resolve = ClientIP(["*", "10.0.0.0/8"])
    request = scope("192.0.2.1", ("X-Forwarded-For", "6.6.6.6, 198.51.100.4, 10.0.0.9"))
    assert resolve(request) == "198.51.100.4"


def test_trust_all_without_forwarding_header_or_with_garbage_is_the_peer() -> None:
    resolve = ClientIP(["*"])
    assert resolve(scope("192.0.2.1")) == "192.0.2.1"
    assert resolve(scope("192.0.2.1", ("X-Forwarded-For", "1.2.3.4, junk"))) == "192.0.2.1"


def test_unix_socket_peer_is_a_proxy_only_when_listed() -> None:
    forwarded = ("X-Forwarded-For", "6.6.6.6, 198.51.100.4")
    assert ClientIP(["unix"])(scope(None, forwarded)) == "198.51.100.4"
    assert ClientIP(["*"])(scope(None, forwarded)) == "198.51.100.4"
    chain = ("X-Forwarded-For", "198.51.100.4, 10.1.1.1")
    assert ClientIP(["unix", "10.0.0.0/8"])(scope(None, chain)) == "198.51.100.4"
    # A listed unix socket still does not trust TCP peers, and no header means no address.
    assert ClientIP(["unix"])(scope("192.0.2.1", forwarded)) == "192.0.2.1"
    assert ClientIP(["unix"])(scope(None)) == "unknown"
    assert ClientIP(["10.0.0.0/8"])(scope(None, forwarded)) == "unknown"


def test_no_peer_address_warns_once_per_resolver(caplog: pytest.LogCaptureFixture) -> None:
    resolve = ClientIP()
    with caplog.at_level(logging.WARNING, logger="asgi_armor"):
        assert [resolve(scope(None)) for _ in range(3)] == ["unknown"] * 3
    warnings = [r for r in caplog.records if "without a peer address" in r.getMessage()]
    assert len(warnings) == 1
    assert '"unix"' in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="asgi_armor"):
        ClientIP(["unix"])(scope(None))
        resolve(scope(None))
    assert caplog.records == []


@pytest.mark.parametrize("entry", ["unix:/run/app.sock", "UNIX ", "**", ""])
def test_bad_special_entries_name_the_entry(entry: str) -> None:
    with pytest.raises(ConfigError, match=r"trusted_proxies\[1\]"):
        ClientIP(["unix", entry])


def test_ipv4_mapped_peer_counts_as_ipv4_even_untrusted() -> None:
    # A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d.
    assert ClientIP()(scope("::ffff:203.0.113.7")) == "203.0.113.7"
    assert ClientIP(["10.0.0.0/8"])(scope("::FFFF:203.0.113.7")) == "203.0.113.7"
    assert ClientIP()(scope("2001:db8::1")) == "2001:db8::1"


def test_repr_lists_special_entries() -> None:
    assert repr(ClientIP(["unix", "*", "10.0.0.0/8"])) == (
        "ClientIP(trusted_proxies=['*', 'unix', '10.0.0.0/8'])"
    )


@pytest.mark.parametrize(
    ("address", "prefix", "group"),
    [
        ("2001:db8:1:2:3:4:5:6", 64, "2001:db8:1:2::/64"),
        ("2001:DB8:1:2::9", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:3:4:5:6", 48, "2001:db8:1::/48"),
        ("2001:db8:0:0:0:0:0:6", 128, "2001:db8::6"),
        ("fe80::1%eth0", 64, "fe80::/64"),
        ("::ffff:192.0.2.1", 64, "192.0.2.1"),
        ("::ffff:c000:201", 128, "192.0.2.1"),
        ("unknown", 64, "unknown"),
        ("not:an:address", 64, "not:an:address"),
    ],
)
def test_ipv6_group(address: str, prefix: int, group: str) -> None:
    assert ipv6_group(address, prefix) == group
