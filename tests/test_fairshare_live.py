"""Fair share on the live app: two daphne workers sharing their usage counters through Redis, hpcside
and the stand-in vLLM (started with ``--scheduling-policy priority``, it records the priority each
request's body carried, next to the request id the gateway gave it). A heavy user's next request
reaches the model with a higher priority number than a light user's, whichever worker serves it;
a client cannot choose its own priority."""

from __future__ import annotations

import http.client
import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.live import LiveApp
from tests.test_gateway_openai import ASK, assert_openai_error, raw

pytestmark = [pytest.mark.redis, pytest.mark.live]
REDIS_URL = "redis://127.0.0.1:6379/12"


@pytest.fixture(scope="module")
def app() -> Iterator[LiveApp]:
    redis.Redis.from_url(REDIS_URL).flushdb()  # no usage left from an earlier run
    live = LiveApp(redis_url=REDIS_URL, workers=2, extra_env={"FAIRSHARE_CHAT_BOOST": "100"}).start()
    try:
        for name in ("heavy", "light", "streamer", "fresh"):
            live.create_user(name)
        yield live
    finally:
        live.stop()
        redis.Redis.from_url(REDIS_URL).flushdb()


def ask(url: str, key: str, **extra: Any) -> tuple[int, dict[str, str], Any]:
    body = json.dumps({"model": "stub-model", "messages": ASK, **extra}).encode()
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=body, method="POST",
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310 - loopback
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, json.loads(resp.read())


def priorities_seen(app: LiveApp) -> dict[str, int]:
    """What the stand-in vLLM saw: request id -> the body's priority."""
    routing = json.loads((app.dir / "hpcside" / "routing.json").read_text())
    (instance,) = routing["models"]["stub-model"]
    with urllib.request.urlopen(f"{instance['url']}/stub/stats", timeout=5) as resp:  # noqa: S310 - loopback
        return {rid: priority for rid, priority in json.load(resp)["started"]}


def test_a_heavy_users_requests_reach_the_model_behind_a_light_users(app: LiveApp) -> None:
    heavy, light = app.create_key("heavy"), app.create_key("light")
    one, two = app.urls()
    first = ask(one, heavy)[1]["x-request-id"]  # nobody has used anything yet
    for _ in range(3):  # about 1,000 tokens through worker one
        status, _, body = ask(one, heavy, stub_repeat=50)
        assert status == 200 and body["usage"]["completion_tokens"] == 350
    ask(two, light)  # 14 tokens through worker two
    heavy_next = ask(two, heavy)[1]["x-request-id"]  # each user's next request on the other worker
    light_next = ask(one, light)[1]["x-request-id"]
    seen = priorities_seen(app)
    assert seen[first] == 100  # fair share 1 (no usage); API traffic is FAIRSHARE_CHAT_BOOST behind chat
    # The heavy user has used nearly all of the service's tokens (F = 2^-U, U near 1).
    assert 480 <= seen[heavy_next] - 100 <= 500
    assert 100 <= seen[light_next] < 120
    assert seen[heavy_next] > seen[light_next]


def test_a_client_cannot_choose_its_own_priority(app: LiveApp) -> None:
    key = app.create_key("light")
    body = json.dumps({"model": "stub-model", "messages": ASK, "priority": -5}).encode()
    status, _, answer = raw(app, "POST", "/v1/chat/completions", body,
                            {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert_openai_error(status, answer, 400)
    assert answer["error"]["param"] == "priority"


def test_a_long_running_stream_weighs_on_the_next_priority_before_it_ends(app: LiveApp) -> None:
    streamer, fresh = app.create_key("streamer"), app.create_key("fresh")
    host, port = app.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {"model": "stub-model", "messages": ASK, "stream": True, "stub_delay": 0.1, "stub_repeat": 50}
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Authorization": f"Bearer {streamer}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    try:
        started = time.monotonic()
        while time.monotonic() - started < 5:  # 5 s of a 35 s stream: about 50 tokens so far
            assert resp.readline()
        during = ask(app.url, streamer)[1]["x-request-id"]
        other = ask(app.url, fresh)[1]["x-request-id"]
    finally:
        conn.close()  # the client leaves: the rest is charged as an estimate
    seen = priorities_seen(app)
    assert seen[other] == 100  # no usage: fair share 1, API traffic
    assert seen[during] > 100  # the running stream's tokens already count
