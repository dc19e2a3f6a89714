"""Fair-share priority: each request's place in the platform's queue, from its user's and its
project's recent usage, as Slurm's classic fair share computes it.

Usage is tokens, decayed exponentially with a half-life (FAIRSHARE_HALF_LIFE): a token used one
half-life ago counts half. A project's shares (Project.shares) are normalised against the shares of
all projects; a user without a project counts as a project of its own with FAIRSHARE_DEFAULT_SHARES.
Usage is normalised against the whole service's decayed usage. Slurm's factor F = 2^(-U/S) is
taken for the project and for the user (against the project's share) and combined as their
geometric mean::

    log2 F = -(U_project + U_user) / (2 * S_project)        (F in (0, 1]; 1 = no recent usage)

so between projects the project's usage counts, within a project the user's own. A user without
a project is its own project: F = 2^(-U_user / S). The priority sent to the platform (header
``x-chatai-priority``, lower = earlier, like vLLM's ``priority``) is ``round(1000 * (1 - F))``, plus
FAIRSHARE_CHAT_BOOST for API traffic, so the chat page's requests go ahead of API requests of
the same standing. With FAIRSHARE off every request has priority 0 (first come, first served).
A stream's tokens are added while it runs (every RECORD_EVERY seconds), not only when it ends: a
user's 32 open streams of several minutes weigh on their next requests within seconds.

Counters shared by all workers, without a lock: tokens added at time t are stored multiplied by
2^((t - epoch) / half_life), so adding is one atomic integer increment and the decayed value now
is the stored sum times 2^(-(now - epoch) / half_life). The epoch moves on every REBASE
half-lives (the scale then stays below 2^REBASE, far from Redis's 64-bit limit); a reader adds the
previous epoch's counter, decayed the same way, so nothing is lost at the change. Redis: one
pipeline (INCRBY, EXPIRE) to record, one MGET to read; local memory: in-process Counters, like the
limiter's (gateway/limits.py). Only token counts are kept, never any content.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.cache import caches
from django.core.cache.backends.locmem import LocMemCache
from django.db import close_old_connections
from django.db.models import Sum

from common.expiring import Expiring
from gateway.limits import Counters
from gateway.threads import in_thread

log = logging.getLogger("gateway.fairshare")
REBASE = 20  # half-lives per epoch: the stored scale stays below 2**20
SCALE = 1000  # the fair-share part of a priority: 0 (no recent usage) .. 1000 (F near 0)
TOTAL = "all"  # the whole service's usage
MIN_FACTOR = 1e-12  # F never reaches 0 (2^-40: far beyond any priority's resolution)
RECORD_EVERY = 2.0  # seconds between additions of a running stream's tokens so far (gateway/views.py)


@dataclass(frozen=True)
class Standing:
    """What a request's priority comes from (also what ``manage.py fairshare`` shows)."""

    user_usage: float  # decayed tokens
    project_usage: float
    total_usage: float
    share: float  # the project's normalised share, in (0, 1]
    factor: float  # F in (0, 1]
    priority: int


def fair_share_factor(user_usage: float, project_usage: float | None, total_usage: float, share: float) -> float:
    """F in (0, 1]; ``project_usage`` None: the user has no project (its own project). A project of
    0 shares (as in Slurm) stands behind everyone once the service has any usage."""
    if total_usage <= 0:
        return 1.0
    if share <= 0:
        return MIN_FACTOR
    u_user = min(1.0, user_usage / total_usage)
    u_project = u_user if project_usage is None else min(1.0, project_usage / total_usage)
    return max(2.0 ** (-(u_project + u_user) / (2 * share)), MIN_FACTOR)


def priority_of(factor: float, chat: bool, chat_boost: int) -> int:
    """The integer sent to the platform: lower is earlier; API traffic ``chat_boost`` behind chat."""
    return round(SCALE * (1.0 - factor)) + (0 if chat else chat_boost)


def subjects_of(user_id: int, project_id: int | None) -> list[str]:
    """The counters a request's tokens are added to."""
    return [f"u{user_id}", f"p{project_id}" if project_id is not None else "", TOTAL]


