"""Hard token budgets per calendar period for a project, a group (each member alone) or a user.

Which apply to a request: the budgets of the project it is charged to, of each of the user's
groups, and the user's own (the Budget table, re-read at most every GATEWAY_POLICY_TTL seconds,
like the rate-limit policies). Periods are calendar periods in settings.TIME_ZONE: a day from
midnight, a week from Monday, a month from the 1st.

Whose usage counts: a project budget counts every request charged to the project; a group budget
and a user budget count the user's own requests (a group budget is a budget for each member).
So counters are per subject (``p<project id>``, ``u<user id>``) and period, shared by every budget
of that subject and period, and kept in the Django cache (Redis shares them between workers; local
memory keeps them in process, as gateway/limits.py does). A counter that is missing (first use,
Redis restarted or evicted it, or its resync time ran out) is rebuilt from the database: the sum
of the subject's usage rows in the period plus this worker's rows not yet written
(gateway/usage.py), stored with an atomic ``add`` (the first rebuild wins; the others read it).
Each request's tokens are then added with ``incr`` when it ends (gateway/views.py
Accounting.finish: streams, plain replies, cancelled streams' estimates, external providers),
before its usage row is queued, so a rebuild never counts a row twice.

Admission under concurrency: a request first holds its own prompt estimate in the subject's
``held`` counter of the current hold epoch (atomic ``incr``; HOLD_EPOCH below), then compares used +
held (this epoch's and the previous one's) with the budget. Parallel requests
thus see each other's prompts: of many that arrive together near the end of a budget, only those
whose prompts fit get through. A request is refused (HTTP 429, ``insufficient_quota``) when the
budget is used up or its prompt would cross it. What requests already running then generate is
not reserved: a budget can be overshot by at most the completions (and the prompt estimate's
error) of the requests in flight when it ran out. Reserving ``max_tokens`` instead would refuse
most requests long before a budget is spent (clients rarely set it, so the model's whole context
would have to be held); the parallel-streams limit bounds how many can be in flight.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

from django.conf import settings
from django.core.cache import caches
from django.core.cache.backends.locmem import LocMemCache
from django.db import close_old_connections
from django.db.models import Sum
from django.utils import timezone

from common.expiring import Expiring
from gateway.errors import ApiError
from gateway.limits import Counters
from gateway.threads import in_thread

log = logging.getLogger("gateway.budgets")
ADJECTIVE = {"day": "daily", "week": "weekly", "month": "monthly"}
RESYNC = 3600  # seconds a counter lives before it is rebuilt from the database (heals any drift)
# Holds are counted per epoch of HOLD_EPOCH seconds (wall clock, the same on every worker): a request
# holds its prompt in the counter of the epoch it began in and gives it back there; admission sees
# the holds of this epoch and the one before. So the hold of a request that never gave it back (its
# worker was killed) stops counting within two epochs instead of living on in one renewed counter.
HOLD_EPOCH = 900


@dataclass(frozen=True)
class BudgetRef:
    """What a request needs of a Budget row, without holding a model instance across threads."""

    id: int
    name: str
    scope: str  # project | group | user
    owner_id: int
    owner: str  # the project's or group's name, the user's username
    tokens: int
    period: str  # day | week | month

    @property
    def label(self) -> str:
        """The budget in words: "project climate's monthly token budget"."""
        what = f"{ADJECTIVE.get(self.period, self.period)} token budget"
        if self.scope == "project":
            return f"project {self.owner}'s {what}"
        if self.scope == "group":
            return f"the {what} of group {self.owner} (for each member)"
        return f"your {what}"


@dataclass(frozen=True)
class Applied:
    """A budget that applies to a request, and whose usage counts against it."""

    budget: BudgetRef
    subject: str  # p<project id> or u<user id>


@dataclass(frozen=True)
class State:
    """One budget's state in its current period."""

    budget: BudgetRef
    used: int
    start: dt.datetime
    end: dt.datetime  # when it resets

    @property
    def remaining(self) -> int:
        return max(0, self.budget.tokens - self.used)

    def as_dict(self) -> dict[str, Any]:
        b = self.budget
        return {"name": b.name, "scope": b.scope, "owner": b.owner, "limit": b.tokens, "used": self.used,
                "remaining": self.remaining, "period": b.period, "period_start": self.start.isoformat(),
                "resets_at": self.end.isoformat()}


