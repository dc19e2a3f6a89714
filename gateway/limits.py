"""Rate limits counted atomically in the Django cache (Redis shares them between workers).

Fixed windows per minute/hour/day for requests and tokens, and parallel streams held as
leases: one entry per running stream with an expiry, renewed while the stream runs, so a
count can neither go negative nor forget a running stream (a crashed worker's leases simply
expire). The clock is swappable (``Limiter(clock=...)``) so decisions are tested without
sleeping.

Whose limits: the user's (their own policy, else the most generous of their groups', else
settings.GATEWAY_DEFAULT_LIMITS) are counted once per user, across all their keys and the
chat page; a key's own policy is an extra limit on top, counted per key.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from typing import Any

from django.conf import settings
from django.core.cache import caches
from django.core.cache.backends.locmem import LocMemCache

from common.expiring import Expiring
from gateway.threads import in_thread

log = logging.getLogger("gateway.limits")
WINDOWS = {"minute": 60, "hour": 3600, "day": 86400}
LEASE = 120.0  # seconds a stream's parallel slot lives unless renewed
RENEW_EVERY = 30.0  # how often this worker renews the leases of its running streams


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int | None = None
    requests_per_hour: int | None = None
    requests_per_day: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    parallel_streams: int | None = None

    @classmethod
    def from_mapping(cls, data: Any) -> Limits:
        get = data.get if isinstance(data, dict) else (lambda name: getattr(data, name, None))
        return cls(**{f.name: get(f.name) for f in fields(cls)})


@dataclass
class Decision:
    allowed: bool
    headers: dict[str, str] = field(default_factory=dict)
    retry_after: float = 0.0
    reason: str = ""
    subject: str = ""  # whose limit refused


_policies: Expiring[str, list[Any]] = Expiring(lambda: settings.GATEWAY_POLICY_TTL)
_groups: Expiring[int, frozenset[int]] = Expiring(lambda: settings.GATEWAY_POLICY_TTL, max_size=50_000)


def policies() -> list[Any]:
    """Every rate-limit policy (a short table), re-read at most every GATEWAY_POLICY_TTL seconds. Sync."""
    from gateway.models import RateLimitPolicy

    return _policies.get_or_load("", lambda: list(RateLimitPolicy.objects.all()))


def group_ids_of(user: Any) -> frozenset[int]:
    """The user's groups, re-read at most every GATEWAY_POLICY_TTL seconds. Sync."""
    return _groups.get_or_load(user.pk, lambda: frozenset(user.groups.values_list("pk", flat=True)))


def key_limits_for(key: Any) -> Limits | None:
    """The key's own policy, an extra limit on top of its user's; None without one. Sync."""
    if key is not None:
        for policy in policies():
            if policy.api_key_id == key.pk:
                return Limits.from_mapping(policy)
    return None


def user_limits_for(user: Any, group_ids: frozenset[int]) -> Limits:
    """The user's limits, for all their keys and the chat page together: the user's policy, else
    the most generous of the user's groups', else the defaults. Sync (it may re-read the policies)."""
    rules = policies()
    for policy in rules:
        if policy.user_id == user.pk and policy.api_key_id is None:
            return Limits.from_mapping(policy)
    group_policies = [Limits.from_mapping(p) for p in rules
                      if p.group_id in group_ids and p.user_id is None and p.api_key_id is None]
    if group_policies:
        def generous(name: str) -> int | None:
            values = [getattr(p, name) for p in group_policies]
            return None if any(v is None for v in values) else max(values)

        return Limits(**{f.name: generous(f.name) for f in fields(Limits)})
    return Limits.from_mapping(settings.GATEWAY_DEFAULT_LIMITS)


class Counters:
    """In-process counters with expiry: what the limiter needs of a cache, for one worker.

    Used instead of Django's LocMemCache (which pickles and validates every key) when the
    configured cache is local memory; with Redis, the Django cache is used so that all
    workers share the counts.
    """

    def __init__(self) -> None:
        self.data: dict[str, tuple[int, float]] = {}
        self.lock = threading.Lock()
        self.sweep_at = 0.0

    def _live(self, key: str, now: float) -> tuple[int, float] | None:
        item = self.data.get(key)
        return item if item is not None and item[1] > now else None

    def add(self, key: str, value: int, ttl: int) -> bool:
        now = time.monotonic()
        with self.lock:
            if now > self.sweep_at:  # drop expired windows now and then
                self.data = {k: v for k, v in self.data.items() if v[1] > now}
                self.sweep_at = now + 60
            if self._live(key, now) is not None:
                return False
            self.data[key] = (value, now + ttl)
            return True

    def incr(self, key: str, delta: int = 1) -> int:
        now = time.monotonic()
        with self.lock:
            item = self._live(key, now)
            if item is None:
                raise ValueError(f"Key '{key}' not found")
            self.data[key] = (item[0] + delta, item[1])
            return item[0] + delta

    def decr(self, key: str, delta: int = 1) -> int:
        return self.incr(key, -delta)

    def get(self, key: str, default: Any = None) -> Any:
        item = self._live(key, time.monotonic())
        return default if item is None else item[0]