class Decayed:
    """Exponentially decayed token counters in a Django cache (Redis: shared by all workers), or in
    process (Counters) for local memory. ``half_life`` is read at each call, so a test may change it;
    a changed half-life starts fresh counters (the keys name it)."""

    def __init__(self, cache: Any, half_life: Callable[[], float], clock: Callable[[], float] = time.time) -> None:
        self.cache: Any = Counters() if isinstance(cache, LocMemCache) else cache
        self.inline = isinstance(self.cache, Counters)
        self.redis = hasattr(cache, "make_and_validate_key") and hasattr(getattr(cache, "_cache", None), "get_client")
        self.half_life, self.clock = half_life, clock

    def _epoch(self, now: float, h: float) -> int:
        return int(now // (REBASE * h))

    def _key(self, h: float, epoch: int, subject: str) -> str:
        return f"fs:{h:g}:{epoch}:{subject}"

    def add_sync(self, subjects: list[str], tokens: int) -> None:
        subjects = [s for s in subjects if s]
        if tokens <= 0 or not subjects:
            return
        now, h = self.clock(), float(self.half_life())
        epoch = self._epoch(now, h)
        scaled = round(tokens * 2.0 ** ((now - epoch * REBASE * h) / h))
        ttl = int(2 * REBASE * h) + 60  # the previous epoch is still read during the next
        keys = [self._key(h, epoch, s) for s in subjects]
        if self.redis:
            names = [self.cache.make_and_validate_key(k) for k in keys]
            pipe = self.cache._cache.get_client(names[0], write=True).pipeline(transaction=False)
            for name in names:
                pipe.incrby(name, scaled)
                pipe.expire(name, ttl)
            pipe.execute()
            return
        for key in keys:
            self.cache.add(key, 0, ttl)
            try:
                self.cache.incr(key, scaled)
            except ValueError:  # expired between add and incr
                self.cache.add(key, 0, ttl)
                self.cache.incr(key, scaled)

    def read_sync(self, subjects: list[str]) -> list[float]:
        """Each subject's decayed tokens now (0.0 for an empty subject name)."""
        now, h = self.clock(), float(self.half_life())
        epoch = self._epoch(now, h)
        wanted = [(s, e) for s in subjects if s for e in (epoch, epoch - 1)]
        keys = [self._key(h, e, s) for s, e in wanted]
        if self.redis and keys:
            names = [self.cache.make_and_validate_key(k) for k in keys]
            raw = self.cache._cache.get_client(names[0]).mget(names)
            values = [int(v) if v is not None else 0 for v in raw]
        else:
            values = [int(self.cache.get(k) or 0) for k in keys]
        decayed = {(s, e): v * 2.0 ** (-(now - e * REBASE * h) / h) for (s, e), v in zip(wanted, values, strict=True)}
        return [decayed.get((s, epoch), 0.0) + decayed.get((s, epoch - 1), 0.0) if s else 0.0 for s in subjects]


_total_shares: Expiring[str, int] = Expiring(lambda: settings.GATEWAY_POLICY_TTL)


def total_shares() -> int:
    """The shares of all projects, re-read at most every GATEWAY_POLICY_TTL seconds. Sync."""
    from gateway.models import Project

    def load() -> int:
        close_old_connections()
        return int(Project.objects.aggregate(total=Sum("shares"))["total"] or 0)

    return _total_shares.get_or_load("", load)


class FairShare:
    """Priorities for requests (``priority``, on the hot path: one cache read) and their usage
    (``record``: a running stream's tokens so far every RECORD_EVERY seconds, the rest when it ends)."""

    def __init__(self, cache: Any, clock: Callable[[], float] = time.time) -> None:
        self.counters = Decayed(cache, lambda: settings.FAIRSHARE_HALF_LIFE, clock)

    def standing_sync(self, user_id: int, project: Any, chat: bool, shares_total: int) -> Standing:
        """The fair-share standing of a request of ``user_id`` charged to ``project`` (a ProjectRef or None)."""
        project_id = project.id if project is not None else None
        user_usage, project_usage, total = self.counters.read_sync(subjects_of(user_id, project_id))
        own = project.shares if project is not None else settings.FAIRSHARE_DEFAULT_SHARES
        # A user without a project is one more project of FAIRSHARE_DEFAULT_SHARES.
        pool = shares_total + (0 if project is not None else settings.FAIRSHARE_DEFAULT_SHARES)
        share = own / pool if pool > 0 else 1.0
        factor = fair_share_factor(user_usage, project_usage if project is not None else None, total, share)
        return Standing(user_usage, project_usage, total, share, factor,
                        priority_of(factor, chat, settings.FAIRSHARE_CHAT_BOOST))

    async def priority(self, caller: Any) -> int:
        """The request's priority: 0 for all with fair share off. The chat page's requests (no key) are chat."""
        if not settings.FAIRSHARE:
            return 0
        shares = _total_shares.get("")
        chat = caller.key is None
        if self.counters.inline and shares is not None:
            return self.standing_sync(caller.user.pk, caller.project, chat, shares).priority
        return await in_thread(self._priority_sync, caller.user.pk, caller.project, chat)

    def _priority_sync(self, user_id: int, project: Any, chat: bool) -> int:
        return self.standing_sync(user_id, project, chat, total_shares()).priority

    async def record(self, user_id: int, project_id: int | None, tokens: int) -> None:
        """Add a finished request's tokens (charged, estimated for a cancelled stream) to its counters."""
        if tokens <= 0 or not settings.FAIRSHARE:
            return
        try:
            if self.counters.inline:
                self.counters.add_sync(subjects_of(user_id, project_id), tokens)
            else:
                await in_thread(self.counters.add_sync, subjects_of(user_id, project_id), tokens)
        except Exception as exc:  # noqa: BLE001 - a lost count only shifts priorities a little
            log.warning("fairshare: could not record usage (%s)", type(exc).__name__)


def forget() -> None:
    """Drop the cached share total (tests, and the admin after a change)."""
    _total_shares.clear()


fairshare = FairShare(caches["default"])