@dataclass
class Admission:
    """A request's passage through its budgets: refused (with the state that refused it) or let
    through holding its prompt estimate in ``held`` subjects until it ends."""

    applied: list[Applied] = field(default_factory=list)
    allowed: bool = True
    held: int = 0  # the prompt estimate held per subject
    subjects: list[str] = field(default_factory=list)  # those holding it
    epoch: int = 0  # the hold epoch it holds in (Budgets._held_key)
    states: list[State] = field(default_factory=list)
    refused_by: State | None = None
    done: bool = False

    @property
    def headers(self) -> dict[str, str]:
        return headers_of(self.states)

    def error(self) -> ApiError:
        state = self.refused_by
        assert state is not None
        when = f"It resets on {reset_words(state.end)}."
        if state.used >= state.budget.tokens:
            text = (f"Token budget used up: {state.budget.label} of {state.budget.tokens:,} tokens is spent "
                    f"({state.used:,} used). {when}")
        else:
            text = (f"This request (about {self.held:,} prompt tokens) would exceed {state.budget.label}: "
                    f"{state.remaining:,} of {state.budget.tokens:,} tokens left. {when}")
        return ApiError(429, text, code="insufficient_quota", kind="insufficient_quota")


def headers_of(states: Iterable[State]) -> dict[str, str]:
    """The tightest budget (least left) as response headers; none without a budget."""
    states = list(states)
    if not states:
        return {}
    tight = min(states, key=lambda s: (s.remaining, s.budget.tokens))
    return {"x-budget-limit-tokens": str(tight.budget.tokens), "x-budget-remaining-tokens": str(tight.remaining),
            "x-budget-reset": tight.end.isoformat(), "x-budget-scope": tight.budget.scope}


def reset_words(when: dt.datetime) -> str:
    """"1 January 2027 at 00:00 (Europe/Berlin)": when a period ends, in the site's time zone."""
    local = when.astimezone(ZoneInfo(settings.TIME_ZONE))
    return f"{local.day} {local:%B %Y at %H:%M} ({settings.TIME_ZONE})"


