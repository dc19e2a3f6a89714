"""The limiter's decisions with a swappable clock (no sleeping), in process and on the real Redis."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from django.core.cache.backends.locmem import LocMemCache
from django.core.cache.backends.redis import RedisCache

from gateway.limits import Limiter, Limits

pytestmark = pytest.mark.parametrize("backend", ["local", "redis"])


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def fresh(backend: str) -> tuple[Limiter, Clock]:
    clock = Clock(1_800_000_000.0)  # the start of a minute
    if backend == "local":
        return Limiter(LocMemCache("limits-test", {}), clock=clock), clock
    # A fresh key prefix per test: the counters of earlier runs cannot interfere.
    cache = RedisCache("redis://127.0.0.1:6379/14", {"KEY_PREFIX": uuid.uuid4().hex})
    return Limiter(cache, clock=clock), clock


def test_requests_per_minute_reset_with_the_next_window(backend: str) -> None:
    limiter, clock = fresh(backend)
    limits = Limits(requests_per_minute=2)

    async def go() -> list[bool]:
        out = [(await limiter.acquire("k1", limits)).allowed for _ in range(3)]
        clock.now += 60
        out.append((await limiter.acquire("k1", limits)).allowed)
        return out

    assert asyncio.run(go()) == [True, True, False, True]


def test_a_refused_request_is_not_counted_and_says_when_to_retry(backend: str) -> None:
    limiter, clock = fresh(backend)
    limits = Limits(requests_per_minute=1, requests_per_hour=10)

    async def go() -> None:
        assert (await limiter.acquire("k", limits)).allowed
        clock.now += 45
        refused = await limiter.acquire("k", limits)
        assert not refused.allowed and refused.retry_after == 15
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        clock.now += 15
        ok = await limiter.acquire("k", limits)
        assert ok.allowed
        # The hour window counted 2 requests, not 3: the refused one was undone.
        assert limiter.cache.get(limiter._key("k", "req", "hour", clock.now)) == 2

    asyncio.run(go())


def test_parallel_streams_are_released(backend: str) -> None:
    limiter, _ = fresh(backend)
    limits = Limits(parallel_streams=1)

    async def go() -> None:
        assert (await limiter.acquire("u", limits)).allowed
        assert not (await limiter.acquire("u", limits)).allowed
        await limiter.release("u", limits, 0)
        assert (await limiter.acquire("u", limits)).allowed

    asyncio.run(go())


def test_tokens_per_minute_refuse_once_spent(backend: str) -> None:
    limiter, clock = fresh(backend)
    limits = Limits(tokens_per_minute=100)

    async def go() -> None:
        assert (await limiter.acquire("k", limits)).allowed
        await limiter.release("k", limits, 100)
        refused = await limiter.acquire("k", limits)
        assert not refused.allowed and "tokens per minute" in refused.reason
        clock.now += 60
        assert (await limiter.acquire("k", limits)).allowed

    asyncio.run(go())


def test_subjects_do_not_share_counters(backend: str) -> None:
    limiter, _ = fresh(backend)
    limits = Limits(requests_per_minute=1)

    async def go() -> list[bool]:
        return [(await limiter.acquire(s, limits)).allowed for s in ("a", "b", "a")]

    assert asyncio.run(go()) == [True, True, False]
