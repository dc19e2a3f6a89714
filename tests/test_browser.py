"""The chat in Debian's Chromium (Playwright) against the live app, signing in at a real OIDC provider.

One signed-in browser context runs through what a user does, in order: sign in (groups from the
provider decide the models), chat with a streamed reply, stop a stream, edit and regenerate,
see a cold start's progress, render code and LaTeX, stay safe from a hostile reply, reload and
find the conversation, export, clear, import, manage API keys, sign out. Afterwards the canary
typed into the chat is looked for on the server. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.oidc import ARTIFACTS, OIDCProvider
from tests.harness.slurm import free_port
from tests.live import SUPPORT, LiveApp, stub_service

pytestmark = [pytest.mark.browser, pytest.mark.redis, pytest.mark.live]

playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium's own connections are refused by this closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def launch_chromium(pw):  # type: ignore[no-untyped-def]
    """Debian's Chromium, headless, as every browser test starts it."""
    return pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


def watched_page(context):  # type: ignore[no-untyped-def]
    """A new page of ``context`` with the browser tests' timeout, and the list its uncaught script errors go to."""
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return page, errors


CANARY = f"CANARY{uuid.uuid4().hex[:16]}"
ACCOUNTS = {"alice@uni.example": {"email": "alice@uni.example", "given_name": "Alice", "family_name": "Example",
                                  "groups": ["physics", "staff-unrelated"]}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is missing: scripts/test.sh installs it (apt-get install chromium)")
    port = free_port()
    provider = OIDCProvider(f"http://127.0.0.1:{port}", ACCOUNTS)
    slow_start = tmp_path_factory.mktemp("templates") / "slow-stub.sh"
    slow_start.write_text((SUPPORT / "stub.sh").read_text().replace("exec ", "export STUB_MODE=slow:4\nexec ", 1))
    services = (stub_service("stub", "stub-model", min_instances=1)
                + stub_service("cold", "cold-model", template=slow_start, idle_timeout="10m"))
    app = LiveApp(port=port, services=services, redis_url="redis://127.0.0.1:6379/13",
                  extra_env={**provider.app_env(), "OIDC_GROUPS_PREFIX": "physics"})
    try:
        app.start()
        # cold-model is for the physics group only; alice gets that group from the provider.
        app.shell("from django.contrib.auth.models import Group\nfrom gateway.models import ModelOverlay\n"
                  "o = ModelOverlay.objects.create(model_id='cold-model', display_name='Cold Model')\n"
                  "o.groups.add(Group.objects.get_or_create(name='physics')[0])")
        with playwright_api.sync_playwright() as pw:
            browser = launch_chromium(pw)
            context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 800})
            context.grant_permissions(["clipboard-read", "clipboard-write"], origin=app.url)
            page, errors = watched_page(context)
            yield app, provider, browser, context, page, errors
            context.close()
            browser.close()
    finally:
        app.stop()
        provider.stop()
        subprocess.run(["redis-cli", "-n", "13", "FLUSHDB"], capture_output=True, check=False)


def shot(page, name: str) -> None:  # type: ignore[no-untyped-def]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=False)


def last_reply(page):  # type: ignore[no-untyped-def]
    return page.locator("#messages li.msg.assistant").last


def send(page, text: str) -> None:  # type: ignore[no-untyped-def]
    page.fill("#prompt", text)
    page.keyboard.press("Enter")


