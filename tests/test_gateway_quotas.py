"""Quotas that hold, on the live app: tokens of external streams are counted, a client that leaves
mid-stream is still charged, a user's limits hold across all their keys, and a model the caller may
not use is not confirmed to exist; cold-start details are for staff only."""

from __future__ import annotations

import http.client
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.harness.accounts import stop_process_group
from tests.live import LiveApp, stub_service
from tests.test_gateway_faults import PROVIDER_KEY, Provider
from tests.test_gateway_openai import ASK, assert_openai_error, raw

STAGES = {"requested", "queued", "starting", "waiting", "backoff", "ready", "busy"}


@pytest.fixture(scope="module")
def provider() -> Iterator[Provider]:
    p = Provider()
    yield p
    stop_process_group(p.proc)


@pytest.fixture(scope="module")
def app(provider: Provider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApp]:
    secret = tmp_path_factory.mktemp("secrets") / "provider-key"
    secret.write_text(PROVIDER_KEY + "\n")
    services = (stub_service("stub", "stub-model", idle_timeout="10m") + stub_service("cold-a", "cold-a")
                + stub_service("cold-b", "cold-b") + stub_service("secret", "secret-model"))
    live = LiveApp(services=services, extra_env={"EXT_PROVIDER_KEY_FILE": str(secret)}).start()
    try:
        for name in ("alice", "bob", "erin", "frank", "sam"):
            live.create_user(name)
        live.shell("from django.contrib.auth.models import Group, User\n"
                   "from gateway.models import ModelOverlay\n"
                   "User.objects.filter(username='sam').update(is_staff=True)\n"
                   f"ModelOverlay.objects.create(model_id='ext-model', external_base_url='{provider.url}/v1', "
                   "external_model='provider-model', external_key_env='EXT_PROVIDER_KEY')\n"
                   f"ModelOverlay.objects.create(model_id='ext-metered', external_base_url='{provider.url}/v1', "
                   "external_model='provider-model', external_key_env='EXT_PROVIDER_KEY', tokens_per_day=10)\n"
                   "o = ModelOverlay.objects.create(model_id='secret-model')\n"
                   "o.groups.add(Group.objects.create(name='insiders'))\n")
        yield live
    finally:
        live.stop()


def openai_client(app: LiveApp, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app.url}/v1", api_key=key, max_retries=0, timeout=60)


def usage_rows(app: LiveApp, username: str, status: int, model: str) -> list[dict[str, Any]]:
    """The user's usage rows of this status and model, once there is one (rows are written in batches)."""
    out = app.shell("import json, time\nfrom gateway.models import UsageRecord\n"
                    "for _ in range(100):\n"
                    f"    rows = list(UsageRecord.objects.filter(user__username={username!r}, status={status}, "
                    f"model={model!r}).values('prompt_tokens', 'completion_tokens', 'streamed'))\n"
                    "    if rows: break\n"
                    "    time.sleep(0.1)\n"
                    "print(json.dumps(rows))")
    return list(json.loads(out.strip().splitlines()[-1]))


def chat(app: LiveApp, key: str, model: str = "stub-model") -> int:
    return raw(app, "POST", "/v1/chat/completions", json.dumps({"model": model, "messages": ASK}).encode(),
               {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})[0]


def early_in_a_minute() -> None:
    """Start a burst of counted requests with 10 s of the minute left at least (no window turns over)."""
    left = 60 - time.time() % 60
    if left < 10:
        time.sleep(left + 0.5)


def test_a_default_stream_from_an_external_provider_counts_against_its_token_quota(app: LiveApp) -> None:
    key = app.create_key("alice")
    client = openai_client(app, key)
    chunks = list(client.chat.completions.create(model="ext-metered", messages=ASK, stream=True))
    assert "Paris" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert all(c.usage is None for c in chunks)  # the usage chunk the gateway asked for is not passed on
    # The provider's own count (the stub says 7 + 7), not an estimate, is what was charged.
    [row] = usage_rows(app, "alice", 200, "ext-metered")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (7, 7)
    with pytest.raises(openai.RateLimitError) as err:  # 14 of the user's 10 tokens a day for this model
        client.chat.completions.create(model="ext-metered", messages=ASK, stream=True)
    assert "tokens per day for ext-metered" in str(err.value)
    with_usage = list(client.chat.completions.create(model="ext-model", messages=ASK, stream=True,
                                                     stream_options={"include_usage": True}))
    assert with_usage[-1].usage is not None and with_usage[-1].usage.total_tokens == 14  # asked: passed on


