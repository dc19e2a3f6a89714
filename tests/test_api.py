"""The resource API under /api/ on the live app: who I am and what is left of my limits, my keys
(never wider than the key asking), my usage per model and day, and the staff views; the same API
keys as /v1 or the session with CSRF; every error in /v1's shape."""

from __future__ import annotations

import http.cookiejar
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.live import LiveApp, stub_service
from tests.test_gateway_openai import ASK, assert_openai_error

Reply = tuple[int, dict[str, str], Any]


@pytest.fixture(scope="module")
def app() -> Iterator[LiveApp]:
    live = LiveApp(services=stub_service("stub", "stub-model", min_instances=1, idle_timeout="10m")
                   + stub_service("other", "other-model")).start()
    live.create_user("alice", groups=("team",))
    live.create_user("bob")
    live.create_user("sam")
    live.shell("from django.contrib.auth.models import Group, User\n"
               "from gateway.models import RateLimitPolicy\n"
               "User.objects.filter(username='sam').update(is_staff=True)\n"
               "RateLimitPolicy.objects.create(name='team', group=Group.objects.get(name='team'), "
               "requests_per_minute=50, tokens_per_day=100000)\n")
    yield live
    live.stop()


def call(app: LiveApp, method: str, path: str, key: str = "", body: Any = None,
         headers: dict[str, str] | None = None, opener: Any = None) -> Reply:
    data = None if body is None else json.dumps(body).encode()
    hdrs = {"Accept": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
            **({"Content-Type": "application/json"} if data is not None else {}), **(headers or {})}
    req = urllib.request.Request(f"{app.url}{path}", data=data, method=method, headers=hdrs)
    try:
        with (opener or urllib.request.build_opener()).open(req, timeout=60) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, json.loads(err.read() or b"null")


def login(app: LiveApp, username: str) -> tuple[Any, str]:
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    page = opener.open(f"{app.url}/accounts/login/", timeout=10).read().decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    form = urllib.parse.urlencode({"username": username, "password": f"pw-{username}-123",
                                   "csrfmiddlewaretoken": token, "next": "/"}).encode()
    opener.open(urllib.request.Request(f"{app.url}/accounts/login/", data=form, method="POST"), timeout=10).read()
    return opener, next(c.value for c in jar if c.name == "csrftoken")


def wait_ready(app: LiveApp, key: str, model: str) -> None:
    for _ in range(120):
        status, _, body = call(app, "GET", f"/v1/models/{model}", key)
        if status == 200 and body["status"] == "ready":
            return
        time.sleep(0.5)
    raise AssertionError(f"{model} never became ready")


def test_me_names_the_user_groups_models_and_what_is_left_without_counting(app: LiveApp) -> None:
    key = app.create_key("alice")
    wait_ready(app, key, "stub-model")
    first = call(app, "GET", "/api/me", key)
    again = call(app, "GET", "/api/me", key)
    assert first[0] == 200, first
    me = first[2]
    assert me["username"] == "alice" and me["groups"] == ["team"] and not me["is_staff"]
    assert me["key"]["prefix"] == key[4:16] and "secret" not in me["key"]
    assert {"stub-model", "other-model"} <= {m["id"] for m in me["models"]}
    user = next(b for b in me["limits"] if b["scope"] == "user")["limits"]
    assert user["requests_per_minute"]["limit"] == 50
    again_user = next(b for b in again[2]["limits"] if b["scope"] == "user")["limits"]
    assert again_user["requests_per_minute"]["used"] == user["requests_per_minute"]["used"]  # reading counts nothing
    used = user["requests_per_minute"]["used"]
    status, _, _ = call(app, "POST", "/v1/chat/completions", key, {"model": "stub-model", "messages": ASK})
    assert status == 200
    after = next(b for b in call(app, "GET", "/api/me", key)[2]["limits"] if b["scope"] == "user")["limits"]
    assert after["requests_per_minute"]["used"] in (used + 1, 1)  # 1: a new minute began
    assert after["requests_per_minute"]["remaining"] == 50 - after["requests_per_minute"]["used"]
    assert after["tokens_per_day"]["used"] > 0


def test_a_key_limited_to_one_model_sees_only_that_model(app: LiveApp) -> None:
    key = app.create_key("alice", "--model", "stub-model")
    assert [m["id"] for m in call(app, "GET", "/api/me", key)[2]["models"]] == ["stub-model"]


