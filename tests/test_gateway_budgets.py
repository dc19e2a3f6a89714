"""Token budgets' counting and decisions with an explicit ``now`` (no waiting for a month to end), on
the test database, with the counters in process and on the real Redis. The whole path through /v1
(streams, plain replies, cancelled streams, an external provider) is tests/test_budgets_live.py."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import uuid
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from django.contrib.auth.models import Group, User
from django.core.cache.backends.locmem import LocMemCache
from django.core.cache.backends.redis import RedisCache
from django.test import override_settings

from gateway import budgets as budgets_module
from gateway.budgets import Budgets, applying, period_bounds
from gateway.models import Budget, Project, UsageRecord
from gateway.projects import ProjectRef
from gateway.usage import writer

pytestmark = [pytest.mark.django_db(transaction=True),
              pytest.mark.parametrize("backend", ["local", pytest.param("redis", marks=pytest.mark.redis)])]
BERLIN = ZoneInfo("Europe/Berlin")
NOW = dt.datetime(2026, 12, 16, 12, 0, tzinfo=BERLIN)  # a Wednesday


class Who:
    """What budgets need of a Caller: the user, their groups, the request's project."""

    def __init__(self, user: Any, project: Any = None) -> None:
        self.user = user
        self.group_ids = frozenset(user.groups.values_list("pk", flat=True))
        self.project = None if project is None else ProjectRef(project.pk, project.name, "", 1)


def engine(backend: str) -> Budgets:
    budgets_module.forget()
    if backend == "local":
        return Budgets(LocMemCache("budgets-test", {}))
    # A fresh key prefix per test: the counters of earlier runs cannot interfere.
    return Budgets(RedisCache("redis://127.0.0.1:6379/14", {"KEY_PREFIX": uuid.uuid4().hex}))


def lose_counters(b: Budgets) -> None:
    """What a Redis restart (or eviction) does to the budget counters."""
    if isinstance(b.cache, RedisCache):
        client = b.cache._cache.get_client(write=True)
        names = list(client.scan_iter(f"{b.cache.key_prefix}:*"))
        if names:
            client.delete(*names)
    else:
        b.cache.data.clear()


def row(user: Any, project: Any, tokens: int, when: dt.datetime) -> dict[str, Any]:
    return {"user_id": user.pk, "api_key_id": None, "model": "m", "endpoint": "chat", "status": 200,
            "prompt_tokens": tokens // 2, "completion_tokens": tokens - tokens // 2, "duration_ms": 1,
            "streamed": False, "created_at": when, "project_id": project.pk if project else None}


def test_periods_are_calendar_periods_in_the_sites_time_zone(backend: str) -> None:
    with override_settings(TIME_ZONE="Europe/Berlin"):
        late = dt.datetime(2026, 12, 31, 23, 30, tzinfo=dt.UTC)  # already 1 January in Berlin
        assert period_bounds("month", late) == (dt.datetime(2027, 1, 1, tzinfo=BERLIN),
                                                dt.datetime(2027, 2, 1, tzinfo=BERLIN))
        assert period_bounds("week", NOW) == (dt.datetime(2026, 12, 14, tzinfo=BERLIN),
                                              dt.datetime(2026, 12, 21, tzinfo=BERLIN))
        assert period_bounds("day", NOW) == (dt.datetime(2026, 12, 16, tzinfo=BERLIN),
                                             dt.datetime(2026, 12, 17, tzinfo=BERLIN))
        start, end = period_bounds("month", dt.datetime(2026, 3, 29, 12, tzinfo=BERLIN))  # DST began that day
        assert end.astimezone(dt.UTC) - start.astimezone(dt.UTC) == dt.timedelta(days=31, hours=-1)


