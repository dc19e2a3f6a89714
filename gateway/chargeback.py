"""Node hours charged back to projects (docs/accounting.md, "How node hours are divided").

Each instance's node time in a period (``NodeTime``: start to end, or to now while it runs, clipped
to the period) is split in two:

- **busy**: the union of the instance's request intervals (a usage row's ``created_at`` is when the
  request ended, ``duration_ms`` how long it took), clipped to the instance's life and the period.
  Busy hours are divided among projects in proportion to the tokens (prompt plus completion) each
  had served by that instance in the period; usage without a project goes to ``(no project)``.
  Where an instance's requests carried no tokens at all, by their number instead.
- **idle**: the rest, shown apart per platform and model and charged to nobody. Keeping a model
  warm (``min_instances``, ``idle_timeout``) is the centre's decision, not a project's: spread by
  tokens, the one user who asked a single question of a model at night would pay for the whole
  night. With idle shown apart, the centre charges it as overhead or spreads it as it sees fit,
  and every hour appears exactly once: projects' hours + idle hours = node hours.

Hours are GPU-hours (``gpus`` x elapsed) for an instance with GPUs, else CPU-hours (``cpus`` x
elapsed); node hours (``nodes`` x elapsed) are given for every instance.

Everything per request is aggregated in the database: the tokens per instance and project with
``values().annotate()``, and the busy time with one windowed query (each request adds the part of
its interval beyond the latest end of the requests that started before it: the length of the
union, without sorting rows in Python). It runs on SQLite and PostgreSQL (``Epoch`` below is the
only vendor-specific part). Python only walks instances and their projects.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import defaultdict
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from django.conf import settings
from django.db import NotSupportedError, connection
from django.db.models import (
    Count,
    ExpressionWrapper,
    F,
    FloatField,
    Func,
    OuterRef,
    Q,
    Subquery,
    Sum,
    Value,
)
from django.db.models.functions import Coalesce, Greatest, Least
from django.utils import timezone

from gateway.models import NodeTime, UsageRecord

NO_PROJECT = "(no project)"
MONTH = re.compile(r"([0-9]{4})-([0-9]{2})")  # ASCII digits only: \d matches any script's digits


class Epoch(Func):
    """Seconds since the Unix epoch of a datetime column, as a float (SQLite and PostgreSQL)."""

    output_field = FloatField()

    def as_sqlite(self, compiler, connection, **extra):  # type: ignore[no-untyped-def]
        # Django stores UTC text; julianday() reads it to the millisecond.
        return self.as_sql(compiler, connection, template="((julianday(%(expressions)s) - 2440587.5) * 86400.0)",
                           **extra)

    def as_postgresql(self, compiler, connection, **extra):  # type: ignore[no-untyped-def]
        return self.as_sql(compiler, connection, template="EXTRACT(EPOCH FROM %(expressions)s)::double precision",
                           **extra)

    def as_sql(self, compiler, connection, **extra):  # type: ignore[no-untyped-def]
        if "template" not in extra:
            raise NotSupportedError(f"the charge-back runs on SQLite and PostgreSQL, not {connection.vendor}")
        return super().as_sql(compiler, connection, **extra)


# -- periods ---------------------------------------------------------------------------------------

def parse_month(text: str) -> tuple[int, int]:
    """``YYYY-MM`` -> (year, month); ValueError with a message naming ``month`` otherwise."""
    match = MONTH.fullmatch(text.strip())
    if not match or not 1 <= int(match.group(2)) <= 12 or not 1970 <= int(match.group(1)) <= 9998:
        raise ValueError("month: a month as YYYY-MM, e.g. 2026-12")
    return int(match.group(1)), int(match.group(2))


def month_bounds(year: int, month: int) -> tuple[dt.datetime, dt.datetime]:
    """The calendar month in settings.TIME_ZONE (as budgets count it): [start, end)."""
    zone = ZoneInfo(settings.TIME_ZONE)
    following = (year + 1, 1) if month == 12 else (year, month + 1)
    return dt.datetime(year, month, 1, tzinfo=zone), dt.datetime(*following, 1, tzinfo=zone)


def current_month(now: dt.datetime | None = None) -> str:
    local = (now or timezone.now()).astimezone(ZoneInfo(settings.TIME_ZONE))
    return f"{local.year:04d}-{local.month:02d}"


def month_days(year: int, month: int) -> list[dt.date]:
    start, end = month_bounds(year, month)
    return [start.date() + dt.timedelta(days=i) for i in range((end.date() - start.date()).days)]


# -- the report ------------------------------------------------------------------------------------

@dataclass
class Hours:
    """Node, GPU and CPU hours (an instance with GPUs counts GPU-hours, one without CPU-hours)."""

    node: float = 0.0
    gpu: float = 0.0
    cpu: float = 0.0

    def add(self, other: Hours, share: float = 1.0) -> None:
        self.node += other.node * share
        self.gpu += other.gpu * share
        self.cpu += other.cpu * share


@dataclass
class Line:
    """One project's use of one model on one platform in the period (platform "" for an external
    provider: tokens but no node hours)."""

    project: str
    platform: str
    model: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    hours: Hours = field(default_factory=Hours)


@dataclass
class Idle:
    """One model's instances on one platform: their node time in the period, busy and idle."""

    platform: str
    model: str
    instances: int = 0
    elapsed_hours: float = 0.0  # wall-clock hours of all its instances, summed
    busy_hours: float = 0.0
    total: Hours = field(default_factory=Hours)
    idle: Hours = field(default_factory=Hours)

    @property
    def idle_hours(self) -> float:
        return self.elapsed_hours - self.busy_hours


