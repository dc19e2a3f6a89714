"""The usage page and the staff's charge-back report in Debian's Chromium, on the live app: real
requests through /v1 to the stand-in model (usage rows with the platform and instance that served
them), the instance's node time collected by ``manage.py collect_nodetime`` from hpcside's own
records, then a user's chart and table of their tokens, and the staff's report, month picker and
CSV download with the same numbers as the page. Screenshots go to test-artifacts/."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.oidc import ARTIFACTS
from tests.live import LiveApp, stub_service
from tests.test_api import call, wait_ready
from tests.test_browser import CHROMIUM, launch_chromium, wait_js, watched_page
from tests.test_chargeback_pages import svg_root

pytestmark = [pytest.mark.browser, pytest.mark.live]

playwright_api = pytest.importorskip("playwright.sync_api")
SVG_NS = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is missing: scripts/test.sh installs it (apt-get install chromium)")
    app = LiveApp(services=stub_service("stub", "stub-model", min_instances=1, idle_timeout="10m"),
                  extra_env={"PROJECTS": json.dumps({"alpha": ["alpha-group"]})})
    try:
        app.start()
        app.create_user("pat", groups=("alpha-group",))
        app.create_user("sam")
        app.shell("from django.contrib.auth.models import User\n"
                  "User.objects.filter(username='sam').update(is_staff=True)")
        key = app.create_key("pat", "--project", "alpha")
        wait_ready(app, key, "stub-model")
        for delay in (1.0, 0.0, 0.0):  # one of about 7 s (a word a second), two quick ones
            body = {"model": "stub-model", "messages": [{"role": "user", "content": "hi"}], "stub_delay": delay}
            assert call(app, "POST", "/v1/chat/completions", key, body)[0] == 200
        app.shell("import time\nfrom gateway.models import UsageRecord\n"
                  "for _ in range(100):\n"
                  "    if UsageRecord.objects.exclude(instance='').count() >= 3: break\n"
                  "    time.sleep(0.1)\n")
        assert "1 new" in app.manage("collect_nodetime"), app.manage("collect_nodetime")
        with playwright_api.sync_playwright() as pw:
            browser = launch_chromium(pw)
            yield app, browser
            browser.close()
    finally:
        app.stop()


def sign_in(browser, app: LiveApp, username: str):  # type: ignore[no-untyped-def]
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    page, errors = watched_page(context)
    page.goto(f"{app.url}/accounts/login/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", f"pw-{username}-123")
    page.click("button[type=submit], input[type=submit]")
    page.wait_for_url(f"{app.url}/")
    return context, page, errors


def shot(page, name: str) -> None:  # type: ignore[no-untyped-def]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def chart_bars(page, selector: str) -> set[str]:  # type: ignore[no-untyped-def]
    svg = page.locator(f"{selector} svg").evaluate("e => e.outerHTML")
    root = svg_root(svg)
    return {e.find(f"{SVG_NS}title").text for e in root.iter(f"{SVG_NS}rect")  # type: ignore[union-attr]
            if e.find(f"{SVG_NS}title") is not None}


def cells(page, table: str) -> list[list[str]]:  # type: ignore[no-untyped-def]
    return page.locator(f"#{table} tbody tr").evaluate_all(
        "rows => rows.map(r => Array.from(r.cells).map(c => c.textContent.trim()))")


def test_a_user_sees_their_tokens_per_day_and_model_in_a_chart_and_a_table(stack: tuple) -> None:
    app, browser = stack
    context, page, errors = sign_in(browser, app, "pat")
    page.click("nav >> text=Usage")
    page.wait_for_selector("#usage-chart svg")
    assert page.locator("nav >> text=Charge-back").count() == 0  # not staff
    bars = chart_bars(page, "#usage-chart")
    [bar] = bars
    assert ", stub-model: " in bar and bar.endswith(" tokens"), bars
    [[model, requests, prompt, completion]] = cells(page, "usage-totals")
    assert (model, requests) == ("stub-model", "3") and int(completion) > 0
    assert f"{int(prompt) + int(completion):,} tokens" in bar
    # The chart is drawn: the browser lays out a bar of real height.
    assert page.locator("#usage-chart svg rect").first.bounding_box()["height"] > 10
    shot(page, "usage-page")
    # Another month through the picker: nothing in it.
    page.fill("#month", "2020-01")
    page.click("#month-form button[type=submit]")
    page.wait_for_url("**/usage/?month=2020-01")
    assert cells(page, "usage-totals") == [["No requests this month."]]
    # Not staff: the report is not theirs.
    page.goto(f"{app.url}/admin/chargeback/")
    assert "/admin/login/" in page.url
    assert errors == []
    context.close()


def test_staff_see_the_charge_back_with_a_chart_and_download_the_same_numbers(stack: tuple) -> None:
    app, browser = stack
    context, page, errors = sign_in(browser, app, "sam")
    page.click("nav >> text=Charge-back")
    page.wait_for_selector("#chargeback-chart svg")
    [alpha] = cells(page, "projects-table")
    assert alpha[:2] == ["alpha", "3"] and float(alpha[5]) > 0, alpha  # CPU-hours: the stub runs on 1 CPU
    [idle] = cells(page, "idle-table")
    assert idle[:3] == ["local", "stub-model", "1"] and float(idle[3]) >= float(idle[4]) > 0, idle
    bars = chart_bars(page, "#chargeback-chart")
    assert any(b.startswith("alpha, local/stub-model: ") for b in bars), bars
    assert any(b.startswith("(idle), local/stub-model: ") for b in bars), bars
    shot(page, "chargeback-page")
    with page.expect_download() as download:
        page.click("#csv-link")
    rows = list(csv.reader(io.StringIO(Path(download.value.path()).read_text())))
    usage = [r for r in rows if r[1] == "usage"]
    lines = cells(page, "lines-table")
    assert [[r[2], r[3], r[4], r[5], r[6], r[7], r[9], r[10], r[8]] for r in usage] == lines
    [idle_row] = [r for r in rows if r[1] == "idle"]
    # Idle time runs on while the instance does (its node time counts to now): the download, a moment
    # after the page, may be one rounding step (0.001 h = 3.6 s) ahead of it.
    pairs = zip([idle_row[8], idle_row[9], idle_row[10]], [idle[8], idle[6], idle[7]], strict=True)
    for csv_cell, page_cell in pairs:
        assert 0 <= float(csv_cell) - float(page_cell) <= 0.0021, (idle_row, idle)
    # One project's rows, through the select.
    page.select_option("#project", "alpha")
    page.click("#month-form button[type=submit]")
    wait_js(page, "location.search.includes('project=alpha')")
    assert [r[0] for r in cells(page, "lines-table")] == ["alpha"]
    assert "project=alpha" in (page.get_attribute("#csv-link", "href") or "")
    # A month without anything, through the picker.
    page.select_option("#project", "")
    page.fill("#month", "2020-01")
    page.click("#month-form button[type=submit]")
    wait_js(page, "location.search === '?month=2020-01&project='")
    assert cells(page, "projects-table") == [["No usage this month."]]
    assert errors == []
    context.close()
