"""Two worker processes share one limit through the real Redis; nothing of a prompt is kept anywhere."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
import redis

from tests.live import LiveApp

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.live]

REDIS_URL = "redis://127.0.0.1:6379/15"


ERRORS: list[str] = []  # the error bodies seen, for an assertion's message


def post(url: str, key: str, body: dict) -> int:
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310 - loopback
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as err:
        ERRORS.append(err.read().decode(errors="replace")[:300])
        return int(err.code)


@pytest.fixture(scope="module")
def app() -> Iterator[LiveApp]:
    redis.Redis.from_url(REDIS_URL).flushdb()
    live = LiveApp(db="postgresql", redis_url=REDIS_URL, workers=2).start()
    try:
        live.create_user("bob")
        yield live
    finally:
        live.stop()
    redis.Redis.from_url(REDIS_URL).flushdb()


def test_two_workers_share_one_limit_through_redis(app: LiveApp) -> None:
    key = app.create_key("bob")
    app.limit_key(key, requests_per_minute=4)
    body = {"model": "stub-model", "messages": [{"role": "user", "content": "hi"}]}
    a, b = app.urls()
    statuses = [post(url, key, body) for url in (a, b, a, b, a, b)]
    if statuses.count(200) > 4:  # a minute boundary fell inside the burst: try once more
        statuses = [post(url, key, body) for url in (a, b, a, b, a, b)]
    assert statuses.count(200) == 4 and statuses.count(429) == 2, (statuses, ERRORS[-6:])


def test_canaries_in_prompts_are_found_nowhere_on_the_server(app: LiveApp) -> None:
    key = app.create_key("bob")
    canary = f"CANARY{uuid.uuid4().hex}"
    ok = {"model": "stub-model", "messages": [{"role": "user", "content": f"{canary} ok"}]}
    streamed = {**ok, "stream": True, "messages": [{"role": "user", "content": f"{canary} stream"}]}
    invalid = {"model": "stub-model", "messages": [{"content": f"{canary} invalid"}]}
    unknown = {"model": f"{canary}-model", "messages": [{"role": "user", "content": canary}]}
    assert post(app.url, key, ok) == 200
    assert post(app.url, key, streamed) == 200
    assert post(app.url, key, invalid) == 400
    assert post(app.url, key, unknown) == 404
    bad_key = post(app.url, f"cai-000000000000.{canary}", ok)
    assert bad_key == 401
    # Hit a limit with the canary inside.
    app.limit_key(key, requests_per_day=1)
    assert [post(app.url, key, ok), post(app.url, key, ok)] == [200, 429]  # the day's one, then refused

    needle = canary.encode()
    dump = subprocess.run(["pg_dump", "-h", "127.0.0.1", "-U", "postgres", app.db_name], capture_output=True,
                          check=True).stdout
    assert needle not in dump, "canary in the database"
    assert needle not in app.logs().encode(), "canary in the web server's logs"
    for path in app.dir.rglob("*"):
        if path.is_file():
            assert needle not in path.read_bytes(), f"canary in {path}"
    r = redis.Redis.from_url(REDIS_URL)
    for name in r.scan_iter("*"):
        assert needle not in name
        if r.type(name) == b"string":
            assert needle not in (r.get(name) or b"")