def wait_js(page, expression: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    """Poll a JS expression (wait_for_function would eval a string, which the page's CSP forbids)."""
    import time

    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"timed out waiting for: {expression}"
        page.wait_for_timeout(50)


def wait_idle(page) -> None:  # type: ignore[no-untyped-def]
    page.wait_for_selector("#send:not([hidden])", timeout=60_000)


def test_sign_in_at_the_provider_and_see_the_models_of_my_groups(stack: tuple) -> None:
    app, provider, _, _, page, errors = stack
    page.goto(app.url + "/")
    assert page.url.startswith(provider.issuer), "an anonymous visitor is sent to the SSO provider"
    page.fill("input[name=login]", "alice@uni.example")
    page.fill("input[name=password]", "anything")
    page.click("button[type=submit]")
    page.click("button[type=submit]")  # consent: allow the scopes
    page.wait_for_url(app.url + "/")
    page.wait_for_selector("body[data-ready='1']")
    assert "alice@uni.example" in page.inner_text(".topbar")
    options = page.locator("#model option").all_inner_texts()
    assert any("stub-model" in o for o in options) and any("Cold Model" in o for o in options), options
    groups = app.shell("from django.contrib.auth.models import User\n"
                       "u = User.objects.get(username='alice@uni.example')\n"
                       "print(sorted(u.groups.values_list('name', flat=True)))")
    assert groups.strip().splitlines()[-1] == "['physics']"  # OIDC_GROUPS_PREFIX keeps only physics*
    assert not errors


def test_a_streamed_reply_then_stop_edit_and_regenerate(stack: tuple) -> None:
    app, _, _, _, page, errors = stack
    page.select_option("#model", "stub-model")
    send(page, f"{CANARY} What is the capital of France?")
    wait_idle(page)
    assert "Paris" in last_reply(page).inner_text()
    assert page.locator("#conversations li").first.inner_text().startswith(CANARY)
    shot(page, "chat")

    send(page, "stub:slow please take your time")
    wait_js(page, "document.querySelectorAll('#messages li.assistant').length === 2 && "
                  "document.querySelector('#messages li.assistant:last-child .body').textContent.length > 10")
    page.click("#stop")
    wait_idle(page)
    stopped = last_reply(page).inner_text()
    assert "(stopped)" in stopped and len(stopped) < 7 * 50 * 8  # cut off long before its 350 words

    page.locator("#messages li.user").last.get_by_role("button", name="Edit and resend").click()
    page.fill("#messages li.user textarea", "Edited: what is the capital of France?")
    page.get_by_role("button", name="Save and send").click()
    wait_idle(page)
    assert page.locator("#messages li.user").last.inner_text().find("Edited:") >= 0
    assert "Paris" in last_reply(page).inner_text() and "(stopped)" not in last_reply(page).inner_text()
    page.get_by_role("button", name="Regenerate the reply").click()
    wait_idle(page)
    assert page.locator("#messages li.assistant").count() == 2 and "Paris" in last_reply(page).inner_text()
    assert not errors


def test_a_cold_start_shows_progress_instead_of_an_error(stack: tuple) -> None:
    _, _, _, _, page, errors = stack
    page.click("#new-chat")
    page.select_option("#model", "cold-model")
    send(page, "Hello cold model")
    page.wait_for_selector("#progress:not([hidden])", timeout=20_000)
    assert "Starting the model" in page.inner_text("#progress")
    shot(page, "cold-start")
    wait_idle(page)
    assert "Paris" in last_reply(page).inner_text()
    assert page.is_hidden("#progress") and not last_reply(page).locator(".error").count()
    assert not errors


def test_code_and_latex_render_and_a_hostile_reply_does_nothing(stack: tuple) -> None:
    _, _, _, _, page, errors = stack
    page.click("#new-chat")
    page.select_option("#model", "stub-model")
    send(page, "stub:rich show code and math")
    wait_idle(page)
    reply = last_reply(page)
    assert reply.locator("pre code.hljs").count() == 1 and reply.locator(".copy-code").count() == 1
    assert reply.locator(".katex").count() >= 2
    requests: list = []
    page.on("request", lambda r: requests.append(r.url))
    send(page, "stub:xss")
    wait_idle(page)
    reply = last_reply(page)
    assert "<img src=x" in reply.inner_text()  # shown as text
    assert reply.locator("img, script").count() == 0
    link = reply.get_by_text("click me")
    assert link.get_attribute("href") is None
    link.click()
    page.wait_for_timeout(300)
    assert page.evaluate("window.__pwned") is None
    assert not any("198.51.100.7" in url for url in requests), "a remote image was fetched"
    shot(page, "safe-rendering")
    assert not errors


def test_conversations_survive_a_reload_and_export_clear_import_round_trips(stack: tuple, tmp_path: Path) -> None:
    _, _, _, _, page, errors = stack
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    titles = page.locator("#conversations li .open").all_inner_texts()
    assert any(t.startswith(CANARY) for t in titles) and len(titles) >= 3
    page.fill("#search", CANARY)
    assert page.locator("#conversations li").count() == 1
    page.fill("#search", "")
    with page.expect_download() as download:
        page.click("#export-all")
    exported = tmp_path / "all.json"
    download.value.save_as(exported)
    data = json.loads(exported.read_text())
    assert data["format"] == "chatai-conversations" and len(data["conversations"]) == len(titles)

    page.once("dialog", lambda d: d.accept())
    page.click("#clear-all")
    wait_js(page, "document.querySelectorAll('#conversations li').length === 1")
    assert page.locator("#messages li").count() == 0
    page.set_input_files("#import-file", str(exported))
    wait_js(page, f"document.querySelectorAll('#conversations li').length === {len(titles) + 1}")
    plain = tmp_path / "openai.json"
    plain.write_text(json.dumps([{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Imported question"},
                                 {"role": "assistant", "content": "Imported **answer**"}]))
    page.set_input_files("#import-file", str(plain))
    page.wait_for_selector("#messages li.assistant strong")
    assert page.locator("#conversations li.active").inner_text().startswith("Imported question")
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert any(t.startswith(CANARY) for t in page.locator("#conversations li .open").all_inner_texts())
    assert not errors


def test_the_chat_fits_a_phone_in_dark_mode(stack: tuple) -> None:
    _, _, browser, context, page, errors = stack
    page.set_viewport_size({"width": 390, "height": 844})
    page.click("#theme-toggle")
    assert page.evaluate("document.documentElement.getAttribute('data-theme')") in ("dark", "light")
    if page.evaluate("document.documentElement.getAttribute('data-theme')") != "dark":
        page.click("#theme-toggle")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.click("#sidebar-toggle")
    page.wait_for_timeout(300)
    shot(page, "phone-dark-sidebar")
    page.keyboard.press("Escape")
    page.wait_for_timeout(300)
    page.keyboard.press("Control+Shift+O")
    assert page.evaluate("document.activeElement.id") == "prompt"
    shot(page, "phone-dark")
    page.set_viewport_size({"width": 1280, "height": 800})
    page.click("#theme-toggle")
    assert not errors


def test_api_keys_self_service(stack: tuple) -> None:
    app, _, _, _, page, errors = stack
    page.goto(app.url + "/keys/")
    page.fill("#key-name", "laptop")
    page.fill("#key-expiry", "30")
    page.click("text=Create key")
    secret = page.inner_text("#new-secret")
    assert re.fullmatch(r"cai-[0-9a-f]{12}\.\S+", secret)
    shot(page, "api-keys")

    def models(key: str) -> int:
        req = urllib.request.Request(f"{app.url}/v1/models", headers={"Authorization": f"Bearer {key}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback
                return resp.status
        except urllib.error.HTTPError as err:
            return err.code

    assert models(secret) == 200
    page.goto(app.url + "/keys/")
    assert secret not in page.content()  # shown once only
    page.get_by_role("button", name="Revoke laptop").click()  # the page calls /api/keys: wait for its answer
    playwright_api.expect(page.locator("table")).to_contain_text("revoked")
    assert models(secret) == 401
    page.fill("#key-name", "")
    page.click("text=Create key")
    playwright_api.expect(page.locator("form.grid-form")).to_contain_text("Give the key a name")
    assert not errors


def test_sign_out_ends_the_session_here_and_at_the_provider(stack: tuple) -> None:
    app, provider, _, _, page, _ = stack
    page.goto(app.url + "/privacy/")
    assert "Never stored" in page.inner_text("main")
    page.click("text=Sign out")
    page.wait_for_url(re.compile(re.escape(provider.issuer) + ".*"))
    page.click("button[type=submit]")  # the provider asks to confirm signing out
    page.wait_for_url(re.compile(re.escape(provider.issuer) + ".*"))  # back here, sent to sign in again
    assert page.locator("input[name=login]").count() == 1


def test_the_canary_typed_in_the_browser_is_nowhere_on_the_server(stack: tuple) -> None:
    app = stack[0]
    needle = CANARY.encode()
    dump = app.manage("dumpdata", "--natural-foreign").encode()
    assert needle not in dump, "canary in the database"
    for path in Path(app.dir).rglob("*"):
        if path.is_file():
            assert needle not in path.read_bytes(), f"canary in {path}"
    keys = subprocess.run(["redis-cli", "-n", "13", "--scan"], capture_output=True, check=True).stdout
    assert needle not in keys
    for key in keys.split():
        value = subprocess.run(["redis-cli", "-n", "13", "--raw", "DUMP", key], capture_output=True,
                               check=False).stdout
        assert needle not in value, f"canary in Redis key {key!r}"
    assert needle not in (ARTIFACTS / "oidc-provider.log").read_bytes()
    assert sys.executable  # the test ran in this interpreter; nothing else to clean
