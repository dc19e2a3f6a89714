"""Reads of the resource API: the caller's limits left, projects, usage (counts only, never content), platforms."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from asgiref.sync import async_to_sync
from django.conf import settings
from django.db.models import Count, F, Q, QuerySet, Sum
from django.db.models.functions import TruncDate

from gateway import chargeback, registry
from gateway.budgets import budgets
from gateway.caller import Caller
from gateway.limits import NO_LIMITS, limiter
from gateway.models import UsageRecord
from gateway.projects import projects_of
from hpcbridge.registry import get_bridge

TOTALS = {"requests": Count("id"), "errors": Count("id", filter=Q(status__gte=400)),
          "prompt_tokens": Sum("prompt_tokens"), "completion_tokens": Sum("completion_tokens")}
LAST_NULL = F("project__name").asc(nulls_last=True)  # usage charged to no project last, on every database


def limits_of(caller: Caller) -> list[dict[str, Any]]:
    """Each set of counters the caller's requests count in (the user's; the key's own if it has a
    policy), with its limits and what is left of them now. Nothing is counted by reading."""
    out = []
    for subject, limits in caller.buckets():
        scope = "user" if subject == caller.subject else "key"
        out.append({"scope": scope, "limits": {} if limits == NO_LIMITS else limiter.peek_sync(subject, limits)})
    return out


def budgets_of(caller: Caller) -> list[dict[str, Any]]:
    """Each token budget the caller's requests count against (its project's, its groups', its own) in
    the current period: limit, used, remaining, when it resets. Nothing is counted by reading."""
    return [state.as_dict() for state in budgets.states_of(caller)]


def projects_of_caller(caller: Caller) -> list[dict[str, Any]]:
    """The user's projects (by name; the first is their default)."""
    return [{"name": p.name, "slurm_account": p.slurm_account} for p in projects_of(caller.user, caller.group_ids)]


def models_of(caller: Caller) -> list[dict[str, Any]]:
    entries = async_to_sync(registry.visible_models)(caller)
    return [{"id": e.id, "name": e.display_name or e.id, "status": e.status} for e in entries]


def _dated(rows: QuerySet[UsageRecord], start: dt.date | None, end: dt.date | None,
           project: str | None = None) -> QuerySet[UsageRecord]:
    if project is not None:
        rows = rows.filter(project__name=project)
    if start is not None:
        rows = rows.filter(created_at__date__gte=start)
    if end is not None:
        rows = rows.filter(created_at__date__lte=end)
    return rows


def _totals(row: Mapping[str, Any], **renamed: str) -> dict[str, Any]:
    """One row of counts with empty token sums as 0; ``renamed`` maps new names to the row's own."""
    out = {new: row[old] for new, old in renamed.items()}
    out.update((k, v) for k, v in row.items() if k not in renamed.values())
    return {**out, "prompt_tokens": row["prompt_tokens"] or 0, "completion_tokens": row["completion_tokens"] or 0}


def usage_of(user: Any, start: dt.date | None, end: dt.date | None,
             project: str | None = None) -> list[dict[str, Any]]:
    """The user's requests per day, model and project charged (days in the site's TIME_ZONE): counts and tokens."""
    rows = _dated(UsageRecord.objects.filter(user=user), start, end, project)
    return [_totals(r, project="project__name") for r in rows.annotate(day=TruncDate("created_at"))
            .values("day", "model", "project__name").annotate(**TOTALS).order_by("day", "model", LAST_NULL)]


