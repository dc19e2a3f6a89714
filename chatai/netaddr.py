"""Who the client is: the direct peer, or the address a trusted reverse proxy forwarded.

Behind the documented nginx every request comes from 127.0.0.1, so the peer alone says
nothing; but ``X-Forwarded-For`` is just a header any client can send. It is believed only
when the direct peer is in ``TRUSTED_PROXIES`` (addresses or networks), and then read from
the right, skipping trusted proxies: the first address a trusted proxy did not add itself is
the client (entries further left were written by the client and prove nothing).

``client_address`` always answers (the peer when nothing better is known): right for
throttling. ``known_client_address`` answers only when the address can be trusted, and None
for a forwarded request whose client cannot be established: right for access decisions,
which must fail closed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from functools import lru_cache

from django.conf import settings

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Headers that say a proxy stands between the client and us (WSGI/ASGI META names).
FORWARDING_HEADERS = ("HTTP_X_FORWARDED_FOR", "HTTP_X_REAL_IP", "HTTP_FORWARDED", "HTTP_X_FORWARDED_PROTO",
                      "HTTP_X_FORWARDED_HOST")
LOOPBACK = ("127.0.0.1", "::1")


def parse_networks(values: tuple[str, ...]) -> tuple[Network, ...]:
    """Parse addresses or networks ("10.0.0.0/8", "::1"); ValueError names a bad one."""
    parsed = []
    for value in values:
        try:
            parsed.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or network") from None
    return tuple(parsed)


networks = lru_cache(maxsize=32)(parse_networks)  # the settings' lists, parsed once per process


def parse_ip(text: str) -> str | None:
    """The address in canonical form, or None if ``text`` is not one (ports and brackets removed)."""
    text = text.strip().strip('"')
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1:text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def in_networks(address: str | None, values: Iterable[str]) -> bool:
    if not address:
        return False
    ip = ipaddress.ip_address(address)
    return any(ip in net for net in networks(tuple(values)))


def is_forwarded(meta: Mapping[str, str]) -> bool:
    """Whether the request came through a proxy (it sent any forwarding header)."""
    return any(meta.get(name) for name in FORWARDING_HEADERS)


def _trusted() -> tuple[str, ...]:
    return tuple(getattr(settings, "TRUSTED_PROXIES", ()) or ())


def forwarded_client(meta: Mapping[str, str], trusted: Iterable[str] | None = None) -> str | None:
    """The client a trusted proxy named in X-Forwarded-For, or None (peer not trusted, no or bad header)."""
    trusted = tuple(_trusted() if trusted is None else trusted)
    peer = parse_ip(meta.get("REMOTE_ADDR", ""))
    if not in_networks(peer, trusted):
        return None
    hops = [parse_ip(part) for part in meta.get("HTTP_X_FORWARDED_FOR", "").split(",") if part.strip()]
    if not hops or None in hops:
        return None  # a garbled list: nothing in it can be relied on
    for hop in reversed(hops):
        if not in_networks(hop, trusted):
            return hop
    return hops[0]  # every hop is a trusted proxy: the first of them made the request


def client_address(meta: Mapping[str, str], trusted: Iterable[str] | None = None) -> str:
    """The client's address as well as it is known: the forwarded one from a trusted proxy, else the peer."""
    return forwarded_client(meta, trusted) or parse_ip(meta.get("REMOTE_ADDR", "")) or ""


def known_client_address(meta: Mapping[str, str], trusted: Iterable[str] | None = None) -> str | None:
    """The client's address when it can be trusted; None for a forwarded request whose client is
    unknown (the peer is not a trusted proxy, or the proxy did not say)."""
    if is_forwarded(meta):
        return forwarded_client(meta, trusted)
    return parse_ip(meta.get("REMOTE_ADDR", ""))