@dataclass
class Report:
    start: dt.datetime
    end: dt.datetime
    now: dt.datetime
    lines: list[Line]  # by project (no project last), platform, model
    idle: list[Idle]  # by platform, model
    running: int = 0  # instances still running, counted to ``now``
    unmatched_requests: int = 0  # requests of instances without a node-time row (not collected yet)

    def projects(self) -> list[Line]:
        """The lines summed per project (platform and model empty), in the lines' order."""
        out: dict[str, Line] = {}
        for line in self.lines:
            total = out.setdefault(line.project, Line(line.project, "", ""))
            total.requests += line.requests
            total.prompt_tokens += line.prompt_tokens
            total.completion_tokens += line.completion_tokens
            total.hours.add(line.hours)
        return list(out.values())

    def totals(self) -> tuple[Line, Idle]:
        """Everything summed: the projects' lines, and the instances' node time."""
        used = Line("", "", "")
        for line in self.lines:
            used.requests += line.requests
            used.prompt_tokens += line.prompt_tokens
            used.completion_tokens += line.completion_tokens
            used.hours.add(line.hours)
        node = Idle("", "")
        for idle in self.idle:
            node.instances += idle.instances
            node.elapsed_hours += idle.elapsed_hours
            node.busy_hours += idle.busy_hours
            node.total.add(idle.total)
            node.idle.add(idle.idle)
        return used, node


@dataclass
class _Instance:
    platform: str
    instance: str
    model: str
    start: float  # epoch seconds, clipped to the period
    end: float
    nodes: int
    gpus: int
    cpus: int
    running: bool

    def hours(self, seconds: float) -> Hours:
        hours = seconds / 3600.0
        if self.gpus > 0:
            return Hours(self.nodes * hours, self.gpus * hours, 0.0)
        return Hours(self.nodes * hours, 0.0, self.cpus * hours)


def _instances(start: dt.datetime, end: dt.datetime, now: dt.datetime) -> dict[tuple[str, str], _Instance]:
    """The instances that ran in [start, end), their time clipped to it (a running one's to now)."""
    rows = NodeTime.objects.filter(started_at__lt=min(end, now)).filter(
        Q(ended_at__isnull=True) | Q(ended_at__gt=start))
    out = {}
    for nt in rows.values("platform", "instance", "model", "started_at", "ended_at", "nodes", "gpus", "cpus"):
        first = max(nt["started_at"], start)
        last = min(nt["ended_at"] or now, end, now)
        if last > first:
            out[nt["platform"], nt["instance"]] = _Instance(
                nt["platform"], nt["instance"], nt["model"], first.timestamp(), last.timestamp(),
                nt["nodes"], nt["gpus"], nt["cpus"], nt["ended_at"] is None)
    return out


