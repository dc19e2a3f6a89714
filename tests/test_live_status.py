"""Live model status over a WebSocket (channels): an open chat page sees a model start, with no
reload and no poll; the socket takes only signed-in sessions from the site's own origin; with
Redis, a socket on one worker gets the updates whichever worker publishes them."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.live import LiveApp

pytestmark = [pytest.mark.browser, pytest.mark.live, pytest.mark.redis]

ASK = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def app() -> Iterator[LiveApp]:
    live = LiveApp(workers=2, redis_url="redis://127.0.0.1:6379/6",
                   extra_env={"LIVE_STATUS_INTERVAL": "0.5"}).start()
    live.create_user("alice")
    yield live
    live.stop()


def cold_start(app: LiveApp, url: str, model: str) -> None:
    body = json.dumps({"model": model, "messages": ASK}).encode()
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=body, method="POST", headers={
        "Authorization": f"Bearer {app.create_key('alice')}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310 - loopback
        assert resp.status == 200


def test_an_open_chat_page_sees_a_model_start_without_a_reload(app: LiveApp) -> None:
    from playwright import sync_api

    from tests.test_browser import ARTIFACTS, launch_chromium, wait_js

    option = "document.querySelector('#model option[value=\"other-model\"]')"
    with sync_api.sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(app.url + "/")
            page.fill("#id_username", "alice")
            page.fill("#id_password", "pw-alice-123")
            page.click("button[type=submit]")
            page.wait_for_selector("#prompt")
            wait_js(page, "document.body.dataset.live === '1'")
            assert "offline" in page.evaluate(f"{option}.textContent")
            page.evaluate("window.__samePage = true")
            polls = sum(1 for u in requests if u.endswith("/v1/models"))
            cold_start(app, app.urls()[1], "other-model")  # through the other worker
            wait_js(page, f"{option}.textContent.includes('(ready')", timeout=30)
            assert page.evaluate("window.__samePage === true"), "the page was reloaded"
            assert sum(1 for u in requests if u.endswith("/v1/models")) == polls, "the page polled"
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "live-status.png"))
        finally:
            browser.close()


async def ws_handshake(url: str, headers: dict[str, str]) -> Any:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        try:
            async with session.ws_connect(url.replace("http", "ws", 1) + "/ws/status/", headers=headers,
                                          timeout=aiohttp.ClientWSTimeout(ws_close=5)) as ws:
                msg = await ws.receive(timeout=10)
                return msg.type, msg.data
        except aiohttp.WSServerHandshakeError as exc:
            return "refused", exc.status


def test_the_socket_takes_only_signed_in_sessions_from_the_sites_origin(app: LiveApp) -> None:
    # Anonymous: accepted by the handshake only to be closed with 4401 (signed out).
    kind, data = asyncio.run(ws_handshake(app.url, {"Origin": app.url}))
    assert kind in ("refused",) or data == 4401, (kind, data)
    # Another site's page using the visitor's cookies: refused at the handshake.
    kind, data = asyncio.run(ws_handshake(app.url, {"Origin": "https://evil.example"}))
    assert kind == "refused" and data == 403


def test_the_staff_platform_view_follows_a_model_live(app: LiveApp) -> None:
    from playwright import sync_api

    from tests.test_browser import launch_chromium, wait_js

    app.shell("from django.contrib.auth.models import User\n"
              "User.objects.create_user('olga', password='pw-olga-123', is_staff=True)\n")
    with sync_api.sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(app.url + "/admin/platforms/")
            page.fill("#id_username", "olga")
            page.fill("#id_password", "pw-olga-123")
            page.click("[type=submit]")
            page.wait_for_selector("#platform-rows tr")
            assert page.inner_text("#platform-rows").split("\t")[:2] == ["local", "up"]
            row = "document.querySelector('#model-rows tr[data-model=\"stub-model\"]')"
            wait_js(page, f"{row} !== null")
            assert page.evaluate(f"{row}.dataset.status") == "offline"  # nobody asked for it in this module
            page.evaluate("window.__samePage = true")
            cold_start(app, app.url, "stub-model")
            wait_js(page, f"{row}.dataset.status === 'ready'")
            assert page.evaluate("window.__samePage === true"), "the page was reloaded"
        finally:
            browser.close()
        # Without a staff sign-in: the admin's sign-in page instead.
        landed = urllib.request.urlopen(f"{app.url}/admin/platforms/", timeout=10).geturl()  # noqa: S310
        assert "/admin/login/" in landed