class LocalLeases:
    """Parallel-stream leases of one worker, in process (the local-memory default)."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, float]] = {}  # key -> {lease id: expiry}
        self.lock = threading.Lock()

    def take(self, key: str, lease: str, limit: int, now: float) -> bool:
        with self.lock:
            held = {m: t for m, t in self.data.get(key, {}).items() if t > now}
            if len(held) >= limit:
                self.data[key] = held
                return False
            held[lease] = now + LEASE
            self.data[key] = held
            return True

    def renew(self, items: list[tuple[str, str]], now: float) -> None:
        with self.lock:
            for key, lease in items:
                held = self.data.get(key)
                if held is not None and lease in held:
                    held[lease] = now + LEASE
            # Forget subjects whose leases all ran out (their streams died with a worker).
            self.data = {k: v for k, v in self.data.items() if any(t > now for t in v.values())}

    def count(self, key: str, now: float) -> int:
        with self.lock:
            return sum(1 for t in self.data.get(key, {}).values() if t > now)

    def drop(self, key: str, lease: str) -> None:
        with self.lock:
            held = self.data.get(key)
            if held is not None:
                held.pop(lease, None)
                if not held:
                    del self.data[key]


class RedisLeases:
    """Leases in a Redis sorted set per subject (lease id scored by its expiry), taken atomically
    by a Lua script, so all workers share one count. Expiries use the limiter's clock (workers'
    clocks must agree, as for the rate windows); the set itself expires in real time when no
    stream renews it."""

    TAKE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""

    def __init__(self, cache: Any) -> None:
        self.cache = cache
        self.script: Any = None

    def _client(self, key: str) -> Any:
        return self.cache._cache.get_client(key, write=True)

    def take(self, key: str, lease: str, limit: int, now: float) -> bool:
        name = self.cache.make_and_validate_key(key)
        client = self._client(name)
        if self.script is None:
            self.script = client.register_script(self.TAKE)
        return bool(self.script(keys=[name], args=[now, limit, now + LEASE, lease, int(2 * LEASE)], client=client))

    def renew(self, items: list[tuple[str, str]], now: float) -> None:
        if not items:
            return
        names = [(self.cache.make_and_validate_key(key), lease) for key, lease in items]
        pipe = self._client(names[0][0]).pipeline(transaction=False)
        for name, lease in names:
            pipe.zadd(name, {lease: now + LEASE}, xx=True)
            pipe.expire(name, int(2 * LEASE))
        pipe.execute()

    def count(self, key: str, now: float) -> int:
        name = self.cache.make_and_validate_key(key)
        return int(self._client(name).zcount(name, f"({now}", "+inf"))

    def drop(self, key: str, lease: str) -> None:
        name = self.cache.make_and_validate_key(key)
        self._client(name).zrem(name, lease)


def leases_for(cache: Any) -> Any:
    """Redis leases for Django's Redis cache; otherwise this worker's own (per worker, like Counters)."""
    if hasattr(cache, "make_and_validate_key") and hasattr(getattr(cache, "_cache", None), "get_client"):
        return RedisLeases(cache)
    return LocalLeases()


Bucket = tuple[str, Limits]  # (subject, limits): one set of counters


class Limiter:
    """Counts in a Django cache (or, for local memory, in Counters). The counting is sync; the
    async methods run it inline in process and in one worker-thread hop for Redis."""

    def __init__(self, cache: Any, clock: Callable[[], float] = time.time) -> None:
        self.inline = isinstance(cache, (LocMemCache, Counters))
        self.cache: Any = Counters() if isinstance(cache, LocMemCache) else cache
        self.leases: Any = leases_for(self.cache)
        self.clock = clock
        self.held: set[tuple[str, str]] = set()  # this worker's running streams' leases
        self.held_lock = threading.Lock()
        self.renewer: asyncio.Task[None] | None = None

    def _run(self, fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        if self.inline:
            return _now(fn(*args))
        return in_thread(fn, *args)

    async def acquire(self, subject: str, limits: Limits, lease: str = "") -> Decision:
        """Count one request and take one parallel slot (``lease`` names it), or refuse without counting."""
        return (await self.acquire_all([(subject, limits)], lease))[0]

    async def acquire_all(self, buckets: list[Bucket], lease: str = "") -> tuple[Decision, list[Bucket]]:
        """Count the request in every bucket, in one hop; refused by any, it counts in none."""
        buckets = [b for b in buckets if b[1] != NO_LIMITS]
        if not buckets:
            return Decision(True), []
        result: tuple[Decision, list[Bucket]] = await self._run(self.acquire_all_sync, buckets, lease)
        if result[0].allowed and any(limits.parallel_streams is not None for _, limits in buckets):
            self._keep_renewing()
        return result

    async def refund(self, subject: str, limits: Limits, lease: str = "") -> None:
        """Take back an allowed request that another limit then refused."""
        if limits != NO_LIMITS:
            await self._run(self.refund_sync, subject, limits, lease)

    async def release(self, subject: str, limits: Limits, tokens: int, lease: str = "") -> None:
        """The request ended: free its parallel slot and count its tokens."""
        await self.release_all([(subject, limits)], tokens, lease)

    async def release_all(self, buckets: list[Bucket], tokens: int, lease: str = "") -> None:
        if any(limits.parallel_streams is not None or (tokens > 0 and (limits.tokens_per_minute is not None
                                                                       or limits.tokens_per_day is not None))
               for _, limits in buckets):
            await self._run(self.release_all_sync, buckets, tokens, lease)

    def _key(self, subject: str, what: str, window: str, now: float) -> str:
        return f"rl:{subject}:{what}:{window}:{int(now // WINDOWS[window])}"

    def _incr(self, key: str, by: int, ttl: int) -> int:
        self.cache.add(key, 0, ttl)
        try:
            return int(self.cache.incr(key, by))
        except ValueError:  # expired between add and incr
            self.cache.add(key, 0, ttl)
            return int(self.cache.incr(key, by))

    def acquire_all_sync(self, buckets: list[Bucket], lease: str) -> tuple[Decision, list[Bucket]]:
        taken: list[Bucket] = []
        headers: dict[str, str] = {}
        for subject, limits in buckets:
            decision = self.acquire_sync(subject, limits, lease)
            if not decision.allowed:
                for done in taken:
                    self.refund_sync(done[0], done[1], lease)
                decision.subject = subject
                return decision, []
            taken.append((subject, limits))
            headers = tighter(headers, decision.headers)
        return Decision(True, headers), taken

    def acquire_sync(self, subject: str, limits: Limits, lease: str = "") -> Decision:
        now = self.clock()
        headers: dict[str, str] = {}
        taken: list[str] = []
        for window, limit in (("minute", limits.requests_per_minute), ("hour", limits.requests_per_hour),
                              ("day", limits.requests_per_day)):
            if limit is None:
                continue
            key = self._key(subject, "req", window, now)
            count = self._incr(key, 1, WINDOWS[window] + 5)
            taken.append(key)
            reset = WINDOWS[window] - now % WINDOWS[window]
            if window == "minute" or "x-ratelimit-limit-requests" not in headers:
                headers.update({"x-ratelimit-limit-requests": str(limit),
                                "x-ratelimit-remaining-requests": str(max(0, limit - count)),
                                "x-ratelimit-reset-requests": f"{reset:.0f}s"})
            if count > limit:
                self._undo(taken)
                return Decision(False, headers, reset, f"{limit} requests per {window}")
        for window, limit in (("minute", limits.tokens_per_minute), ("day", limits.tokens_per_day)):
            if limit is None:
                continue
            used = int(self.cache.get(self._key(subject, "tok", window, now), 0))
            reset = WINDOWS[window] - now % WINDOWS[window]
            headers.update({"x-ratelimit-limit-tokens": str(limit),
                            "x-ratelimit-remaining-tokens": str(max(0, limit - used)),
                            "x-ratelimit-reset-tokens": f"{reset:.0f}s"})
            if used >= limit:
                self._undo(taken)
                return Decision(False, headers, reset, f"{limit} tokens per {window}")
        if limits.parallel_streams is not None:
            if not lease:
                raise ValueError("a parallel slot needs a lease id (one per request)")
            key = f"rl:{subject}:streams"
            if not self.leases.take(key, lease, limits.parallel_streams, now):
                self._undo(taken)
                return Decision(False, headers, 1.0, f"{limits.parallel_streams} parallel requests")
            with self.held_lock:
                self.held.add((key, lease))
        return Decision(True, headers)

    def peek_sync(self, subject: str, limits: Limits) -> dict[str, dict[str, Any]]:
        """What is used and left of each limit now, read without counting anything (for /api/me)."""
        now = self.clock()
        out: dict[str, dict[str, Any]] = {}
        for what, window, limit in (("requests", "minute", limits.requests_per_minute),
                                    ("requests", "hour", limits.requests_per_hour),
                                    ("requests", "day", limits.requests_per_day),
                                    ("tokens", "minute", limits.tokens_per_minute),
                                    ("tokens", "day", limits.tokens_per_day)):
            if limit is None:
                continue
            used = int(self.cache.get(self._key(subject, what[:3], window, now), 0) or 0)
            out[f"{what}_per_{window}"] = {"limit": limit, "used": used, "remaining": max(0, limit - used),
                                           "reset_seconds": int(WINDOWS[window] - now % WINDOWS[window])}
        if limits.parallel_streams is not None:
            used = self.leases.count(f"rl:{subject}:streams", now)
            out["parallel_streams"] = {"limit": limits.parallel_streams, "used": used,
                                       "remaining": max(0, limits.parallel_streams - used), "reset_seconds": None}
        return out

    def _undo(self, keys: list[str]) -> None:
        for key in keys:
            try:
                self.cache.decr(key)
            except ValueError:
                pass

    def refund_sync(self, subject: str, limits: Limits, lease: str = "") -> None:
        now = self.clock()
        self._undo([self._key(subject, "req", window, now) for window, limit in (
            ("minute", limits.requests_per_minute), ("hour", limits.requests_per_hour),
            ("day", limits.requests_per_day)) if limit is not None])
        self.release_sync(subject, limits, 0, lease)

    def release_all_sync(self, buckets: list[Bucket], tokens: int, lease: str) -> None:
        for subject, limits in buckets:
            self.release_sync(subject, limits, tokens, lease)

    def release_sync(self, subject: str, limits: Limits, tokens: int, lease: str = "") -> None:
        if limits.parallel_streams is not None and lease:
            key = f"rl:{subject}:streams"
            with self.held_lock:
                self.held.discard((key, lease))
            self.leases.drop(key, lease)
        if tokens > 0:
            now = self.clock()
            for window in ("minute", "day"):
                self._incr(self._key(subject, "tok", window, now), tokens, WINDOWS[window] + 5)

    def renew_sync(self) -> None:
        """Extend the leases of this worker's running streams (every RENEW_EVERY seconds)."""
        with self.held_lock:
            items = sorted(self.held)
        self.leases.renew(items, self.clock())

    def _keep_renewing(self) -> None:
        if self.renewer is None or self.renewer.done():
            self.renewer = asyncio.get_running_loop().create_task(self._renew_loop())

    async def _renew_loop(self) -> None:
        while self.held:
            await asyncio.sleep(RENEW_EVERY)
            try:
                await self._run(self.renew_sync)
            except Exception as exc:  # noqa: BLE001 - Redis away for a moment: the next round retries
                log.warning("limits: could not renew stream leases (%s)", type(exc).__name__)

    # Unauthenticated requests: failures per client address and minute.
    def auth_blocked_sync(self, address: str, limit: int) -> float:
        """Seconds until ``address`` may try again after ``limit`` failures this minute; 0: it may."""
        if limit <= 0:
            return 0.0
        now = self.clock()
        if int(self.cache.get(self._key(f"auth:{address}", "fail", "minute", now), 0)) >= limit:
            return WINDOWS["minute"] - now % WINDOWS["minute"]
        return 0.0

    def auth_failed_sync(self, address: str, limit: int) -> float:
        """Count a failed authentication; the seconds to wait if it was beyond ``limit``, else 0."""
        if limit <= 0:
            return 0.0
        now = self.clock()
        count = self._incr(self._key(f"auth:{address}", "fail", "minute", now), 1, WINDOWS["minute"] + 5)
        return WINDOWS["minute"] - now % WINDOWS["minute"] if count > limit else 0.0


def tighter(a: dict[str, str], b: dict[str, str]) -> dict[str, str]:
    """Rate headers of two buckets: per kind (requests, tokens), those of the one with less left."""
    out = dict(a)
    for kind in ("requests", "tokens"):
        left = f"x-ratelimit-remaining-{kind}"
        if left in b and (left not in out or int(b[left]) < int(out[left])):
            out.update({k: v for k, v in b.items() if k.endswith(f"-{kind}")})
    return out


NO_LIMITS = Limits()
limiter = Limiter(caches["default"])


async def _now(value: Any) -> Any:
    return value
