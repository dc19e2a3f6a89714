"""Fair-share priority (gateway/fairshare.py): the decay and share maths with a swappable clock (no
sleeping), its counters in process and on the real Redis, and a client's own ``priority`` refused.
The live path (a heavy user's requests reach the platform with a higher number) is in
tests/test_fairshare_live.py."""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from django.core.cache.backends.locmem import LocMemCache
from django.core.cache.backends.redis import RedisCache
from django.test import RequestFactory

from gateway import fairshare as fs
from gateway.errors import ApiError
from gateway.fairshare import REBASE, Decayed, FairShare, fair_share_factor, priority_of
from gateway.projects import ProjectRef
from gateway.views import parse_body

H = 3600.0
backends = pytest.mark.parametrize("backend", ["local", pytest.param("redis", marks=pytest.mark.redis)])


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def cache_for(backend: str) -> Any:
    if backend == "local":
        return LocMemCache(f"fairshare-{uuid.uuid4().hex}", {})
    # A fresh key prefix per test: the counters of earlier runs cannot interfere.
    return RedisCache("redis://127.0.0.1:6379/14", {"KEY_PREFIX": uuid.uuid4().hex})


def fresh(backend: str, start: float = 1_800_000_000.0) -> tuple[Decayed, Clock]:
    clock = Clock(start)
    return Decayed(cache_for(backend), lambda: H, clock), clock


@dataclass(frozen=True)
class FakeCaller:
    """What FairShare reads of a gateway Caller (a fake for the pure logic)."""

    user: Any
    key: Any = None
    project: ProjectRef | None = None


@dataclass(frozen=True)
class FakeUser:
    pk: int


# -- the maths ------------------------------------------------------------------------------


def test_no_usage_anywhere_is_a_factor_of_one() -> None:
    assert fair_share_factor(0, None, 0, 1.0) == 1.0
    assert fair_share_factor(0, 0, 1000, 0.5) == 1.0


def test_a_project_of_no_shares_stands_behind_everyone() -> None:
    assert fair_share_factor(0, 0, 1000, 0.0) < fair_share_factor(1000, 1000, 1000, 0.1)
    assert priority_of(fair_share_factor(0, 0, 1000, 0.0), chat=True, chat_boost=100) == 1000


def test_a_user_without_a_project_follows_slurms_formula() -> None:
    # F = 2^(-U/S): all the usage with the whole share halves it; a quarter of it with half the share too.
    assert fair_share_factor(1000, None, 1000, 1.0) == pytest.approx(0.5)
    assert fair_share_factor(250, None, 1000, 0.5) == pytest.approx(2 ** -0.5)


def test_twice_the_shares_take_twice_the_usage_to_fall_as_far() -> None:
    assert fair_share_factor(400, None, 1000, 0.5) == pytest.approx(fair_share_factor(200, None, 1000, 0.25))


def test_in_a_project_the_project_and_the_user_count_half_each() -> None:
    light_member = fair_share_factor(0, 800, 1000, 0.5)
    heavy_member = fair_share_factor(800, 800, 1000, 0.5)
    assert light_member == pytest.approx(2 ** (-0.8 / 1.0))
    assert heavy_member == pytest.approx(2 ** (-1.6 / 1.0))
    assert heavy_member < light_member < 1.0
    # A member of an idle project goes ahead of the light member of a busy one.
    assert fair_share_factor(0, 0, 1000, 0.5) > light_member


def test_priority_is_lower_for_more_fair_share_and_chat_goes_ahead_of_api() -> None:
    assert priority_of(1.0, chat=True, chat_boost=100) == 0
    assert priority_of(1.0, chat=False, chat_boost=100) == 100
    assert priority_of(0.5, chat=True, chat_boost=100) == 500
    assert priority_of(0.25, chat=False, chat_boost=100) == 850


# -- decayed counters -----------------------------------------------------------------------


@backends
def test_usage_halves_every_half_life(backend: str) -> None:
    counters, clock = fresh(backend)
    counters.add_sync(["u1", "all"], 1000)
    assert counters.read_sync(["u1", "u2", "all"]) == pytest.approx([1000, 0, 1000], abs=0.01)
    clock.now += H
    assert counters.read_sync(["u1"]) == pytest.approx([500], abs=0.01)
    counters.add_sync(["u1"], 100)
    clock.now += 2 * H
    assert counters.read_sync(["u1"]) == pytest.approx([150], abs=0.01)