def _busy_seconds(start: dt.datetime, end: dt.datetime, now: dt.datetime) -> dict[tuple[str, str], float]:
    """Per (platform, instance): the length of the union of its requests' intervals, each clipped to
    the period and to the instance's life. One query: a window function does the sweep."""
    life = NodeTime.objects.filter(platform=OuterRef("platform"), instance=OuterRef("instance"))
    p0, p1 = Value(start.timestamp()), Value(min(end, now).timestamp())
    ended = Epoch(F("created_at"))
    began = ExpressionWrapper(ended - F("duration_ms") / Value(1000.0), output_field=FloatField())
    clipped = (UsageRecord.objects.filter(created_at__gte=start, created_at__lt=end).exclude(instance="")
               .annotate(life_start=Epoch(Subquery(life.values("started_at")[:1])),
                         life_end=Coalesce(Epoch(Subquery(life.values("ended_at")[:1])), p1))
               .filter(life_start__isnull=False)  # no node-time row: no hours to divide
               .annotate(a=Greatest(began, F("life_start"), p0), b=Least(ended, F("life_end"), p1))
               .values("platform", "instance", "a", "b"))
    sql, params = clipped.query.sql_with_params()
    # Sorted by start, each interval adds max(0, b - max(a, reached)), where reached is the furthest
    # end of the intervals before it: together, the union's length. The window and the sum are
    # written here rather than through the ORM so that the clipped ends are computed once per row
    # (an ORM window repeats the expressions in its ORDER BY: about 40 % slower, measured).
    outer = ("SELECT platform, instance, SUM(CASE WHEN reached IS NULL THEN b - a "  # noqa: S608 - no input in it
             "WHEN b > reached THEN b - CASE WHEN a > reached THEN a ELSE reached END ELSE 0 END) FROM ("
             "SELECT platform, instance, a, b, MAX(b) OVER (PARTITION BY platform, instance ORDER BY a, b "
             "ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS reached "
             f"FROM ({sql}) AS clipped WHERE b > a) AS runs GROUP BY platform, instance")
    with connection.cursor() as cursor:
        cursor.execute(outer, params)
        return {(platform, instance): float(busy or 0.0) for platform, instance, busy in cursor.fetchall()}


def report(start: dt.datetime, end: dt.datetime, now: dt.datetime | None = None) -> Report:
    """Requests, tokens and node hours per project, platform and model in [start, end), and the
    instances' idle time per platform and model. ``now`` ends running instances (default: now)."""
    now = now or timezone.now()
    instances = _instances(start, end, now)
    busy = _busy_seconds(start, end, now)
    usage = UsageRecord.objects.filter(created_at__gte=start, created_at__lt=end)

    lines: dict[tuple[str, str, str], Line] = {}

    def line(project: str | None, platform: str, model: str) -> Line:
        key = (project or NO_PROJECT, platform, model)
        return lines.setdefault(key, Line(*key))

    for row in usage.values("project__name", "platform", "model").annotate(
            requests=Count("id"), prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens")):
        out = line(row["project__name"], row["platform"], row["model"])
        out.requests, out.prompt_tokens, out.completion_tokens = row["requests"], row["prompt"] or 0, \
            row["completion"] or 0

    # Tokens (and requests) per instance and project: the weights of the busy hours.
    weights: dict[tuple[str, str], dict[str | None, tuple[int, int]]] = defaultdict(dict)
    unmatched = 0
    for served in (usage.exclude(instance="").values("platform", "instance", "project__name")
                   .annotate(tokens=Sum(F("prompt_tokens") + F("completion_tokens")), requests=Count("id"))):
        where = (served["platform"], served["instance"])
        if where not in instances:
            unmatched += served["requests"]
            continue
        weights[where][served["project__name"]] = (served["tokens"] or 0, served["requests"])

    idle: dict[tuple[str, str], Idle] = {}
    for where, inst in sorted(instances.items()):
        elapsed = inst.end - inst.start
        used = min(busy.get(where, 0.0), elapsed)
        per_model = idle.setdefault((inst.platform, inst.model), Idle(inst.platform, inst.model))
        per_model.instances += 1
        per_model.elapsed_hours += elapsed / 3600.0
        per_model.busy_hours += used / 3600.0
        per_model.total.add(inst.hours(elapsed))
        per_model.idle.add(inst.hours(elapsed - used))
        shares = weights.get(where, {})
        by_tokens = sum(t for t, _ in shares.values())
        by_requests = sum(r for _, r in shares.values())
        for project, (tokens, requests) in shares.items():
            share = tokens / by_tokens if by_tokens else requests / by_requests if by_requests else 0.0
            line(project, inst.platform, inst.model).hours.add(inst.hours(used), share)

    running = sum(1 for inst in instances.values() if inst.running)
    ordered = sorted(lines.values(), key=lambda x: (x.project == NO_PROJECT, x.project, x.platform, x.model))
    return Report(start, end, now, ordered, [idle[k] for k in sorted(idle)], running, unmatched)