def period_bounds(period: str, now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """The calendar period holding ``now`` in settings.TIME_ZONE: [start, end)."""
    zone = ZoneInfo(settings.TIME_ZONE)
    day = now.astimezone(zone).date()
    if period == "day":
        first, following = day, day + dt.timedelta(days=1)
    elif period == "week":
        first = day - dt.timedelta(days=day.weekday())
        following = first + dt.timedelta(days=7)
    else:
        first = day.replace(day=1)
        following = (first + dt.timedelta(days=32)).replace(day=1)
    return dt.datetime.combine(first, dt.time(), zone), dt.datetime.combine(following, dt.time(), zone)


# -- which budgets apply ------------------------------------------------------------------------

_table: Expiring[str, tuple[BudgetRef, ...]] = Expiring(lambda: settings.GATEWAY_POLICY_TTL)


def _load() -> tuple[BudgetRef, ...]:
    from gateway.models import Budget

    out = []
    for b in Budget.objects.select_related("project", "group", "user"):
        if b.project is not None:
            out.append(BudgetRef(b.pk, b.name, "project", b.project.pk, b.project.name, b.tokens, b.period))
        elif b.group is not None:
            out.append(BudgetRef(b.pk, b.name, "group", b.group.pk, b.group.name, b.tokens, b.period))
        elif b.user is not None:
            out.append(BudgetRef(b.pk, b.name, "user", b.user.pk, b.user.get_username(), b.tokens, b.period))
    return tuple(out)


def all_budgets() -> tuple[BudgetRef, ...]:
    """Every budget (a short table), re-read at most every GATEWAY_POLICY_TTL seconds. Sync."""
    return _table.get_or_load("", _load)


def forget() -> None:
    """Drop the cached table (tests, and the admin after a change)."""
    _table.clear()


def applying(caller: Any, table: Iterable[BudgetRef] | None = None) -> list[Applied]:
    """The budgets a caller's request counts against: its project's, its user's groups', its user's."""
    out = []
    for b in all_budgets() if table is None else table:
        if b.scope == "project" and caller.project is not None and b.owner_id == caller.project.id:
            out.append(Applied(b, f"p{b.owner_id}"))
        elif (b.scope == "group" and b.owner_id in caller.group_ids) or (
                b.scope == "user" and b.owner_id == caller.user.pk):
            out.append(Applied(b, f"u{caller.user.pk}"))
    return out


# -- counting -------------------------------------------------------------------------------------

def _db_tokens(subject: str, start: dt.datetime, end: dt.datetime) -> int:
    from gateway.models import UsageRecord

    who = {"project_id": int(subject[1:])} if subject[0] == "p" else {"user_id": int(subject[1:])}
    sums = UsageRecord.objects.filter(created_at__gte=start, created_at__lt=end, **who).aggregate(
        p=Sum("prompt_tokens"), c=Sum("completion_tokens"))
    return int(sums["p"] or 0) + int(sums["c"] or 0)


def _row_tokens(rows: list[dict[str, Any]], subject: str, start: dt.datetime, end: dt.datetime) -> int:
    column = "project_id" if subject[0] == "p" else "user_id"
    owner = int(subject[1:])
    return sum(int(r.get("prompt_tokens") or 0) + int(r.get("completion_tokens") or 0) for r in rows
               if r.get(column) == owner and start <= r["created_at"] < end)


def usage_in_database(subject: str, start: dt.datetime, end: dt.datetime) -> int:
    """The subject's tokens in [start, end): written rows plus this worker's rows not yet written,
    each counted once (gateway/usage.py unwritten_with). Sync."""
    from gateway.usage import writer

    close_old_connections()
    written, unwritten = writer.unwritten_with(lambda: _db_tokens(subject, start, end))
    return written + _row_tokens(unwritten, subject, start, end)


_giving_back: set[asyncio.Future[None]] = set()


def hold_epoch(now: dt.datetime) -> int:
    """The hold epoch holding ``now`` (HOLD_EPOCH)."""
    return int(now.timestamp()) // HOLD_EPOCH


class Budgets:
    """Budget counters in a Django cache (Counters in process for local memory). Sync methods run in
    one worker-thread hop per request; the clock is swappable and every method takes an explicit
    ``now`` too, so periods are tested without waiting for one to end."""

    def __init__(self, cache: Any, clock: Callable[[], dt.datetime] | None = None) -> None:
        self.cache: Any = Counters() if isinstance(cache, LocMemCache) else cache
        self.clock = clock or timezone.now
        self.usage: Callable[[str, dt.datetime, dt.datetime], int] = usage_in_database

    @staticmethod
    def _key(subject: str, period: str, start: dt.datetime) -> str:
        return f"bud:{subject}:{period}:{start:%Y%m%d}"

    @staticmethod
    def _held_key(subject: str, epoch: int) -> str:
        return f"bud:{subject}:held:{epoch}"

    def _held_in(self, subject: str, epoch: int) -> int:
        return max(0, int(self.cache.get(self._held_key(subject, epoch)) or 0))

    def held_sync(self, subject: str, now: dt.datetime) -> int:
        """The prompts held by the subject's requests in flight: the counters of this hold epoch and
        the one before (a request that began in the previous one still holds there)."""
        epoch = hold_epoch(now)
        return self._held_in(subject, epoch) + self._held_in(subject, epoch - 1)

    def used_sync(self, subject: str, period: str, now: dt.datetime) -> tuple[int, dt.datetime, dt.datetime]:
        """The subject's tokens in the period holding ``now`` (rebuilt from the database if the counter
        is missing), and the period's bounds."""
        start, end = period_bounds(period, now)
        key = self._key(subject, period, start)
        value = self.cache.get(key)
        if value is None:
            self.cache.add(key, self.usage(subject, start, end), RESYNC)  # the first rebuild wins
            value = self.cache.get(key)
        return int(value or 0), start, end

    def _add(self, key: str, by: int, ttl: int) -> int:
        for _ in range(2):
            self.cache.add(key, 0, ttl)
            try:
                return int(self.cache.incr(key, by))
            except ValueError:  # expired (or the cache was lost) between add and incr
                continue
        return by

    def states_sync(self, applied: list[Applied], now: dt.datetime) -> list[State]:
        out = []
        for a in applied:
            used, start, end = self.used_sync(a.subject, a.budget.period, now)
            out.append(State(a.budget, used, start, end))
        return out

    def admit_sync(self, applied: list[Applied], estimate: int, now: dt.datetime) -> Admission:
        """Hold the prompt estimate in each subject, then check every budget: refused by one, nothing
        stays held. Sync."""
        subjects = sorted({a.subject for a in applied})
        epoch = hold_epoch(now)
        held: dict[str, int] = {}
        for subject in subjects:
            if estimate:
                # The value the incr returns, not a read after it: of many arriving together, each sees
                # only those before it, so the first ones fit. The counter outlives the next epoch.
                mine = self._add(self._held_key(subject, epoch), estimate, 3 * HOLD_EPOCH)
                held[subject] = max(0, mine) + self._held_in(subject, epoch - 1)
            else:
                held[subject] = self.held_sync(subject, now)
        admission = Admission(applied, held=estimate, subjects=subjects if estimate else [], epoch=epoch)
        for a in applied:
            used, start, end = self.used_sync(a.subject, a.budget.period, now)
            state = State(a.budget, used, start, end)
            admission.states.append(state)
            others = max(0, held[a.subject] - estimate)  # other requests' prompts in flight
            if admission.allowed and (used + others >= a.budget.tokens or used + others + estimate > a.budget.tokens):
                admission.allowed, admission.refused_by = False, state
        if not admission.allowed:
            self.release_sync(admission)
        return admission

    def release_sync(self, admission: Admission) -> None:
        """Let go of what the request holds (once)."""
        if admission.done:
            return
        admission.done = True
        for subject in admission.subjects:
            try:
                self.cache.decr(self._held_key(subject, admission.epoch), admission.held)
            except ValueError:  # the held counter expired or was lost: nothing to give back
                pass

    def settle_sync(self, admission: Admission, tokens: int, now: dt.datetime) -> None:
        """The request ended: release its hold and count its tokens in each (subject, period) of its
        budgets, in the period of ``now`` (the time on its usage row). Sync."""
        self.release_sync(admission)
        if tokens <= 0:
            return
        for subject, period in sorted({(a.subject, a.budget.period) for a in admission.applied}):
            self._count(subject, period, now, tokens)

    def _count(self, subject: str, period: str, now: dt.datetime, tokens: int) -> None:
        """Add a request's tokens to the period's counter, rebuilding it first if it is missing (before
        this request's row is queued, so the row is not counted twice). Never starts a missing counter
        at zero: one that expires between the look and the add is rebuilt again, else a period's usage
        would be forgotten until the next rebuild and the budget could be spent twice."""
        start, end = period_bounds(period, now)
        key = self._key(subject, period, start)
        for _ in range(3):
            if self.cache.get(key) is None:
                self.cache.add(key, self.usage(subject, start, end), RESYNC)  # the first rebuild wins
            try:
                self.cache.incr(key, tokens)
                return
            except ValueError:  # expired (or the cache was lost) since the look: rebuild again
                continue
        # The cache keeps losing it: the usage row (queued next) is what the next rebuild counts.
        log.warning("budgets: could not count %d tokens for %s in the cache", tokens, subject)

    # -- the async side: no thread hop for a caller without budgets ----------------------------

    async def _applying(self, caller: Any) -> list[Applied]:
        table = _table.get("")
        if table is None:
            table = await in_thread(all_budgets)
        return applying(caller, table) if table else []

    async def admit(self, caller: Any, estimate: int, now: dt.datetime | None = None) -> Admission:
        applied = await self._applying(caller)
        if not applied:
            return Admission()
        taking = asyncio.ensure_future(in_thread(self.admit_sync, applied, estimate, now or self.clock()))
        try:
            return await asyncio.shield(taking)
        except asyncio.CancelledError:
            # The client left while the hold was being taken in the thread: give it back once taken,
            # or it would count against the budget until its epoch passed.
            taking.add_done_callback(self._give_back_taken)
            raise

    def _give_back_taken(self, taking: asyncio.Future[Admission]) -> None:
        if not taking.cancelled() and taking.exception() is None and taking.result().subjects:
            task = asyncio.ensure_future(self.release(taking.result()))
            _giving_back.add(task)  # kept until done (the loop holds tasks only weakly)
            task.add_done_callback(_giving_back.discard)

    async def release(self, admission: Admission) -> None:
        if admission.subjects and not admission.done:
            await in_thread(self.release_sync, admission)

    async def settle(self, admission: Admission, tokens: int, now: dt.datetime | None = None) -> None:
        if admission.applied:
            await in_thread(self.settle_sync, admission, tokens, now or self.clock())

    async def headers_for(self, caller: Any) -> dict[str, str]:
        """The tightest budget's headers for a response that counts nothing (/v1/models, errors)."""
        applied = await self._applying(caller)
        if not applied:
            return {}
        return headers_of(await in_thread(self.states_sync, applied, self.clock()))

    def states_of(self, caller: Any, now: dt.datetime | None = None) -> list[State]:
        """Each budget applying to the caller, with what is used of it (for /api/me). Sync."""
        return self.states_sync(applying(caller), now or self.clock())


budgets = Budgets(caches["default"])
