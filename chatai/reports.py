"""Report pages: the staff's charge-back per month (page, CSV) and a user's own usage per month.

Both read through api.selectors, as /api/admin/chargeback and /api/usage do, so a page, its CSV and
the API show the same numbers. Charts are inline SVG from chatai.charts: no script needed.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from typing import Any

from django.contrib.admin.views.decorators import staff_member_required
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from api import selectors
from chatai.charts import stacked_bars
from common.csvcells import safe_row
from gateway.chargeback import current_month


def _month(request: HttpRequest) -> str:
    return request.GET.get("month", "").strip() or current_month()


def _project(request: HttpRequest) -> str | None:
    return request.GET.get("project", "").strip()[:100] or None


def _month_error(request: HttpRequest, template: str, month: str, error: str) -> HttpResponse:
    return render(request, template, {"month": month[:20], "error": error}, status=400)


def chargeback_chart(data: dict[str, Any]) -> Any:
    """One bar per project and one for idle time, stacked by model (platform/model): GPU-hours when
    any instance in the month had GPUs, else CPU-hours."""
    unit = "GPU-hours" if data["totals"]["gpu_hours"] > 0 else "CPU-hours"
    key = "gpu_hours" if unit == "GPU-hours" else "cpu_hours"
    projects = [p["project"] for p in data["projects"]]
    categories = [*projects, "(idle)"]
    values: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(categories))
    for line in data["lines"]:
        if line[key] > 0:
            values[_model(line)][projects.index(line["project"])] += line[key]
    for idle in data["idle"]:
        if idle[f"idle_{key}"] > 0:
            values[_model(idle)][-1] += idle[f"idle_{key}"]
    return stacked_bars(f"{unit} per project, {data['month']}", categories, sorted(values.items()), unit)


def _model(row: dict[str, Any]) -> str:
    return f"{row['platform']}/{row['model']}" if row["platform"] else row["model"]


@staff_member_required
@require_GET
def chargeback(request: HttpRequest) -> HttpResponse:
    """Staff: the month's requests, tokens and node hours per project and model, idle time apart."""
    month = _month(request)
    try:
        data = selectors.chargeback_month(month)
    except ValueError as exc:
        return _month_error(request, "chargeback.html", month, str(exc))
    names = [p["project"] for p in data["projects"]]
    data = selectors.chargeback_only(data, _project(request))
    return render(request, "chargeback.html", {"month": data["month"], "data": data, "chart": chargeback_chart(data),
                                               "names": names})


@staff_member_required
@require_GET
def chargeback_csv(request: HttpRequest) -> HttpResponse:
    """The page's numbers as CSV: one row per project and model, then one per model's idle time."""
    month = _month(request)
    try:
        data = selectors.chargeback_month(month)
    except ValueError as exc:
        return HttpResponse(str(exc), status=400, content_type="text/plain; charset=utf-8")
    data = selectors.chargeback_only(data, _project(request))
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="chargeback-{data["month"]}.csv"'
    writer = csv.writer(response)
    for row in selectors.chargeback_csv_rows(data):
        writer.writerow(safe_row(row))
    return response


@login_required
@require_GET
def usage(request: HttpRequest) -> HttpResponse:
    """The signed-in user's tokens per day and model in a month: a chart and a table."""
    month = _month(request)
    try:
        data = selectors.usage_month(request.user, month)
    except ValueError as exc:
        return _month_error(request, "usage.html", month, str(exc))
    days = data["days"]
    index = {day: i for i, day in enumerate(days)}
    per_model: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(days))
    totals: dict[str, dict[str, int]] = defaultdict(lambda: {"requests": 0, "prompt_tokens": 0,
                                                             "completion_tokens": 0})
    for row in data["rows"]:
        if row["day"] in index:
            per_model[row["model"]][index[row["day"]]] += row["prompt_tokens"] + row["completion_tokens"]
        for k in ("requests", "prompt_tokens", "completion_tokens"):
            totals[row["model"]][k] += row[k]
    chart = stacked_bars(f"Tokens per day and model, {data['month']}", [str(d.day) for d in days],
                         sorted(per_model.items()), "tokens")
    response = render(request, "usage.html", {"month": data["month"], "rows": data["rows"], "chart": chart,
                                              "totals": sorted(totals.items())})
    response["Cache-Control"] = "no-store"
    return response