@backends
def test_usage_survives_the_change_of_epoch(backend: str) -> None:
    epoch = REBASE * H
    counters, clock = fresh(backend, start=(1_800_000_000 // epoch + 1) * epoch - H)  # an hour before a rebase
    counters.add_sync(["u1"], 1000)  # stored scaled by about 2^19
    clock.now += 2 * H  # now in the next epoch: its counter is empty, the previous one is read too
    assert counters.read_sync(["u1"]) == pytest.approx([250], rel=1e-6)
    counters.add_sync(["u1"], 1000)
    clock.now += H
    assert counters.read_sync(["u1"]) == pytest.approx([125 + 500], rel=1e-6)


@backends
def test_a_changed_half_life_starts_fresh_counters(backend: str) -> None:
    half_life = [H]
    clock = Clock(1_800_000_000.0)
    counters = Decayed(cache_for(backend), lambda: half_life[0], clock)
    counters.add_sync(["u1"], 1000)
    half_life[0] = 2 * H
    assert counters.read_sync(["u1"]) == [0.0]


@backends
def test_workers_adding_at_once_lose_nothing(backend: str) -> None:
    cache = cache_for(backend)
    clock = Clock(1_800_000_000.0 + 7 * H)  # the stored scale is 2^7 here
    workers = [Decayed(cache, lambda: H, clock) for _ in range(4)]
    if backend == "local":  # one process's Counters stand for the cache shared in process
        for w in workers[1:]:
            w.cache = workers[0].cache

    def add(counters: Decayed) -> None:
        for _ in range(200):
            counters.add_sync(["u1", "all"], 3)

    threads = [threading.Thread(target=add, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert workers[0].read_sync(["u1", "all"]) == pytest.approx([2400, 2400], rel=1e-9)


# -- priorities ------------------------------------------------------------------------------


@pytest.fixture
def shares_total() -> Any:
    fs._total_shares.put("", 0)  # no projects: the share total is known without the database
    yield
    fs.forget()


@backends
@pytest.mark.usefixtures("shares_total")
def test_a_heavy_user_gets_a_higher_number_than_a_light_one(backend: str, settings: Any) -> None:
    import asyncio

    settings.FAIRSHARE, settings.FAIRSHARE_HALF_LIFE, settings.FAIRSHARE_CHAT_BOOST = True, 3600, 100
    clock = Clock(1_800_000_000.0)
    share = FairShare(cache_for(backend), clock)
    heavy, light = FakeCaller(FakeUser(1), key=object()), FakeCaller(FakeUser(2), key=object())

    async def go() -> tuple[int, int, int, int]:
        assert await share.priority(heavy) == 100 and await share.priority(light) == 100  # idle: equal
        await share.record(1, None, 9000)
        await share.record(2, None, 1000)
        chat = FakeCaller(FakeUser(2))
        return await share.priority(heavy), await share.priority(light), await share.priority(chat), 0

    heavy_p, light_p, chat_p, _ = asyncio.run(go())
    # The heavy user: U = 0.9 of the whole, S = 1 (no projects): F = 2^-0.9.
    assert heavy_p == round(1000 * (1 - 2 ** -0.9)) + 100
    assert light_p == round(1000 * (1 - 2 ** -0.1)) + 100
    assert chat_p == light_p - 100
    assert heavy_p > light_p


@pytest.mark.usefixtures("shares_total")
def test_fair_share_off_is_first_come_first_served(settings: Any) -> None:
    import asyncio

    settings.FAIRSHARE = False
    share = FairShare(cache_for("local"), Clock(1_800_000_000.0))

    async def go() -> int:
        await share.record(1, None, 9000)
        return await share.priority(FakeCaller(FakeUser(1), key=object()))

    assert asyncio.run(go()) == 0
    assert share.counters.read_sync(["u1"]) == [0.0]  # nothing recorded either


@pytest.mark.django_db
def test_project_shares_are_normalised_against_all_projects(settings: Any) -> None:
    from gateway.models import Project

    settings.FAIRSHARE_DEFAULT_SHARES = 1
    fs.forget()
    big = Project.objects.create(name="big", shares=3)
    Project.objects.create(name="small", shares=1)
    share = FairShare(cache_for("local"), Clock(1_800_000_000.0))
    share.counters.add_sync(["u1", f"p{big.pk}", "all"], 500)
    share.counters.add_sync(["u2", "all"], 500)
    try:
        in_big = share.standing_sync(1, ProjectRef(big.pk, "big", "", 3), False, fs.total_shares())
        alone = share.standing_sync(2, None, False, fs.total_shares())
    finally:
        fs.forget()
    assert in_big.share == pytest.approx(3 / 4)
    assert alone.share == pytest.approx(1 / 5)  # its own project of one share, beside the 4 shares
    assert in_big.factor == pytest.approx(2 ** (-0.5 / 0.75))
    assert alone.factor == pytest.approx(2 ** (-0.5 / 0.2))
    assert in_big.priority < alone.priority


# -- a client cannot choose its own priority --------------------------------------------------


def test_a_client_priority_field_is_refused_naming_the_field() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "priority": -100}
    request = RequestFactory().post("/v1/chat/completions", json.dumps(body), content_type="application/json")
    with pytest.raises(ApiError) as caught:
        parse_body(request, "chat")
    assert caught.value.status == 400
    assert caught.value.body()["error"]["param"] == "priority"


@pytest.mark.django_db
def test_staff_read_a_users_standing_with_manage_py_fairshare(settings: Any) -> None:
    from io import StringIO

    from django.contrib.auth.models import User
    from django.core.management import call_command

    settings.FAIRSHARE, settings.FAIRSHARE_CHAT_BOOST = True, 100
    fs.forget()
    heavy, light = User.objects.create_user("heavy-fs"), User.objects.create_user("light-fs")
    fs.fairshare.counters.add_sync(fs.subjects_of(heavy.pk, None), 3000)
    fs.fairshare.counters.add_sync(fs.subjects_of(light.pk, None), 1000)
    out = StringIO()
    try:
        call_command("fairshare", "heavy-fs", "light-fs", stdout=out)
    finally:
        fs.forget()
    rows = {line.split()[0]: line.split() for line in out.getvalue().splitlines()[2:]}
    # Whatever else this process's counters hold, the heavy user stands behind the light one.
    assert int(rows["heavy-fs"][-2]) > int(rows["light-fs"][-2])  # API
    assert int(rows["heavy-fs"][-1]) == int(rows["heavy-fs"][-2]) - 100  # chat: the boost ahead
