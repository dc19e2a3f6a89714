"""hpcbridge never blocks the event loop it serves, also while its first link is still being opened."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from hpcbridge.client import Platform, PlatformUnavailable
from hpcbridge.config import PlatformConfig
from hpcbridge.links import Link, LinkError


def slow_refusal(_cfg: PlatformConfig) -> Link:
    time.sleep(1.5)  # an SSH handshake to a host that does not answer, say
    raise LinkError("no route to the login node")


def test_a_request_during_the_first_connect_does_not_freeze_the_event_loop(caplog: pytest.LogCaptureFixture) -> None:
    platform = Platform(PlatformConfig(name="slow", transport="local", connect_timeout=2.0),
                        opener=slow_refusal).start()
    gaps: list[float] = []

    async def ticker(stop: asyncio.Event) -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.02)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async def main() -> str:
        stop = asyncio.Event()
        tick = asyncio.ensure_future(ticker(stop))
        try:
            async for _ in platform.stream("GET", "/health"):
                pass
            outcome = "answered"
        except PlatformUnavailable as exc:
            outcome = exc.code
        stop.set()
        await tick
        return outcome

    caplog.set_level(logging.WARNING, logger="asyncio")
    loop = asyncio.new_event_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = 0.1
    try:
        assert loop.run_until_complete(main()) == "platform_unavailable"
    finally:
        loop.close()
        platform.stop()
    assert gaps, "the event loop never ran while the request waited"
    assert max(gaps) < 0.5, f"the event loop stood still for {max(gaps):.2f}s"
    assert not [r for r in caplog.records if "Executing" in r.getMessage()], "slow callback on the event loop"
    assert threading.active_count() < 50
