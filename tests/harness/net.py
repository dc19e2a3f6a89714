"""Waiting for a freshly started server to answer."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable


def wait_http(url: str, timeout: float, what: str, why: Callable[[], str] | None = None) -> bytes:
    """GET ``url`` until it answers 2xx; its body. Raises with ``why()`` (a log tail, say) on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback test servers
                return bytes(resp.read())
        except OSError:
            if time.monotonic() > deadline:
                detail = f":\n{why()}" if why else ""
                raise RuntimeError(f"{what} did not answer at {url} within {timeout:.0f}s{detail}") from None
            time.sleep(0.1)
