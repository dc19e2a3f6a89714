"""Accounts on one browser, signing in at a real OIDC provider (npm oidc-provider), in Chromium.

Who a user is (the provider's ``sub``), which groups they have (none when the claim is absent),
that a user disabled in the admin or whose session at the provider ended is out at the next
request (pages and /v1 alike), that password login is off, and that each user's conversations
are in their own IndexedDB database: the next user of the same browser profile never sees them,
and "forget my chats on this computer" deletes them.
"""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.oidc import OIDCProvider
from tests.harness.slurm import free_port
from tests.live import LiveApp, stub_service
from tests.test_browser import CHROMIUM, launch_chromium, watched_page

pytestmark = [pytest.mark.browser, pytest.mark.redis, pytest.mark.live, pytest.mark.root]

playwright_api = pytest.importorskip("playwright.sync_api")
CANARY = f"CANARY{uuid.uuid4().hex[:16]}"
ALICE, BOB, TWIN = "u-4f1c9a", "u-8b2d77", "operator"
ACCOUNTS = {
    ALICE: {"email": "alice@uni.example", "given_name": "Alice", "groups": ["physics"]},
    BOB: {"email": "bob@uni.example", "given_name": "Bob"},  # no groups claim at all
    TWIN: {"email": "operator@uni.example"},  # the same name as a local operator account
}


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is missing: scripts/test.sh installs it (apt-get install chromium)")
    port = free_port()
    provider = OIDCProvider(f"http://127.0.0.1:{port}", ACCOUNTS)
    app = LiveApp(port=port, services=stub_service("stub", "stub-model", min_instances=1),
                  redis_url="redis://127.0.0.1:6379/12", extra_env=provider.app_env())
    try:
        app.start()
        # Bob signed in before, when the provider still sent his groups.
        app.shell("from django.contrib.auth.models import User, Group\n"
                  f"u = User.objects.create_user({BOB!r})\n"
                  "u.groups.add(Group.objects.get_or_create(name='physics')[0])\n"
                  f"User.objects.create_superuser({TWIN!r}, password='local-operator-pw-123')")
        with playwright_api.sync_playwright() as pw:
            browser = launch_chromium(pw)
            context = browser.new_context()  # one profile for every user: a shared computer
            page, errors = watched_page(context)
            yield app, provider, context, page, errors
            context.close()
            browser.close()
    finally:
        app.stop()
        provider.stop()
        subprocess.run(["redis-cli", "-n", "12", "FLUSHDB"], capture_output=True, check=False)


def sign_in(page, app: LiveApp, provider: OIDCProvider, account: str) -> None:  # type: ignore[no-untyped-def]
    page.goto(app.url + "/")
    assert page.url.startswith(provider.issuer)
    page.fill("input[name=login]", account)
    page.fill("input[name=password]", "anything")
    page.click("button[type=submit]")
    if page.url.startswith(provider.issuer) and page.locator("button[type=submit]").count():
        page.click("button[type=submit]")  # consent, the first time
    page.wait_for_url(re.compile(re.escape(app.url) + ".*"))


def sign_out(page, app: LiveApp, provider: OIDCProvider, *, forget: bool = False) -> None:  # type: ignore[no-untyped-def]
    if not page.url.startswith(app.url) or "/signin-failed/" in page.url:
        page.goto(app.url + "/privacy/")
    if forget:
        page.check("#forget-chats")
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(re.compile(re.escape(provider.issuer) + ".*"))
    page.click("button[type=submit]")  # the provider asks to confirm signing out
    page.wait_for_url(re.compile(re.escape(provider.issuer) + ".*"))


def end_provider_session(page, provider: OIDCProvider) -> None:  # type: ignore[no-untyped-def]
    """Sign out at the provider only (its own page), as when the SSO session ends elsewhere."""
    page.goto(provider.discovery["end_session_endpoint"])
    page.click("button[type=submit]")
    page.wait_for_load_state()


def databases(page) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(d["name"] for d in page.evaluate("indexedDB.databases()"))


def v1_status(page) -> int:  # type: ignore[no-untyped-def]
    return int(page.evaluate("fetch('/v1/models', {credentials: 'same-origin'}).then(r => r.status)"))


def user_id(app: LiveApp, username: str) -> int:
    out = app.shell(f"from django.contrib.auth.models import User\nprint(User.objects.get(username={username!r}).pk)")
    return int(out.strip().splitlines()[-1])


def groups_of(app: LiveApp, username: str) -> str:
    return app.shell("from django.contrib.auth.models import User\n"
                     f"print(sorted(User.objects.get(username={username!r}).groups.values_list('name', flat=True)))"
                     ).strip().splitlines()[-1]


def expire_check(app: LiveApp, context) -> None:  # type: ignore[no-untyped-def]
    """Make the session's next check with the provider due now (instead of waiting its period)."""
    key = next(c["value"] for c in context.cookies() if c["name"] == "sessionid")
    app.shell("from django.contrib.sessions.backends.db import SessionStore\n"
              f"s = SessionStore({key!r})\ns['oidc_id_token_expiration'] = 0\ns.save()")