def test_keys_are_created_with_their_secret_once_listed_without_it_and_revoked(app: LiveApp) -> None:
    key = app.create_key("bob")
    status, headers, made = call(app, "POST", "/api/keys", key, {"name": "script", "expires_days": 7})
    assert status == 201, made
    assert made["secret"].startswith(f"cai-{made['prefix']}.") and headers["cache-control"] == "no-store"
    assert call(app, "GET", "/v1/models", made["secret"])[0] == 200
    listed = call(app, "GET", "/api/keys", key)[2]["data"]
    assert {k["prefix"] for k in listed} >= {made["prefix"], key[4:16]}
    assert made["secret"] not in json.dumps(listed) and all("secret" not in k for k in listed)
    status, _, revoked = call(app, "DELETE", f"/api/keys/{made['prefix']}", key)
    assert status == 200 and revoked["state"] == "revoked"
    assert_openai_error(*call(app, "GET", "/v1/models", made["secret"])[::2], 401)


def test_nobody_revokes_or_sees_another_users_key(app: LiveApp) -> None:
    alices = app.create_key("alice")
    bobs = app.create_key("bob")
    status, _, body = call(app, "DELETE", f"/api/keys/{alices[4:16]}", bobs)
    assert_openai_error(status, body, 404)
    assert alices[4:16] not in json.dumps(call(app, "GET", "/api/keys", bobs)[2])
    assert call(app, "GET", "/v1/models", alices)[0] == 200


def test_a_key_never_creates_a_key_wider_than_itself(app: LiveApp) -> None:
    parent = app.create_key("alice", "--model", "stub-model", "--expires-days", "10")
    app.limit_key(parent, requests_per_minute=3)
    status, _, body = call(app, "POST", "/api/keys", parent, {"name": "x", "models": ["other-model"]})
    assert_openai_error(status, body, 403)
    assert body["error"]["param"] == "models" and body["error"]["code"] == "key_wider_than_caller"
    status, _, body = call(app, "POST", "/api/keys", parent, {"name": "x", "expires_days": 30})
    assert_openai_error(status, body, 403)
    assert body["error"]["param"] == "expires_days"
    status, _, child = call(app, "POST", "/api/keys", parent, {"name": "child"})
    assert status == 201, child
    assert child["allowed_models"] == ["stub-model"] and child["expires_at"] is not None
    assert child["expires_at"][:10] == call(app, "GET", "/api/me", parent)[2]["key"]["expires_at"][:10]
    limits = call(app, "GET", "/api/me", child["secret"])[2]["limits"]
    assert next(b for b in limits if b["scope"] == "key")["limits"]["requests_per_minute"]["limit"] == 3
    assert_openai_error(*call(app, "GET", "/v1/models/other-model", child["secret"])[::2], 404)
    # The session (no key) is bounded by nothing but the user's own rights.
    opener, csrf = login(app, "alice")
    status, _, free = call(app, "POST", "/api/keys", body={"name": "free"}, headers={"X-CSRFToken": csrf},
                           opener=opener)
    assert status == 201 and free["allowed_models"] == [] and free["expires_at"] is None


def test_the_session_needs_the_csrf_token_to_change_anything(app: LiveApp) -> None:
    opener, csrf = login(app, "bob")
    assert call(app, "GET", "/api/me", opener=opener)[2]["key"] is None
    status, _, body = call(app, "POST", "/api/keys", body={"name": "x"}, opener=opener)
    assert_openai_error(status, body, 403)
    assert "CSRF" in body["error"]["message"]
    status, _, body = call(app, "POST", "/api/keys", body={"name": ""}, headers={"X-CSRFToken": csrf}, opener=opener)
    assert_openai_error(status, body, 400)
    assert body["error"]["param"] == "name" and body["error"]["message"].startswith("Give the key a name")


def test_without_credentials_or_with_a_wrong_key_it_is_401_in_the_v1_shape(app: LiveApp) -> None:
    status, headers, body = call(app, "GET", "/api/me")
    assert_openai_error(status, body, 401)
    assert headers["www-authenticate"].startswith("Bearer")
    status, _, body = call(app, "GET", "/api/me", "cai-000000000000.wrong")
    assert_openai_error(status, body, 401)
    assert body["error"]["code"] == "invalid_api_key"