def test_the_request_that_would_cross_the_budget_is_refused_and_says_whose_and_when(backend: str) -> None:
    b = engine(backend)
    alice = User.objects.create(username="alice")
    climate = Project.objects.create(name="climate")
    Budget.objects.create(name="climate monthly", project=climate, tokens=100)
    who = Who(alice, climate)
    with override_settings(TIME_ZONE="Europe/Berlin"):
        first = b.admit_sync(applying(who), 30, NOW)
        assert first.allowed and first.headers["x-budget-remaining-tokens"] == "100"
        b.settle_sync(first, 70, NOW)  # 30 prompt + 40 completion
        crossing = b.admit_sync(applying(who), 31, NOW)
        assert not crossing.allowed
        error = crossing.error().body()["error"]
        assert error["type"] == error["code"] == "insufficient_quota"
        assert error["message"] == ("This request (about 31 prompt tokens) would exceed project climate's monthly "
                                    "token budget: 30 of 100 tokens left. It resets on 1 January 2027 at 00:00 "
                                    "(Europe/Berlin).")
        fits = b.admit_sync(applying(who), 30, NOW)
        assert fits.allowed
        b.settle_sync(fits, 30, NOW)
        spent = b.admit_sync(applying(who), 0, NOW)
        assert not spent.allowed and "is spent (100 used)" in spent.error().message
        [state] = b.states_sync(applying(who), NOW)
        assert (state.used, state.remaining) == (100, 0)


def test_parallel_requests_near_the_end_see_each_others_prompts(backend: str) -> None:
    b = engine(backend)
    bob = User.objects.create(username="bob")
    Budget.objects.create(name="bob", user=bob, tokens=100)
    applied = applying(Who(bob))
    b.settle_sync(b.admit_sync(applied, 0, NOW), 10, NOW)  # 90 left; the counter exists
    results: list[bool] = []
    barrier = threading.Barrier(12)

    def one() -> None:
        barrier.wait()
        results.append(b.admit_sync(applied, 30, NOW).allowed)

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) <= 3  # 3 x 30 fit in 90: never more get through at once
    assert results.count(True) >= 1


def test_a_refused_request_holds_nothing_and_an_ended_one_gives_its_hold_back(backend: str) -> None:
    b = engine(backend)
    carol = User.objects.create(username="carol")
    Budget.objects.create(name="carol", user=carol, tokens=100)
    applied = applying(Who(carol))
    running = b.admit_sync(applied, 60, NOW)
    assert running.allowed
    assert not b.admit_sync(applied, 60, NOW).allowed  # 60 held + 60 > 100
    assert b.admit_sync(applied, 40, NOW).allowed is True  # the refused one held nothing
    b.settle_sync(running, 0, NOW)  # failed before the model took it: nothing charged, hold given back
    assert b.states_sync(applied, NOW)[0].used == 0


def test_holds_in_flight_count_across_an_epoch_and_a_lost_one_stops_counting(backend: str) -> None:
    """A request that began in the previous hold epoch still holds its prompt; the hold of one that
    never gave it back (its worker was killed) stops counting two epochs on: it lived on for ever in a
    counter each new hold renewed, and enough of them locked the budget with tokens unspent."""
    b = engine(backend)
    dora = User.objects.create(username="dora")
    Budget.objects.create(name="dora", user=dora, tokens=100)
    applied = applying(Who(dora))
    epoch = dt.timedelta(seconds=budgets_module.HOLD_EPOCH)
    start = NOW.replace(minute=0, second=0, microsecond=0)  # the first second of an epoch
    running = b.admit_sync(applied, 60, start)
    lost = b.admit_sync(applied, 30, start)  # its worker is killed: never settled
    assert running.allowed and lost.allowed
    assert not b.admit_sync(applied, 30, start + epoch).allowed  # the next epoch: 90 still held
    b.settle_sync(running, 0, start + epoch)  # gives back where it held
    later = b.admit_sync(applied, 70, start + epoch)
    assert later.allowed  # 30 (the lost one) + 70 fit
    b.settle_sync(later, 0, start + epoch)
    assert b.admit_sync(applied, 100, start + 2 * epoch).allowed is True  # the lost hold counts no more


