"""Rate limits counted atomically in the Django cache (Redis shares them between workers).

Fixed windows per minute/hour/day for requests and tokens, and a counter of parallel
streams. The clock is swappable (``Limiter(clock=...)``) so decisions are tested without
sleeping. Limits come from the most specific policy: key, then user, then the user's
groups (the most generous of them), then settings.GATEWAY_DEFAULT_LIMITS.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional

from django.conf import settings
from django.core.cache import BaseCache

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


async def limits_for(user: Any, key: Any) -> Limits:
    from gateway.models import RateLimitPolicy

    if key is not None:
        policy = await RateLimitPolicy.objects.filter(api_key=key).afirst()
        if policy:
            return Limits.from_mapping(policy)
    policy = await RateLimitPolicy.objects.filter(user=user, api_key=None).afirst()
    if policy:
        return Limits.from_mapping(policy)
    group_policies: List[Limits] = [Limits.from_mapping(p) async for p in
                                    RateLimitPolicy.objects.filter(group__user=user, user=None, api_key=None)]
    if group_policies:
        def generous(name: str) -> Optional[int]:
            values = [getattr(p, name) for p in group_policies]
            return None if any(v is None for v in values) else max(values)

        return Limits(**{f.name: generous(f.name) for f in fields(Limits)})
    return Limits.from_mapping(settings.GATEWAY_DEFAULT_LIMITS)


class Limiter:
    def __init__(self, cache: BaseCache, clock: Callable[[], float] = time.time) -> None:
        self.cache, self.clock = cache, clock

    def _key(self, subject: str, what: str, window: str, now: float) -> str:
        return f"rl:{subject}:{what}:{window}:{int(now // WINDOWS[window])}"

    async def _incr(self, key: str, by: int, ttl: int) -> int:
        await self.cache.aadd(key, 0, ttl)
        try:
            return int(await self.cache.aincr(key, by))
        except ValueError:  # expired between add and incr
            await self.cache.aadd(key, 0, ttl)
            return int(await self.cache.aincr(key, by))

    async def acquire(self, subject: str, limits: Limits) -> Decision:
        """Count one request and one parallel stream, or refuse without counting."""
        now = self.clock()
        headers: Dict[str, str] = {}
        taken: List[str] = []
        for window, limit in (("minute", limits.requests_per_minute), ("hour", limits.requests_per_hour),
                              ("day", limits.requests_per_day)):
            if limit is None:
                continue
            key = self._key(subject, "req", window, now)
            count = await self._incr(key, 1, WINDOWS[window] + 5)
            taken.append(key)
            reset = WINDOWS[window] - now % WINDOWS[window]
            if window == "minute" or "x-ratelimit-limit-requests" not in headers:
                headers.update({"x-ratelimit-limit-requests": str(limit),
                                "x-ratelimit-remaining-requests": str(max(0, limit - count)),
                                "x-ratelimit-reset-requests": f"{reset:.0f}s"})
            if count > limit:
                await self._undo(taken)
                return Decision(False, headers, reset, f"{limit} requests per {window}")
        for window, limit in (("minute", limits.tokens_per_minute), ("day", limits.tokens_per_day)):
            if limit is None:
                continue
            used = int(await self.cache.aget(self._key(subject, "tok", window, now), 0))
            reset = WINDOWS[window] - now % WINDOWS[window]
            headers.update({"x-ratelimit-limit-tokens": str(limit),
                            "x-ratelimit-remaining-tokens": str(max(0, limit - used)),
                            "x-ratelimit-reset-tokens": f"{reset:.0f}s"})
            if used >= limit:
                await self._undo(taken)
                return Decision(False, headers, reset, f"{limit} tokens per {window}")
        if limits.parallel_streams is not None:
            key = f"rl:{subject}:parallel"
            count = await self._incr(key, 1, 3600)
            if count > limits.parallel_streams:
                await self.cache.adecr(key)
                await self._undo(taken)
                return Decision(False, headers, 1.0, f"{limits.parallel_streams} parallel requests")
        return Decision(True, headers)

    async def _undo(self, keys: List[str]) -> None:
        for key in keys:
            try:
                await self.cache.adecr(key)
            except ValueError:
                pass

    async def refund(self, subject: str, limits: Limits) -> None:
        """Take back an allowed request that another limit then refused."""
        now = self.clock()
        await self._undo([self._key(subject, "req", window, now) for window, limit in (
            ("minute", limits.requests_per_minute), ("hour", limits.requests_per_hour),
            ("day", limits.requests_per_day)) if limit is not None])
        await self.release(subject, limits, 0)

    async def release(self, subject: str, limits: Limits, tokens: int) -> None:
        """The request ended: free its parallel slot and count its tokens."""
        if limits.parallel_streams is not None:
            try:
                await self.cache.adecr(f"rl:{subject}:parallel")
            except ValueError:
                pass
        if tokens > 0:
            now = self.clock()
            for window in ("minute", "day"):
                await self._incr(self._key(subject, "tok", window, now), tokens, WINDOWS[window] + 5)