def test_users_are_the_providers_sub_and_the_groups_claim_decides(stack: tuple) -> None:
    app, provider, _, page, errors = stack
    sign_in(page, app, provider, ALICE)
    page.wait_for_selector("body[data-ready='1']")
    assert "alice@uni.example" in page.inner_text(".topbar")
    assert groups_of(app, ALICE) == "['physics']"
    assert page.evaluate("document.body.dataset.chatDb") == f"chatai-u{user_id(app, ALICE)}"
    sign_out(page, app, provider)
    sign_in(page, app, provider, BOB)
    page.wait_for_selector("body[data-ready='1']")
    assert groups_of(app, BOB) == "[]"  # no groups claim: no groups, not the old ones
    sign_out(page, app, provider)
    assert not errors


def test_the_next_user_of_this_browser_never_sees_my_chats_and_forgetting_deletes_them(stack: tuple) -> None:
    app, provider, _, page, errors = stack
    sign_in(page, app, provider, ALICE)
    page.wait_for_selector("body[data-ready='1']")
    alice_db, bob_db = f"chatai-u{user_id(app, ALICE)}", f"chatai-u{user_id(app, BOB)}"
    page.select_option("#model", "stub-model")
    page.fill("#prompt", f"{CANARY} What is the capital of France?")
    page.keyboard.press("Enter")
    page.wait_for_selector("#send:not([hidden])", timeout=60_000)
    assert "Paris" in page.locator("#messages li.msg.assistant").last.inner_text()
    sign_out(page, app, provider)

    sign_in(page, app, provider, BOB)
    page.wait_for_selector("body[data-ready='1']")
    assert CANARY not in page.inner_text("#conversations")
    assert CANARY not in page.inner_text("#messages")
    assert page.locator("#conversations li").count() == 1  # only his own new chat
    assert {alice_db, bob_db} <= set(databases(page))
    sign_out(page, app, provider)

    sign_in(page, app, provider, ALICE)
    page.wait_for_selector("body[data-ready='1']")
    assert CANARY in page.inner_text("#conversations")  # still hers, on this computer
    sign_out(page, app, provider, forget=True)
    page.goto(app.url + "/privacy/")
    remaining = databases(page)
    assert alice_db not in remaining and bob_db in remaining
    assert not errors


def test_password_login_is_off_with_single_sign_on(stack: tuple) -> None:
    app, provider, _, page, _ = stack
    for path in ("/accounts/login/", "/admin/login/?next=/admin/"):
        page.goto(app.url + path)
        assert page.url.startswith(provider.issuer), path
    out = app.shell("from django.contrib.auth import authenticate\n"
                    f"print(authenticate(username={TWIN!r}, password='local-operator-pw-123'))")
    assert out.strip().splitlines()[-1] == "None"


def test_a_provider_account_cannot_take_over_a_local_account_of_the_same_name(stack: tuple) -> None:
    app, provider, _, page, _ = stack
    sign_in(page, app, provider, TWIN)
    assert page.url == app.url + "/signin-failed/"
    assert v1_status(page) == 401
    out = app.shell("from django.contrib.auth.models import User\n"
                    f"u = User.objects.get(username={TWIN!r})\nprint(u.has_usable_password(), u.last_login)")
    assert out.strip().splitlines()[-1] == "True None"
    end_provider_session(page, provider)


def test_a_user_disabled_in_the_admin_is_out_at_the_next_request(stack: tuple) -> None:
    app, provider, _, page, _ = stack
    sign_in(page, app, provider, ALICE)
    assert v1_status(page) == 200
    app.shell(f"from django.contrib.auth.models import User\nUser.objects.filter(username={ALICE!r})"
              ".update(is_active=False)")
    assert v1_status(page) == 401  # the chat's API calls
    page.goto(app.url + "/keys/")  # a page: sent to sign in, and the provider's answer is refused here
    page.wait_for_url(app.url + "/signin-failed/")
    assert v1_status(page) == 401
    app.shell(f"from django.contrib.auth.models import User\nUser.objects.filter(username={ALICE!r})"
              ".update(is_active=True)")
    assert v1_status(page) == 401  # enabled again, the old session stays ended
    end_provider_session(page, provider)


def test_the_providers_session_lifetime_applies(stack: tuple) -> None:
    app, provider, context, page, _ = stack
    sign_in(page, app, provider, ALICE)
    page.wait_for_selector("body[data-ready='1']")
    expire_check(app, context)
    assert v1_status(page) == 401  # the check is due: /v1 waits for a page load to renew it
    page.goto(app.url + "/")  # SessionRefresh asks the provider silently (prompt=none): still signed in there
    page.wait_for_selector("body[data-ready='1']")
    assert page.url == app.url + "/"
    assert v1_status(page) == 200

    end_provider_session(page, provider)
    expire_check(app, context)
    page.goto(app.url + "/")
    page.wait_for_url(app.url + "/signin-failed/")  # the provider said login_required: signed out here too
    assert v1_status(page) == 401
    page.goto(app.url + "/keys/")
    assert page.url.startswith(provider.issuer)
