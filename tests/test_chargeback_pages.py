"""The charge-back report (staff page, CSV, /api/admin/chargeback) and a user's usage page, in process
on the test database: the same numbers everywhere, charts that are well-formed SVG with hostile
names escaped, and nobody but staff seeing anyone else's numbers. In Chromium: tests/test_browser_reports.py."""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client

from chatai.charts import stacked_bars
from gateway.models import NodeTime, Project, UsageRecord

pytestmark = pytest.mark.django_db
UTC = dt.UTC
HOSTILE = '<script>alert("x")</script>&"\'</svg><b>'
SVG_NS = "{http://www.w3.org/2000/svg}"


class Tables(HTMLParser):
    """The text of every cell of every table with an id, and the inline <svg> elements' source."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._in_body = False
        self.feed(html)
        self.svgs = re.findall(r"<svg\b.*?</svg>", html, re.S)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._table = dict(attrs).get("id")
            self.tables[self._table or ""] = []
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body and self._table:
            self.tables[self._table].append([])
        elif tag == "td" and self._in_body and self._table:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._table:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tbody":
            self._in_body = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def svg_root(text: str) -> ET.Element:
    """The chart parsed as XML (raises unless well-formed): the app's own output, no entities."""
    return ET.fromstring(text)  # noqa: S314 - the app's own SVG under test


def t(day: int, hour: int, minute: int = 0) -> dt.datetime:
    return dt.datetime(2026, 11, day, hour, minute, tzinfo=UTC)  # a month past: no instance runs on into "now"


@pytest.fixture(autouse=True)
def utc(settings: Any) -> None:
    settings.TIME_ZONE = "UTC"


@pytest.fixture
def month() -> str:
    """November 2026: two projects (one with a hostile name) on a GPU instance, one on a CPU instance."""
    alpha, evil = Project.objects.create(name="alpha"), Project.objects.create(name=HOSTILE)
    user = User.objects.create_user("pat", password="pw-pat-123")
    NodeTime.objects.create(platform="hpc", instance="g1", model="big", started_at=t(2, 10), ended_at=t(2, 14),
                            gpus=2, cpus=8, source="sacct")
    NodeTime.objects.create(platform="hpc", instance="c1", model="small", started_at=t(3, 0), ended_at=t(3, 3),
                            gpus=0, cpus=4, source="hpcside")

    def use(inst: str, model: str, project: Project | None, began: dt.datetime, ended: dt.datetime,
            tokens: int) -> None:
        UsageRecord.objects.create(user=user, model=model, endpoint="chat", status=200, created_at=ended,
                                   duration_ms=int((ended - began).total_seconds() * 1000), prompt_tokens=tokens // 2,
                                   completion_tokens=tokens - tokens // 2, project=project, platform="hpc",
                                   instance=inst)

    use("g1", "big", alpha, t(2, 10), t(2, 11), 300)
    use("g1", "big", evil, t(2, 10, 30), t(2, 11), 100)
    use("c1", "small", None, t(3, 1), t(3, 1, 30), 50)
    return "2026-11"


def staff_client() -> Client:
    User.objects.create_user("sam", password="pw-sam-123", is_staff=True)
    client = Client()
    client.login(username="sam", password="pw-sam-123")
    return client


def user_client(name: str = "pat") -> Client:
    if not User.objects.filter(username=name).exists():
        User.objects.create_user(name, password=f"pw-{name}-123")
    client = Client()
    client.login(username=name, password=f"pw-{name}-123")
    return client


