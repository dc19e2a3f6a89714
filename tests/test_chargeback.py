"""The charge-back's arithmetic (gateway/chargeback.py) on hand-made NodeTime and usage rows, with
an explicit ``now``: busy time as the union of request intervals, busy hours split by tokens, idle
apart, month boundaries, running instances, GPU against CPU instances. On the test database
(SQLite), and the same tests again on PostgreSQL in a child pytest (``test_..._on_postgresql``)."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from gateway.chargeback import NO_PROJECT, Report, month_bounds, parse_month, report
from gateway.models import NodeTime, Project, UsageRecord

pytestmark = pytest.mark.django_db
UTC = dt.UTC
ROOT = Path(__file__).resolve().parent.parent
DEC = (dt.datetime(2026, 12, 1, tzinfo=UTC), dt.datetime(2027, 1, 1, tzinfo=UTC))
NOV = (dt.datetime(2026, 11, 1, tzinfo=UTC), dt.datetime(2026, 12, 1, tzinfo=UTC))
LATER = dt.datetime(2027, 2, 1, tzinfo=UTC)  # a "now" after everything


@pytest.fixture(autouse=True)
def utc(settings: Any) -> None:
    settings.TIME_ZONE = "UTC"


def t(day: int, hour: int, minute: int = 0, month: int = 12) -> dt.datetime:
    return dt.datetime(2026, month, day, hour, minute, tzinfo=UTC)


def instance(name: str, start: dt.datetime, end: dt.datetime | None, *, gpus: int = 0, cpus: int = 4,
             model: str = "m", platform: str = "hpc", nodes: int = 1) -> None:
    NodeTime.objects.create(platform=platform, instance=name, job_id="1", model=model, started_at=start,
                            ended_at=end, nodes=nodes, gpus=gpus, cpus=cpus, source="sacct")


def request(inst: str, project: Project | None, began: dt.datetime, ended: dt.datetime, tokens: int,
            *, model: str = "m", platform: str = "hpc") -> None:
    """A usage row: created when the request ended, lasting from ``began``."""
    UsageRecord.objects.create(model=model, endpoint="chat", status=200, created_at=ended,
                               duration_ms=int((ended - began).total_seconds() * 1000),
                               prompt_tokens=tokens // 4, completion_tokens=tokens - tokens // 4,
                               project=project, platform=platform, instance=inst)


def line(rep: Report, project: str, model: str = "m", platform: str = "hpc") -> Any:
    return next(x for x in rep.lines if (x.project, x.platform, x.model) == (project, platform, model))


def balanced(rep: Report) -> None:
    """Every hour once: the projects' hours and the idle hours add up to the instances' hours."""
    used, node = rep.totals()
    for kind in ("node", "gpu", "cpu"):
        assert getattr(used.hours, kind) + getattr(node.idle, kind) == pytest.approx(getattr(node.total, kind))


def test_two_projects_on_one_instance_share_its_busy_hours_three_to_one_and_the_rest_is_idle() -> None:
    a, b = Project.objects.create(name="alpha"), Project.objects.create(name="beta")
    instance("i1", t(10, 10), t(10, 14), gpus=2, cpus=8)  # 4 h, 2 GPUs
    request("i1", a, t(10, 10), t(10, 10, 30), 200)
    request("i1", b, t(10, 10, 15), t(10, 10, 45), 100)  # overlaps alpha's: the union counts once
    request("i1", b, t(10, 10, 20), t(10, 10, 25), 0)  # inside both
    request("i1", a, t(10, 12), t(10, 12, 30), 100)
    rep = report(*DEC, now=LATER)
    # busy: 10:00-10:45 and 12:00-12:30 = 1.25 h; alpha 300 tokens, beta 100
    alpha, beta = line(rep, "alpha"), line(rep, "beta")
    assert (alpha.requests, beta.requests) == (2, 2)
    assert alpha.prompt_tokens + alpha.completion_tokens == 300 and beta.prompt_tokens == 25
    assert alpha.hours.gpu == pytest.approx(2 * 1.25 * 0.75) and beta.hours.gpu == pytest.approx(2 * 1.25 * 0.25)
    assert alpha.hours.node == pytest.approx(1.25 * 0.75) and alpha.hours.cpu == 0  # a GPU instance: GPU-hours only
    [idle] = rep.idle
    assert (idle.platform, idle.model, idle.instances) == ("hpc", "m", 1)
    assert idle.elapsed_hours == pytest.approx(4) and idle.busy_hours == pytest.approx(1.25)
    assert idle.idle_hours == pytest.approx(2.75) and idle.idle.gpu == pytest.approx(5.5)
    assert idle.total.gpu == pytest.approx(8) and idle.total.cpu == 0
    balanced(rep)
    assert [p.project for p in rep.projects()] == ["alpha", "beta"]


def test_a_cpu_instance_counts_cpu_hours_and_usage_without_a_project_is_charged_to_no_project() -> None:
    a = Project.objects.create(name="alpha")
    instance("c1", t(3, 8), t(3, 10), gpus=0, cpus=16)
    request("c1", a, t(3, 8), t(3, 9), 100)
    request("c1", None, t(3, 8, 30), t(3, 9), 100)
    rep = report(*DEC, now=LATER)
    assert [x.project for x in rep.lines] == ["alpha", NO_PROJECT]  # no project last
    assert line(rep, "alpha").hours.cpu == pytest.approx(16 * 1 * 0.5)
    assert line(rep, NO_PROJECT).hours.cpu == pytest.approx(8) and line(rep, NO_PROJECT).hours.gpu == 0
    assert rep.idle[0].idle.cpu == pytest.approx(16) and rep.idle[0].idle.gpu == 0
    balanced(rep)


def test_an_instance_across_the_month_boundary_is_split_at_it() -> None:
    a, b = Project.objects.create(name="alpha"), Project.objects.create(name="beta")
    instance("x1", t(30, 23, month=11), t(1, 1), cpus=4)  # 1 h in November, 1 h in December
    request("x1", a, t(30, 23, 10, month=11), t(30, 23, 20, month=11), 50)
    request("x1", a, t(30, 23, 55, month=11), t(1, 0, 5), 10)  # ends in December: December's
    request("x1", b, t(1, 0, 30), t(1, 0, 40), 10)
    dec = report(*DEC, now=LATER)
    [idle] = dec.idle
    # December: 00:00-01:00, busy 00:00-00:05 (the part before the month is not December's) and 00:30-00:40
    assert idle.elapsed_hours == pytest.approx(1) and idle.busy_hours == pytest.approx(0.25)
    assert line(dec, "alpha").hours.cpu == pytest.approx(4 * 0.25 * 0.5) == line(dec, "beta").hours.cpu
    assert line(dec, "alpha").requests == 1
    nov = report(*NOV, now=LATER)
    assert nov.idle[0].elapsed_hours == pytest.approx(1) and nov.idle[0].busy_hours == pytest.approx(10 / 60)
    assert [(x.project, x.requests) for x in nov.lines] == [("alpha", 1)]
    assert line(nov, "alpha").hours.cpu == pytest.approx(4 * 10 / 60)
    balanced(dec)
    balanced(nov)


def test_a_running_instance_counts_until_now_and_a_request_is_clipped_to_the_instances_life() -> None:
    a = Project.objects.create(name="alpha")
    instance("r1", t(20, 10), None, gpus=1, cpus=8)
    # It waited 30 min for the job to start (a cold start in Slurm's queue): only the time on the instance is busy.
    request("r1", a, t(20, 9, 30), t(20, 10, 30), 40)
    rep = report(*DEC, now=t(20, 12))
    assert rep.running == 1
    [idle] = rep.idle
    assert idle.elapsed_hours == pytest.approx(2) and idle.busy_hours == pytest.approx(0.5)
    assert line(rep, "alpha").hours.gpu == pytest.approx(0.5)
    # The month before, nothing; a month started after "now": nothing either.
    assert report(*NOV, now=t(20, 12)).idle == []
    assert report(*DEC, now=t(20, 9)).idle == []
    balanced(rep)


def test_a_running_instance_started_last_month_counts_from_the_first() -> None:
    instance("r2", t(30, 22, month=11), None, gpus=4)
    rep = report(*DEC, now=t(1, 3))
    assert rep.idle[0].elapsed_hours == pytest.approx(3) and rep.idle[0].idle.gpu == pytest.approx(12)
    assert rep.lines == []


def test_requests_without_tokens_share_by_count_and_instances_without_node_time_are_counted_apart() -> None:
    a, b = Project.objects.create(name="alpha"), Project.objects.create(name="beta")
    instance("z1", t(5, 0), t(5, 2), cpus=2, nodes=2)
    request("z1", a, t(5, 0), t(5, 0, 30), 0)
    request("z1", b, t(5, 1), t(5, 1, 30), 0)
    request("z1", b, t(5, 1, 30), t(5, 1, 40), 0)
    request("never-collected", a, t(5, 3), t(5, 3, 10), 500)
    request("", a, t(5, 4), t(5, 4, 1), 70, model="ext-model", platform="")  # an external provider
    rep = report(*DEC, now=LATER)
    busy = 30 / 60 + 40 / 60
    assert line(rep, "alpha").hours.node == pytest.approx(2 * busy / 3)
    assert line(rep, "beta").hours.node == pytest.approx(2 * busy * 2 / 3)
    assert rep.unmatched_requests == 1
    external = line(rep, "alpha", "ext-model", "")
    assert external.requests == 1 and external.completion_tokens + external.prompt_tokens == 70
    assert external.hours.node == 0
    balanced(rep)


def test_two_models_on_two_platforms_are_kept_apart() -> None:
    a = Project.objects.create(name="alpha")
    instance("g1", t(7, 0), t(7, 1), gpus=1, model="big", platform="hpc")
    instance("g1", t(7, 0), t(7, 2), gpus=0, cpus=2, model="small", platform="lab")  # same id, other platform
    request("g1", a, t(7, 0), t(7, 0, 6), 10, model="big", platform="hpc")
    request("g1", a, t(7, 0), t(7, 0, 12), 10, model="small", platform="lab")
    rep = report(*DEC, now=LATER)
    assert line(rep, "alpha", "big", "hpc").hours.gpu == pytest.approx(0.1)
    assert line(rep, "alpha", "small", "lab").hours.cpu == pytest.approx(0.4)
    assert [(i.platform, i.model) for i in rep.idle] == [("hpc", "big"), ("lab", "small")]
    balanced(rep)


def test_months_are_parsed_strictly_and_lie_in_the_sites_time_zone(settings: Any) -> None:
    assert parse_month("2026-12") == (2026, 12)
    for bad in ("2026-13", "2026-1", "12-2026", "", "2026-00", "x", "9999-12", "0000-01", "２０２６-12"):
        with pytest.raises(ValueError, match="month"):
            parse_month(bad)
    settings.TIME_ZONE = "Europe/Berlin"
    start, end = month_bounds(2026, 12)
    assert start == dt.datetime(2026, 11, 30, 23, tzinfo=UTC) and end == dt.datetime(2026, 12, 31, 23, tzinfo=UTC)


def test_runs_on_the_database_it_was_given() -> None:
    assert connection.vendor == os.environ.get("CHATAI_CHARGEBACK_DB", "sqlite")


@pytest.mark.postgres
def test_the_same_tests_pass_on_postgresql() -> None:
    """This file again in a child pytest with DB_ENGINE=postgresql (pytest-django makes and drops
    its test database there)."""
    if os.environ.get("CHATAI_CHARGEBACK_DB"):
        pytest.skip("already the child run")
    name = f"chatai_chargeback_{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "DB_ENGINE": "postgresql", "DB_NAME": name, "DB_USER": "postgres", "DB_HOST": "127.0.0.1",
           "CHATAI_CHARGEBACK_DB": "postgresql"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", __file__, "-k",
                           "not on_postgresql", "--create-db"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