def test_a_request_cancelled_while_its_hold_is_taken_gives_it_back(backend: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The client leaves while the hold is being taken in a worker thread: the thread goes on and takes
    it, and nobody gave it back (it counted until its epoch passed)."""
    b = engine(backend)
    ida = User.objects.create(username="ida")
    Budget.objects.create(name="ida", user=ida, tokens=100)
    who = Who(ida)
    applying(who)  # the budget table loaded outside the event loop
    taking, started, go_on, taken = b.admit_sync, threading.Event(), threading.Event(), threading.Event()

    def slow(*args: Any) -> Any:
        started.set()
        go_on.wait(10)  # until the caller has been cancelled
        try:
            return taking(*args)
        finally:
            taken.set()

    monkeypatch.setattr(b, "admit_sync", slow)

    async def leave_while_taking() -> None:
        task = asyncio.ensure_future(b.admit(who, 60, NOW))
        while not started.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        go_on.set()  # the thread takes the hold now, after its caller left
        for _ in range(500):  # then the hold is given back
            if taken.is_set() and b.held_sync(f"u{ida.pk}", NOW) == 0 and not budgets_module._giving_back:
                break
            await asyncio.sleep(0.01)

    asyncio.run(leave_while_taking())
    assert b.held_sync(f"u{ida.pk}", NOW) == 0


def test_a_group_budget_counts_each_member_alone_and_a_project_budget_counts_all(backend: str) -> None:
    b = engine(backend)
    students = Group.objects.create(name="students")
    dave, erin = User.objects.create(username="dave"), User.objects.create(username="erin")
    for u in (dave, erin):
        u.groups.add(students)
    lab = Project.objects.create(name="lab")
    Budget.objects.create(name="students", group=students, tokens=50, period="day")
    Budget.objects.create(name="lab", project=lab, tokens=1000, period="week")
    b.settle_sync(b.admit_sync(applying(Who(dave, lab)), 10, NOW), 50, NOW)
    assert not b.admit_sync(applying(Who(dave, lab)), 1, NOW).allowed  # dave's own 50 a day
    ok = b.admit_sync(applying(Who(erin, lab)), 10, NOW)
    assert ok.allowed  # erin has her own 50
    b.settle_sync(ok, 20, NOW)
    states = {s.budget.scope: s for s in b.states_sync(applying(Who(erin, lab)), NOW)}
    assert (states["group"].used, states["project"].used) == (20, 70)
    assert states["group"].budget.label == "the daily token budget of group students (for each member)"


def test_the_next_period_starts_from_zero_and_a_request_is_counted_when_it_ends(backend: str) -> None:
    b = engine(backend)
    frank = User.objects.create(username="frank")
    Budget.objects.create(name="frank", user=frank, tokens=100)
    applied = applying(Who(frank))
    with override_settings(TIME_ZONE="Europe/Berlin"):
        last_minute = dt.datetime(2026, 12, 31, 23, 59, tzinfo=BERLIN)
        b.settle_sync(b.admit_sync(applied, 0, last_minute), 100, last_minute)
        late = b.admit_sync(applied, 5, last_minute)
        assert not late.allowed
        assert late.headers["x-budget-reset"] == "2027-01-01T00:00:00+01:00"
        new_year = dt.datetime(2027, 1, 1, 0, 0, 1, tzinfo=BERLIN)
        stream = b.admit_sync(applied, 5, new_year)
        assert stream.allowed
        b.settle_sync(stream, 25, new_year + dt.timedelta(minutes=3))
        assert [s.used for s in b.states_sync(applied, new_year)] == [25]
        assert [s.used for s in b.states_sync(applied, last_minute)] == [100]  # December's stays


def test_a_counter_lost_from_the_cache_is_rebuilt_from_the_database_and_unwritten_rows(backend: str) -> None:
    b = engine(backend)
    gina = User.objects.create(username="gina")
    geo = Project.objects.create(name="geo")
    Budget.objects.create(name="geo", project=geo, tokens=10_000)
    applied = applying(Who(gina, geo))
    earlier = NOW - dt.timedelta(days=2)
    UsageRecord.objects.create(**row(gina, geo, 300, earlier))
    UsageRecord.objects.create(**row(gina, geo, 999, NOW - dt.timedelta(days=40)))  # last month
    UsageRecord.objects.create(**row(gina, None, 777, earlier))  # charged to no project
    with writer.lock:
        writer.pending.append(row(gina, geo, 40, earlier))  # finished here, not yet written
    try:
        assert b.states_sync(applied, NOW)[0].used == 340
        request = b.admit_sync(applied, 10, NOW)
        lose_counters(b)  # Redis restarted, or evicted the counters, while the request ran
        b.settle_sync(request, 60, NOW)
        assert b.states_sync(applied, NOW)[0].used == 400
        writer.flush_sync()  # the unwritten row reaches the database: still counted once
        lose_counters(b)
        assert b.states_sync(applied, NOW)[0].used == 340
    finally:
        with writer.lock:
            writer.pending.clear()


class ExpiresAfterOneLook:
    """A cache whose period counters expire right after the next look at them: the window between a
    look and an add that a busy project hits now and then."""

    def __init__(self, cache: Any, forget: Any) -> None:
        self.cache, self.forget, self.armed = cache, forget, True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cache, name)

    def get(self, key: str, default: Any = None) -> Any:
        value = self.cache.get(key, default)
        if self.armed and value is not None and ":held" not in key:
            self.armed = False
            self.forget()
        return value


def test_a_counter_that_expires_between_look_and_add_is_rebuilt_not_restarted(backend: str) -> None:
    b = engine(backend)
    hal = User.objects.create(username="hal")
    Budget.objects.create(name="hal", user=hal, tokens=1_000_000)
    applied = applying(Who(hal))
    UsageRecord.objects.create(**row(hal, None, 900_000, NOW - dt.timedelta(days=1)))
    assert b.states_sync(applied, NOW)[0].used == 900_000
    request = b.admit_sync(applied, 10, NOW)
    b.cache = ExpiresAfterOneLook(b.cache, lambda: lose_counters(engine_of(b)))
    b.settle_sync(request, 500, NOW)
    b.cache = b.cache.cache
    assert b.states_sync(applied, NOW)[0].used == 900_500  # not 500: the month's usage is not forgotten


def engine_of(b: Budgets) -> Budgets:
    """``b`` with its own cache (the wrapper's), for lose_counters."""
    inner = Budgets.__new__(Budgets)
    inner.cache = b.cache.cache
    return inner


def test_a_rebuild_while_a_batch_commits_counts_it_once(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    b = engine(backend)
    hana = User.objects.create(username="hana")
    Budget.objects.create(name="hana", user=hana, tokens=10_000)
    applied = applying(Who(hana))
    with writer.lock:
        writer.pending.append(row(hana, None, 50, NOW))
    batch = writer._take()
    assert b.states_sync(applied, NOW)[0].used == 50  # taken from pending, not yet committed: counted
    lose_counters(b)
    inserted, go = threading.Event(), threading.Event()
    real = UsageRecord.objects.bulk_create

    def slow_commit(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)  # in the database now, still in the writer's batch for a moment
        inserted.set()
        go.wait(5)
        return out

    monkeypatch.setattr(UsageRecord.objects, "bulk_create", slow_commit)
    committing = threading.Thread(target=writer._write, args=(batch,))
    committing.start()
    assert inserted.wait(5)
    seen: list[int] = []
    rebuild = threading.Thread(target=lambda: seen.append(b.states_sync(applied, NOW)[0].used))
    rebuild.start()
    rebuild.join(0.3)  # it waits for the commit to finish (or, without the commit lock, reads both)
    go.set()
    committing.join()
    rebuild.join()
    assert seen == [50] and not writer.writing