def test_the_page_the_csv_and_the_api_show_the_same_numbers(month: str) -> None:
    client = staff_client()
    page = client.get(f"/admin/chargeback/?month={month}")
    assert page.status_code == 200
    tables = Tables(page.content.decode())
    rows = list(csv.reader(io.StringIO(client.get(f"/admin/chargeback/csv?month={month}").content.decode())))
    assert rows[0] == ["month", "kind", "project", "platform", "model", "requests", "prompt_tokens",
                       "completion_tokens", "node_hours", "gpu_hours", "cpu_hours"]
    usage = [r for r in rows[1:] if r[1] == "usage"]
    idle = [r for r in rows[1:] if r[1] == "idle"]
    # The page's "per project and model" table, cell by cell: project, platform, model, requests, tokens, hours.
    page_lines = [[c[0], c[1], c[2], c[3], c[4], c[5], c[8], c[6], c[7]] for c in tables.tables["lines-table"]]
    assert page_lines == [[r[2].removeprefix("'"), r[3], r[4], *r[5:]] for r in usage]
    assert [r[2] for r in usage] == [HOSTILE, "alpha", "(no project)"]  # by name, "<" before "a"
    # alpha: 3/4 of 1 busy hour on 2 GPUs; the hostile project 1/4; no project: half an hour on 4 CPUs
    assert [(r[9], r[10]) for r in usage] == [("0.5", "0.0"), ("1.5", "0.0"), ("0.0", "2.0")]
    page_idle = [[c[0], c[1], c[8], c[6], c[7]] for c in tables.tables["idle-table"]]
    assert page_idle == [[r[3], r[4], *r[8:]] for r in idle] == [["hpc", "big", "3.0", "6.0", "0.0"],
                                                                 ["hpc", "small", "2.5", "0.0", "10.0"]]
    api = client.get(f"/api/admin/chargeback?month={month}").json()
    assert [[x["project"], x["gpu_hours"], x["cpu_hours"]] for x in api["lines"]] == [
        [HOSTILE, 0.5, 0.0], ["alpha", 1.5, 0.0], ["(no project)", 0.0, 2.0]]
    assert api["totals"]["gpu_hours"] == 8.0 and api["totals"]["idle_cpu_hours"] == 10.0
    assert [p["project"] for p in api["projects"]] == [HOSTILE, "alpha", "(no project)"]
    documented = client.get("/api/schema").json()["paths"]["/api/admin/chargeback"]["get"]
    assert documented["operationId"] == "admin_chargeback"
    shape = client.get("/api/schema").json()["components"]["schemas"]["Chargeback"]
    for part in (shape, shape["properties"]["totals"], shape["properties"]["idle"]["items"]):
        assert len(part["required"]) == len(set(part["required"])) and set(part["required"]) <= set(part["properties"])
    assert set(api) == set(shape["properties"])
    assert set(api["totals"]) == set(shape["properties"]["totals"]["properties"])


def test_the_chart_is_well_formed_svg_and_a_hostile_project_name_is_only_text(month: str) -> None:
    page = staff_client().get(f"/admin/chargeback/?month={month}").content.decode()
    assert "<script>alert" not in page  # escaped in the tables and the chart alike
    [svg] = Tables(page).svgs
    root = svg_root(svg)  # well-formed XML, or this raises
    assert root.tag == f"{SVG_NS}svg"
    texts = ["".join(e.itertext()) for e in root.iter(f"{SVG_NS}text")]
    assert any(HOSTILE[:20] in x for x in texts), texts  # the name survives as text
    assert not list(root.iter(f"{SVG_NS}script")) and not list(root.iter("b"))
    bars = {e.find(f"{SVG_NS}title").text for e in root.iter(f"{SVG_NS}rect") if e.find(f"{SVG_NS}title") is not None}
    assert "alpha, hpc/big: 1.50 GPU-hours" in bars and "(idle), hpc/big: 6 GPU-hours" in bars


def test_the_chart_function_escapes_every_label_and_attribute() -> None:
    svg = stacked_bars(HOSTILE, [HOSTILE, "b"], [(HOSTILE, [1.0, 2.0]), ("m", [0.5, 0.0])], HOSTILE)
    root = svg_root(str(svg))
    assert [e for e in root.iter() if e.tag.split("}")[-1] in ("script", "b")] == []
    assert root.find(f"{SVG_NS}title").text == HOSTILE
    assert {e.get("data-series") for e in root.iter(f"{SVG_NS}text") if e.get("data-series")} == {HOSTILE, "m"}
    svg_root(str(stacked_bars("empty", [], [], "tokens")))  # no data: still a chart


