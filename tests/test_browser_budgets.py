"""Token budgets in the chat, in Chromium on the live app: a warning once the current project's budget
is 80 % used (from GET /api/me, after each reply too), and a clear message, with no "try again in
seconds", when a message is refused because the budget is spent."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.live import LiveApp, stub_service
from tests.test_browser import CHROMIUM, launch_chromium, send, shot, wait_idle, wait_js, watched_page

pytestmark = [pytest.mark.browser, pytest.mark.live]

playwright_api = pytest.importorskip("playwright.sync_api")
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is missing: scripts/test.sh installs it (apt-get install chromium)")
    app = LiveApp(services=stub_service("stub", "stub-model", min_instances=1))
    try:
        app.start()
        app.create_user("quinn")
        # 85 of climate's 100 tokens this month were spent before (rows in the database only: the
        # counter is built from them at its first use).
        app.shell("from django.contrib.auth.models import User\n"
                  "from gateway.models import Budget, Project, UsageRecord\n"
                  "u = User.objects.get(username='quinn')\n"
                  "p = Project.objects.create(name='climate')\np.members.add(u)\n"
                  "Budget.objects.create(name='climate', project=p, tokens=100)\n"
                  "UsageRecord.objects.create(user=u, project=p, model='stub-model', endpoint='chat', status=200, "
                  "prompt_tokens=40, completion_tokens=45)\n")
        with playwright_api.sync_playwright() as pw:
            browser = launch_chromium(pw)
            context = browser.new_context(viewport={"width": 1280, "height": 800})
            page, errors = watched_page(context)
            yield app, page, errors
            context.close()
            browser.close()
    finally:
        app.stop()


def next_first() -> str:
    today = dt.datetime.now(dt.UTC).date()  # the app runs in UTC (TIME_ZONE's default)
    first = (today.replace(day=1) + dt.timedelta(days=32)).replace(day=1)
    return f"1 {MONTHS[first.month - 1]}"


def test_the_chat_warns_from_80_percent_and_says_why_a_message_was_refused(stack: tuple) -> None:
    app, page, errors = stack
    page.goto(app.url + "/accounts/login/")
    page.fill("input[name=username]", "quinn")
    page.fill("input[name=password]", "pw-quinn-123")
    page.click("button[type=submit]")
    page.wait_for_url(app.url + "/")
    page.wait_for_selector("body[data-ready='1']")
    wait_js(page, "!document.getElementById('budget-warning').hidden")
    assert page.inner_text("#budget-warning") == (
        f"You have used 85% of project climate's monthly token budget; it resets on {next_first()}.")
    shot(page, "budget-warning")

    # "Hi" (about 1 token) fits in the 15 left; the stub's reply (7 prompt tokens as it counts them, 7 or
    # so completion tokens) then leaves too little for the next question.
    page.select_option("#model", "stub-model")
    send(page, "Hi")
    wait_idle(page)
    assert "Paris" in page.locator("#messages li.msg.assistant").last.inner_text()
    wait_js(page, "!document.getElementById('budget-warning').textContent.includes('85%')")  # read again
    used = re.fullmatch(r"You have used (\d+)% of project climate's monthly token budget; it resets on .*\.",
                        page.inner_text("#budget-warning"))
    assert used and int(used.group(1)) >= 95, page.inner_text("#budget-warning")

    send(page, "And the capital of Spain?")
    wait_idle(page)
    refused = page.locator("#messages li.msg.assistant").last.inner_text()
    assert "Not sent: " in refused and "project climate's monthly token budget" in refused, refused
    assert f"It resets on {next_first()}" in refused and "Try again" not in refused, refused
    shot(page, "budget-refused")
    assert not errors