def test_usage_is_per_model_and_day_mine_only_and_filtered_by_date(app: LiveApp) -> None:
    key = app.create_key("bob")
    app.shell("import datetime as dt\nfrom django.contrib.auth.models import User\n"
              "from gateway.models import UsageRecord\n"
              "bob, alice = User.objects.get(username='bob'), User.objects.get(username='alice')\n"
              "def at(day): return dt.datetime(2026, 3, day, 12, tzinfo=dt.timezone.utc)\n"
              "UsageRecord.objects.create(user=bob, model='m1', endpoint='chat', status=200, prompt_tokens=5, "
              "completion_tokens=7, created_at=at(1))\n"
              "UsageRecord.objects.create(user=bob, model='m1', endpoint='chat', status=429, created_at=at(1))\n"
              "UsageRecord.objects.create(user=bob, model='m2', endpoint='chat', status=200, prompt_tokens=1, "
              "completion_tokens=1, created_at=at(2))\n"
              "UsageRecord.objects.create(user=alice, model='m1', endpoint='chat', status=200, prompt_tokens=100, "
              "created_at=at(1))\n")
    status, _, body = call(app, "GET", "/api/usage?from=2026-03-01&to=2026-03-01", key)
    assert status == 200, body
    assert body["data"] == [{"day": "2026-03-01", "model": "m1", "project": None, "requests": 2, "errors": 1,
                             "prompt_tokens": 5, "completion_tokens": 7}]
    rows = call(app, "GET", "/api/usage?from=2026-03-01&to=2026-03-31", key)[2]["data"]
    assert [(r["day"], r["model"]) for r in rows] == [("2026-03-01", "m1"), ("2026-03-02", "m2")]
    status, _, body = call(app, "GET", "/api/usage?from=2026-03-05&to=2026-03-01", key)
    assert_openai_error(status, body, 400)
    assert body["error"]["param"] == "from"
    assert_openai_error(*call(app, "GET", "/api/usage?from=March", key)[::2], 400)


def test_admin_views_are_for_staff_and_show_usage_per_user_group_and_model_and_the_platforms(app: LiveApp) -> None:
    assert_openai_error(*call(app, "GET", "/api/admin/usage", app.create_key("alice"))[::2], 403)
    assert_openai_error(*call(app, "GET", "/api/admin/platforms", app.create_key("alice"))[::2], 403)
    staff = app.create_key("sam")
    app.shell("import datetime as dt\nfrom django.contrib.auth.models import User\n"
              "from gateway.models import UsageRecord\n"
              "UsageRecord.objects.create(user=User.objects.get(username='alice'), model='m9', endpoint='chat', "
              "status=200, prompt_tokens=3, completion_tokens=4, "
              "created_at=dt.datetime(2026, 4, 1, tzinfo=dt.timezone.utc))\n")
    status, _, usage = call(app, "GET", "/api/admin/usage?from=2026-04-01&to=2026-04-01", staff)
    assert status == 200, usage
    assert usage["by_user"] == [{"user": "alice", "model": "m9", "requests": 1, "errors": 0, "prompt_tokens": 3,
                                 "completion_tokens": 4}]
    assert usage["by_group"] == [{"group": "team", "model": "m9", "requests": 1, "errors": 0, "prompt_tokens": 3,
                                  "completion_tokens": 4}]
    wait_ready(app, staff, "stub-model")
    status, _, platforms = call(app, "GET", "/api/admin/platforms", staff)
    assert status == 200, platforms
    local = platforms["data"][0]
    assert local["name"] == "local" and local["up"] is True
    models = {m["id"]: m for m in local["models"]}
    assert models["stub-model"]["status"] == "ready" and models["stub-model"]["instances"] >= 1
    assert models["other-model"]["status"] == "offline"
    assert all(m["start_estimate"] is None or m["start_estimate"] >= 0 for m in local["models"])


def test_the_schema_describes_api_and_v1_and_its_page_is_behind_login(app: LiveApp) -> None:
    key = app.create_key("alice")
    status, _, doc = call(app, "GET", "/api/schema", key)
    assert status == 200 and doc["openapi"].startswith("3.")
    assert {"/api/me", "/api/keys", "/api/usage", "/api/admin/platforms", "/v1/models", "/v1/chat/completions",
            "/v1/completions", "/v1/embeddings"} <= set(doc["paths"])
    req = urllib.request.Request(f"{app.url}/api/docs")
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback; follows to the login page
        assert "/accounts/login/" in resp.url
    opener, _ = login(app, "alice")
    with opener.open(f"{app.url}/api/docs", timeout=10) as resp:
        page = resp.read().decode()
        assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    browsable = opener.open(urllib.request.Request(f"{app.url}/api/me", headers={"Accept": "text/html"}), timeout=10)
    assert browsable.headers["Content-Type"].startswith("text/html") and "alice" in browsable.read().decode()
    main = page.split('<main id="main">')[1].split("</main>")[0]
    assert "POST /v1/chat/completions" in main and "GET /api/me" in main and "<script" not in main