def test_a_bad_month_is_refused_naming_it(month: str) -> None:
    client = staff_client()
    assert client.get("/admin/chargeback/?month=2026-13").status_code == 400
    assert b"YYYY-MM" in client.get("/admin/chargeback/csv?month=12-2026").content
    response = client.get("/api/admin/chargeback?month=2026-1")
    assert response.status_code == 400 and response.json()["error"]["param"] == "month"
    assert client.get("/api/admin/chargeback").status_code == 200  # this month by default


def test_only_staff_see_the_charge_back(month: str) -> None:
    client = user_client()
    for path in (f"/admin/chargeback/?month={month}", f"/admin/chargeback/csv?month={month}"):
        response = client.get(path)
        assert response.status_code == 302 and "/login" in response["Location"], path
    assert client.get(f"/api/admin/chargeback?month={month}").status_code == 403
    assert Client().get(f"/api/admin/chargeback?month={month}").status_code in (401, 403)
    assert "Charge-back" not in client.get("/usage/").content.decode()


def test_the_usage_page_shows_my_tokens_per_day_and_model_and_nobody_elses(month: str) -> None:
    other = user_client("quinn")
    UsageRecord.objects.create(user=User.objects.get(username="quinn"), model="secret-model", endpoint="chat",
                               status=200, created_at=t(4, 12), prompt_tokens=7, completion_tokens=7)
    page = user_client().get(f"/usage/?month={month}")
    assert page.status_code == 200 and page["Cache-Control"] == "no-store"
    html = page.content.decode()
    tables = Tables(html)
    assert tables.tables["usage-totals"] == [["big", "2", "200", "200"], ["small", "1", "25", "25"]]
    assert [r[:4] for r in tables.tables["usage-table"]] == [["2026-11-02", "big", HOSTILE, "1"],
                                                             ["2026-11-02", "big", "alpha", "1"],
                                                             ["2026-11-03", "small", "–", "1"]]
    assert "secret-model" not in html
    [svg] = tables.svgs
    root = svg_root(svg)
    bars = {e.find(f"{SVG_NS}title").text for e in root.iter(f"{SVG_NS}rect") if e.find(f"{SVG_NS}title") is not None}
    assert bars == {"2, big: 400 tokens", "3, small: 50 tokens"}
    assert "secret-model" in other.get(f"/usage/?month={month}").content.decode()
    assert user_client().get("/usage/?month=nope").status_code == 400
    assert Client().get("/usage/").status_code == 302  # signed in only


def test_one_projects_rows_on_the_page_in_the_csv_and_the_api(month: str) -> None:
    client = staff_client()
    page = client.get("/admin/chargeback/", {"month": month, "project": HOSTILE})
    tables = Tables(page.content.decode())
    assert [r[0] for r in tables.tables["lines-table"]] == [HOSTILE]
    assert [r[0] for r in tables.tables["projects-table"]] == [HOSTILE]
    assert len(tables.tables["idle-table"]) == 2  # the instances' idle time stays whole
    assert "&amp;project=%3Cscript%3E" in page.content.decode()  # the CSV and JSON links keep the choice
    rows = list(csv.reader(io.StringIO(client.get("/admin/chargeback/csv", {"month": month,
                                                                           "project": "alpha"}).content.decode())))
    assert [(r[1], r[2]) for r in rows[1:]] == [("usage", "alpha"), ("idle", ""), ("idle", "")]
    api = client.get("/api/admin/chargeback", {"month": month, "project": "(no project)"}).json()
    assert api["project"] == "(no project)" and [x["cpu_hours"] for x in api["lines"]] == [2.0]
    assert api["totals"]["gpu_hours"] == 8.0  # the whole, as without the filter
    everyone = client.get("/api/admin/chargeback", {"month": month, "project": ""}).json()  # empty: as not given
    assert everyone["project"] is None and len(everyone["lines"]) == 3