def usage_all(start: dt.date | None, end: dt.date | None,
              project: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """Everyone's requests per user and model, per group and model (a user in two groups counts in both),
    and per project charged and model."""
    rows = _dated(UsageRecord.objects.all(), start, end, project)
    per_user = rows.values("user__username", "model").annotate(**TOTALS).order_by("user__username", "model")
    per_group = rows.values("user__groups__name", "model").annotate(**TOTALS).order_by("user__groups__name", "model")
    per_project = rows.values("project__name", "model").annotate(**TOTALS).order_by(LAST_NULL, "model")
    return {"by_user": [_totals(r, user="user__username") for r in per_user],
            "by_group": [_totals(r, group="user__groups__name") for r in per_group],
            "by_project": [_totals(r, project="project__name") for r in per_project]}


async def _platforms() -> list[dict[str, Any]]:
    bridge = get_bridge()
    out = []
    for name in bridge.platforms:
        models = await registry.platform_models(name)
        state = bridge.platforms[name].state()
        out.append({**state, "models": [
            {"id": m["id"], "status": str(m.get("status", "offline")), "instances": int(m.get("instances") or 0),
             "demand": int(m.get("demand") or 0),
             "start_estimate": m["start_estimate"] if isinstance(m.get("start_estimate"), (int, float)) else None}
            for m in models]})
    return out


def platforms_state() -> list[dict[str, Any]]:
    """Each platform's link (connections, streams, failures, last error) and its models' status,
    instances, demand (requests running or waiting, which includes those queued in Slurm) and
    Slurm's start estimate for a cold one (seconds; None when unknown)."""
    return async_to_sync(_platforms)()


# -- charge-back (staff) ---------------------------------------------------------------------------

def _hours(prefix: str, hours: chargeback.Hours) -> dict[str, float]:
    return {f"{prefix}node_hours": round(hours.node, 3), f"{prefix}gpu_hours": round(hours.gpu, 3),
            f"{prefix}cpu_hours": round(hours.cpu, 3)}


def _line(line: chargeback.Line) -> dict[str, Any]:
    return {"requests": line.requests, "prompt_tokens": line.prompt_tokens,
            "completion_tokens": line.completion_tokens, **_hours("", line.hours)}


def _idle(idle: chargeback.Idle) -> dict[str, Any]:
    return {"instances": idle.instances, "elapsed_hours": round(idle.elapsed_hours, 3),
            "busy_hours": round(idle.busy_hours, 3), "idle_hours": round(idle.idle_hours, 3),
            **_hours("", idle.total), **_hours("idle_", idle.idle)}


def chargeback_month(month: str, now: dt.datetime | None = None) -> dict[str, Any]:
    """The month's charge-back (``YYYY-MM`` in TIME_ZONE; ValueError naming ``month`` if malformed):
    per project, per project/platform/model, idle per platform/model, totals. Hours rounded to
    3 decimals here, once, so the page, its CSV and /api/admin/chargeback show the same numbers."""
    start, end = chargeback.month_bounds(*chargeback.parse_month(month))
    rep = chargeback.report(start, end, now)
    used, node = rep.totals()
    return {"month": month.strip(), "start": start.isoformat(), "end": end.isoformat(), "now": rep.now.isoformat(),
            "time_zone": settings.TIME_ZONE, "project": None,
            "projects": [{"project": p.project, **_line(p)} for p in rep.projects()],
            "lines": [{"project": x.project, "platform": x.platform, "model": x.model, **_line(x)} for x in rep.lines],
            "idle": [{"platform": i.platform, "model": i.model, **_idle(i)} for i in rep.idle],
            "totals": {**_line(used), **_idle(node)},
            "running_instances": rep.running, "unmatched_requests": rep.unmatched_requests}


def chargeback_only(data: Mapping[str, Any], project: str | None) -> dict[str, Any]:
    """The report with only one project's rows in ``projects`` and ``lines`` (None: all). Idle time
    and ``totals`` stay the instances' whole, which one project's rows are part of."""
    if project is None:
        return dict(data)
    return {**data, "project": project, "projects": [p for p in data["projects"] if p["project"] == project],
            "lines": [x for x in data["lines"] if x["project"] == project]}


CSV_COLUMNS = ["month", "kind", "project", "platform", "model", "requests", "prompt_tokens", "completion_tokens",
               "node_hours", "gpu_hours", "cpu_hours"]


def chargeback_csv_rows(data: Mapping[str, Any]) -> list[list[Any]]:
    """The report as CSV rows: each project's use of each model (kind ``usage``), then each model's
    idle time (kind ``idle``), so that a column's sum is all the instances' hours."""
    rows: list[list[Any]] = [CSV_COLUMNS]
    for x in data["lines"]:
        rows.append([data["month"], "usage", x["project"], x["platform"], x["model"], x["requests"],
                     x["prompt_tokens"], x["completion_tokens"], x["node_hours"], x["gpu_hours"], x["cpu_hours"]])
    for i in data["idle"]:
        rows.append([data["month"], "idle", "", i["platform"], i["model"], "", "", "", i["idle_node_hours"],
                     i["idle_gpu_hours"], i["idle_cpu_hours"]])
    return rows


def usage_month(user: Any, month: str) -> dict[str, Any]:
    """The user's requests and tokens per day and model in a month (``YYYY-MM``, days in TIME_ZONE)."""
    year, number = chargeback.parse_month(month)
    days = chargeback.month_days(year, number)
    rows = usage_of(user, days[0], days[-1])
    return {"month": month.strip(), "days": days, "rows": rows}
