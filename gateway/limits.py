"""Rate limits counted atomically in the Django cache (Redis shares them between workers).

Fixed windows per minute/hour/day for requests and tokens, and a counter of parallel
streams. The clock is swappable (``Limiter(clock=...)``) so decisions are tested without
sleeping. Limits come from the most specific policy: key, then user, then the user's
groups (the most generous of them), then settings.GATEWAY_DEFAULT_LIMITS.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any, Awaitable, Callable, Dict, FrozenSet, List, Optional

from django.conf import settings
from django.core.cache.backends.locmem import LocMemCache

from gateway.threads import in_thread

WINDOWS = {"minute": 60, "hour": 3600, "day": 86400}


@dataclass(frozen=True)
class Limits:
    requests_per_minute: Optional[int] = None
    requests_per_hour: Optional[int] = None
    requests_per_day: Optional[int] = None
    tokens_per_minute: Optional[int] = None
    tokens_per_day: Optional[int] = None
    parallel_streams: Optional[int] = None

    @classmethod
    def from_mapping(cls, data: Any) -> Limits:
        get = data.get if isinstance(data, dict) else (lambda name: getattr(data, name, None))
        return cls(**{f.name: get(f.name) for f in fields(cls)})


@dataclass
class Decision:
    allowed: bool
    headers: Dict[str, str] = field(default_factory=dict)
    retry_after: float = 0.0
    reason: str = ""


_policies: Optional[tuple[float, List[Any]]] = None
_groups: Dict[int, tuple[float, FrozenSet[int]]] = {}


def policies() -> List[Any]:
    """Every rate-limit policy (a short table), re-read at most every GATEWAY_POLICY_TTL seconds. Sync."""
    global _policies
    from gateway.models import RateLimitPolicy

    now = time.monotonic()
    if _policies is None or _policies[0] <= now:
        _policies = (now + settings.GATEWAY_POLICY_TTL, list(RateLimitPolicy.objects.all()))
    return _policies[1]


def group_ids_of(user: Any) -> FrozenSet[int]:
    """The user's groups, re-read at most every GATEWAY_POLICY_TTL seconds. Sync."""
    now = time.monotonic()
    cached = _groups.get(user.pk)
    if cached is None or cached[0] <= now:
        if len(_groups) > 50_000:
            _groups.clear()
        groups = frozenset(user.groups.values_list("pk", flat=True))
        cached = _groups[user.pk] = (now + settings.GATEWAY_POLICY_TTL, groups)
    return cached[1]


def limits_for(user: Any, key: Any, group_ids: FrozenSet[int]) -> Limits:
    """The limits that apply: the key's policy, else the user's, else the most generous of the
    user's groups', else the defaults. Sync (it may re-read the policies)."""
    rules = policies()
    if key is not None:
        for policy in rules:
            if policy.api_key_id == key.pk:
                return Limits.from_mapping(policy)
    for policy in rules:
        if policy.user_id == user.pk and policy.api_key_id is None:
            return Limits.from_mapping(policy)
    group_policies = [Limits.from_mapping(p) for p in rules
                      if p.group_id in group_ids and p.user_id is None and p.api_key_id is None]
    if group_policies:
        def generous(name: str) -> Optional[int]:
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
        self.data: Dict[str, tuple[int, float]] = {}
        self.lock = threading.Lock()
        self.sweep_at = 0.0

    def _live(self, key: str, now: float) -> Optional[tuple[int, float]]:
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


class Limiter:
    """Counts in a Django cache (or, for local memory, in Counters). The counting is sync; the
    async methods run it inline in process and in one worker-thread hop for Redis."""

    def __init__(self, cache: Any, clock: Callable[[], float] = time.time) -> None:
        self.inline = isinstance(cache, (LocMemCache, Counters))
        self.cache: Any = Counters() if isinstance(cache, LocMemCache) else cache
        self.clock = clock

    def _run(self, fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        if self.inline:
            return _now(fn(*args))
        return in_thread(fn, *args)

    async def acquire(self, subject: str, limits: Limits) -> Decision:
        """Count one request and one parallel stream, or refuse without counting."""
        if limits == NO_LIMITS:
            return Decision(True)
        return await self._run(self.acquire_sync, subject, limits)  # type: ignore[no-any-return]

    async def refund(self, subject: str, limits: Limits) -> None:
        """Take back an allowed request that another limit then refused."""
        if limits != NO_LIMITS:
            await self._run(self.refund_sync, subject, limits)

    async def release(self, subject: str, limits: Limits, tokens: int) -> None:
        """The request ended: free its parallel slot and count its tokens."""
        if limits.parallel_streams is not None or (tokens > 0 and (limits.tokens_per_minute is not None
                                                                   or limits.tokens_per_day is not None)):
            await self._run(self.release_sync, subject, limits, tokens)

    def _key(self, subject: str, what: str, window: str, now: float) -> str:
        return f"rl:{subject}:{what}:{window}:{int(now // WINDOWS[window])}"

    def _incr(self, key: str, by: int, ttl: int) -> int:
        self.cache.add(key, 0, ttl)
        try:
            return int(self.cache.incr(key, by))
        except ValueError:  # expired between add and incr
            self.cache.add(key, 0, ttl)
            return int(self.cache.incr(key, by))

    def acquire_sync(self, subject: str, limits: Limits) -> Decision:
        now = self.clock()
        headers: Dict[str, str] = {}
        taken: List[str] = []
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
            key = f"rl:{subject}:parallel"
            count = self._incr(key, 1, 3600)
            if count > limits.parallel_streams:
                self.cache.decr(key)
                self._undo(taken)
                return Decision(False, headers, 1.0, f"{limits.parallel_streams} parallel requests")
        return Decision(True, headers)

    def _undo(self, keys: List[str]) -> None:
        for key in keys:
            try:
                self.cache.decr(key)
            except ValueError:
                pass

    def refund_sync(self, subject: str, limits: Limits) -> None:
        now = self.clock()
        self._undo([self._key(subject, "req", window, now) for window, limit in (
            ("minute", limits.requests_per_minute), ("hour", limits.requests_per_hour),
            ("day", limits.requests_per_day)) if limit is not None])
        self.release_sync(subject, limits, 0)

    def release_sync(self, subject: str, limits: Limits, tokens: int) -> None:
        if limits.parallel_streams is not None:
            try:
                self.cache.decr(f"rl:{subject}:parallel")
            except ValueError:
                pass
        if tokens > 0:
            now = self.clock()
            for window in ("minute", "day"):
                self._incr(self._key(subject, "tok", window, now), tokens, WINDOWS[window] + 5)


NO_LIMITS = Limits()


async def _now(value: Any) -> Any:
    return value
