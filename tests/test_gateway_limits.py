"""The limiter's decisions with a swappable clock (no sleeping), in process and on the real Redis."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from django.core.cache.backends.locmem import LocMemCache
from django.core.cache.backends.redis import RedisCache

from gateway.limits import LEASE, RENEW_EVERY, Limiter, Limits

pytestmark = pytest.mark.parametrize("backend", ["local", pytest.param("redis", marks=pytest.mark.redis)])


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
        assert (await limiter.acquire("u", limits, "s1")).allowed
        assert not (await limiter.acquire("u", limits, "s2")).allowed
        await limiter.release("u", limits, 0, "s1")
        assert (await limiter.acquire("u", limits, "s3")).allowed

    asyncio.run(go())


def test_a_running_stream_keeps_its_slot_for_hours(backend: str) -> None:
    limiter, clock = fresh(backend)
    limits = Limits(parallel_streams=1)

    async def go() -> None:
        assert (await limiter.acquire("u", limits, "long")).allowed
        for _ in range(int(3 * 3600 / RENEW_EVERY)):  # three hours of a running stream, renewed as it runs
            clock.now += RENEW_EVERY
            limiter.renew_sync()
        assert not (await limiter.acquire("u", limits, "other")).allowed
        await limiter.release("u", limits, 0, "long")
        assert (await limiter.acquire("u", limits, "other")).allowed

    asyncio.run(go())


def test_a_stream_nobody_renews_frees_its_slot_after_its_lease(backend: str) -> None:
    # Its worker died: nothing releases or renews it.
    limiter, clock = fresh(backend)
    limits = Limits(parallel_streams=1)

    async def go() -> None:
        assert (await limiter.acquire("u", limits, "orphan")).allowed
        limiter.held.clear()  # the worker that held it is gone
        clock.now += LEASE - 1
        limiter.renew_sync()
        assert not (await limiter.acquire("u", limits, "next")).allowed
        clock.now += 2
        assert (await limiter.acquire("u", limits, "next")).allowed

    asyncio.run(go())


def test_late_or_repeated_releases_never_free_another_streams_slot(backend: str) -> None:
    limiter, clock = fresh(backend)
    limits = Limits(parallel_streams=1)

    async def go() -> None:
        assert (await limiter.acquire("u", limits, "a")).allowed
        await limiter.release("u", limits, 0, "a")
        await limiter.release("u", limits, 0, "a")  # released twice: the count must not go below zero
        assert (await limiter.acquire("u", limits, "b")).allowed
        assert not (await limiter.acquire("u", limits, "c")).allowed
        await limiter.release("u", limits, 0, "a")  # a late release of a finished stream
        assert not (await limiter.acquire("u", limits, "c")).allowed  # b still holds the one slot

    asyncio.run(go())


def test_failed_authentications_block_an_address_for_the_rest_of_the_minute(backend: str) -> None:
    limiter, clock = fresh(backend)
    clock.now += 20
    assert [limiter.auth_failed_sync("10.0.0.1", 3) for _ in range(4)] == [0, 0, 0, 40]
    assert limiter.auth_blocked_sync("10.0.0.1", 3) == 40
    assert limiter.auth_blocked_sync("10.0.0.2", 3) == 0  # another address is not affected
    clock.now += 40
    assert limiter.auth_blocked_sync("10.0.0.1", 3) == 0


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