@pytest.mark.parametrize("model", ["stub-model", "ext-model"])
def test_a_client_that_leaves_mid_stream_is_charged_for_what_it_received(app: LiveApp, model: str) -> None:
    key = app.create_key("frank")
    conn = http.client.HTTPConnection("127.0.0.1", app.ports[0], timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps(
        {"model": model, "messages": ASK, "stream": True, "stub_delay": 0.1, "stub_repeat": 100}),
        {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    received = 0
    while received < 5:  # five words, then the client goes away long before the usage chunk
        line = resp.fp.readline()
        if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            received += 1
    conn.close()
    [row] = usage_rows(app, "frank", 499, model)
    # The prompt ("What is the capital of France?": 30 characters / 4) and at least what was streamed.
    assert row["prompt_tokens"] == 8 and row["streamed"]
    assert 5 <= row["completion_tokens"] < 700


def test_two_keys_of_one_user_share_the_users_requests_per_minute(app: LiveApp) -> None:
    app.shell("from django.contrib.auth.models import User\nfrom gateway.models import RateLimitPolicy\n"
              "RateLimitPolicy.objects.create(name='bob', user=User.objects.get(username='bob'), "
              "requests_per_minute=4)")
    first, second = app.create_key("bob"), app.create_key("bob")
    early_in_a_minute()
    statuses = [chat(app, key) for key in (first, second, first, second, first, second)]
    assert statuses == [200, 200, 200, 200, 429, 429]


def test_a_keys_own_policy_is_an_extra_limit_on_top_of_the_users(app: LiveApp) -> None:
    app.shell("from django.contrib.auth.models import Group, User\nfrom gateway.models import RateLimitPolicy\n"
              "g = Group.objects.create(name='students')\nUser.objects.get(username='erin').groups.add(g)\n"
              "RateLimitPolicy.objects.create(name='students', group=g, requests_per_minute=3)")
    tight, other = app.create_key("erin"), app.create_key("erin")
    app.limit_key(tight, requests_per_minute=1)
    early_in_a_minute()
    assert chat(app, tight) == 200
    status, headers, body = raw(app, "POST", "/v1/chat/completions", json.dumps(
        {"model": "stub-model", "messages": ASK}).encode(), {"Authorization": f"Bearer {tight}"})
    assert_openai_error(status, body, 429)
    assert "for this key" in body["error"]["message"] and int(headers["retry-after"]) >= 1
    # The group's 3 a minute hold for erin as a whole: the refused request was not counted.
    assert [chat(app, other), chat(app, other), chat(app, other)] == [200, 200, 429]


def test_a_model_the_caller_may_not_use_is_not_found_like_an_unknown_one(app: LiveApp) -> None:
    limited = app.create_key("alice", "--model", "stub-model")
    plain = app.create_key("alice")
    for key, model in ((limited, "cold-a"), (plain, "secret-model")):
        unknown = raw(app, "GET", "/v1/models/no-such-model", headers={"Authorization": f"Bearer {key}"})
        hidden = raw(app, "GET", f"/v1/models/{model}", headers={"Authorization": f"Bearer {key}"})
        assert_openai_error(hidden[0], hidden[2], 404)
        assert hidden[2]["error"] == {**unknown[2]["error"], "message": unknown[2]["error"]["message"].replace(
            "no-such-model", model)}
        with pytest.raises(openai.NotFoundError) as err:
            openai_client(app, key).chat.completions.create(model=model, messages=ASK)
        assert err.value.code == "model_not_found"
    assert raw(app, "GET", "/v1/models/secret-model",
               headers={"Authorization": f"Bearer {app.create_key('sam')}"})[0] == 404  # staff are not insiders


def progress_comments(app: LiveApp, key: str, model: str) -> list[str]:
    body = json.dumps({"model": model, "messages": ASK, "stream": True}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", app.ports[0], timeout=60)
    conn.request("POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {key}",
                                                          "Content-Type": "application/json"})
    text = conn.getresponse().read().decode()
    conn.close()
    assert "Paris" in text
    return [line for line in text.splitlines() if line.startswith(":")]


def test_cold_start_details_are_for_staff_and_others_see_the_stage(app: LiveApp) -> None:
    staff = progress_comments(app, app.create_key("sam"), "cold-a")
    others = progress_comments(app, app.create_key("alice"), "cold-b")
    assert others and staff
    for line in others:
        match = re.fullmatch(r": (\w+) \(\d+s\)", line)
        assert match and match.group(1) in STAGES, others
    assert any(re.fullmatch(r": (\w+) \(\d+s\)", line) is None for line in staff), staff  # the full messages


def test_a_usage_row_carries_the_keys_project_and_the_instance_that_served_it(app: LiveApp) -> None:
    app.create_user("ivy")  # a user no earlier test has limited
    key = app.create_key("ivy")
    app.shell("from django.contrib.auth.models import User\n"
              "from gateway.models import ApiKey, Project\n"
              "p = Project.objects.create(name='climate', slurm_account='clim01')\n"
              "p.members.add(User.objects.get(username='ivy'))  # a key's project must be its user's\n"
              "ApiKey.objects.filter(user__username='ivy').update(project=p)\n")
    assert chat(app, key) == 200
    out = app.shell("import json, time\nfrom gateway.models import UsageRecord\n"
                    "for _ in range(100):\n"
                    "    rows = list(UsageRecord.objects.filter(user__username='ivy', status=200)"
                    ".values('project__name', 'platform', 'instance'))\n"
                    "    if rows: break\n"
                    "    time.sleep(0.1)\n"
                    "print(json.dumps(rows))")
    [row] = json.loads(out.strip().splitlines()[-1])
    assert row["project__name"] == "climate"
    assert row["platform"] and row["instance"]  # the charge-back divides this instance's node time
