"""Projects in Chromium, signing in at a real OIDC provider (npm oidc-provider): the groups claim makes
the user a member of the projects the PROJECTS setting maps those groups to; the chat offers them in a
select (the default first), switching it charges the chat's next request to the chosen project and
survives a reload; the keys page creates a key in the project chosen there."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.oidc import OIDCProvider
from tests.harness.slurm import free_port
from tests.live import LiveApp, stub_service
from tests.test_browser import CHROMIUM, launch_chromium, send, shot, wait_idle, wait_js, watched_page

pytestmark = [pytest.mark.browser, pytest.mark.live]

playwright_api = pytest.importorskip("playwright.sync_api")
USER = "u-7c21ee"
ACCOUNTS = {USER: {"email": "pat@uni.example", "given_name": "Pat", "groups": ["phys", "chem", "unrelated"]}}
PROJECTS = {"chemistry": {"groups": ["chem"], "slurm_account": "chem01"}, "physics": ["phys"], "biology": ["bio"]}


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is missing: scripts/test.sh installs it (apt-get install chromium)")
    port = free_port()
    provider = OIDCProvider(f"http://127.0.0.1:{port}", ACCOUNTS)
    app = LiveApp(port=port, services=stub_service("stub", "stub-model", min_instances=1),
                  extra_env={**provider.app_env(), "PROJECTS": json.dumps(PROJECTS)})
    try:
        app.start()
        with playwright_api.sync_playwright() as pw:
            browser = launch_chromium(pw)
            context = browser.new_context(viewport={"width": 1280, "height": 800})
            page, errors = watched_page(context)
            yield app, provider, page, errors
            context.close()
            browser.close()
    finally:
        app.stop()
        provider.stop()


def usage_projects(app: LiveApp, rows: int) -> list[str | None]:
    for _ in range(100):
        out = app.shell("import json\nfrom gateway.models import UsageRecord\n"
                        "print(json.dumps([r.project.name if r.project else None for r in "
                        f"UsageRecord.objects.filter(user__username={USER!r}).order_by('pk')]))")
        found = json.loads(out.strip().splitlines()[-1])
        if len(found) >= rows:
            return found
        time.sleep(0.2)
    raise AssertionError(f"fewer than {rows} usage rows")


def test_the_chat_offers_my_projects_and_charges_the_one_i_choose(stack: tuple) -> None:
    app, provider, page, errors = stack
    page.goto(app.url + "/")
    page.fill("input[name=login]", USER)
    page.fill("input[name=password]", "anything")
    page.click("button[type=submit]")
    page.click("button[type=submit]")  # consent
    page.wait_for_url(app.url + "/")
    page.wait_for_selector("body[data-ready='1']")
    # The groups claim (chem, phys) made Pat a member of the two projects mapped to them, not of biology.
    assert page.locator("#project option").all_inner_texts() == ["chemistry", "physics"]
    assert page.input_value("#project") == "chemistry"  # the default: the first by name

    page.select_option("#model", "stub-model")
    send(page, "What is the capital of France?")
    wait_idle(page)
    page.select_option("#project", "physics")
    wait_js(page, "document.getElementById('project').dataset.saved === 'physics'")
    assert page.inner_text("#project-status") == "Charged to physics"
    shot(page, "chat-project")
    send(page, "And of Italy?")
    wait_idle(page)
    assert usage_projects(app, 2) == ["chemistry", "physics"]

    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert page.input_value("#project") == "physics"  # kept in the session
    assert not errors


def test_the_keys_page_creates_a_key_in_the_project_chosen(stack: tuple) -> None:
    app, _, page, errors = stack
    page.goto(app.url + "/keys/")
    assert page.locator("#key-project option").all_inner_texts() == ["chemistry (Slurm account chem01)", "physics"]
    assert page.input_value("#key-project") == "chemistry"
    page.fill("#key-name", "phys-laptop")
    page.select_option("#key-project", "physics")
    page.click("text=Create key")
    page.wait_for_selector("#new-secret")
    playwright_api.expect(page.locator("#keys-table tbody tr").first).to_contain_text("physics")
    shot(page, "keys-project")
    out = app.shell("from gateway.models import ApiKey\nprint(ApiKey.objects.get(name='phys-laptop').project.name)")
    assert out.strip().splitlines()[-1] == "physics"
    assert not errors
