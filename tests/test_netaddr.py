"""chatai.netaddr: which address is the client's (pure logic; the nginx test runs it for real)."""

from __future__ import annotations

import pytest

from chatai.netaddr import client_address, known_client_address, networks

PROXY = ["127.0.0.1", "10.0.0.0/8"]


def meta(peer: str, **headers: str) -> dict[str, str]:
    return {"REMOTE_ADDR": peer, **{f"HTTP_{k.upper()}": v for k, v in headers.items()}}


def test_a_direct_request_is_its_peer() -> None:
    assert client_address(meta("192.0.2.7"), PROXY) == "192.0.2.7"
    assert known_client_address(meta("192.0.2.7"), PROXY) == "192.0.2.7"


def test_a_forwarded_address_is_believed_only_from_a_trusted_proxy() -> None:
    assert client_address(meta("127.0.0.1", x_forwarded_for="192.0.2.7"), PROXY) == "192.0.2.7"
    assert client_address(meta("192.0.2.9", x_forwarded_for="127.0.0.1"), PROXY) == "192.0.2.9"
    assert known_client_address(meta("192.0.2.9", x_forwarded_for="127.0.0.1"), PROXY) is None


def test_the_list_is_read_from_the_right_skipping_trusted_proxies() -> None:
    forged = meta("127.0.0.1", x_forwarded_for="127.0.0.1, 198.51.100.4, 10.1.2.3")
    assert client_address(forged, PROXY) == "198.51.100.4"  # the client's own entries on the left prove nothing


def test_a_forwarded_request_without_a_usable_address_is_unknown() -> None:
    assert known_client_address(meta("127.0.0.1", x_forwarded_proto="https"), PROXY) is None
    assert known_client_address(meta("127.0.0.1", x_forwarded_for="nonsense, 192.0.2.7"), PROXY) is None
    assert client_address(meta("127.0.0.1", x_forwarded_for="nonsense"), PROXY) == "127.0.0.1"


def test_ports_and_ipv6_brackets_are_understood() -> None:
    assert client_address(meta("::1", x_forwarded_for="[2001:db8::1]:4711"), ["::1"]) == "2001:db8::1"
    assert client_address(meta("127.0.0.1", x_forwarded_for="192.0.2.7:5000"), PROXY) == "192.0.2.7"


def test_a_bad_network_is_named() -> None:
    with pytest.raises(ValueError, match="'10.0.0.300'"):
        networks(("10.0.0.300",))
