"""The official openai client against the live app: gateway -> bridge -> hpcside -> instance."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.live import LiveApp

ASK = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def app(request: pytest.FixtureRequest) -> Iterator[LiveApp]:
    live = LiveApp(db=request.param).start()
    try:
        live.create_user("alice")
        yield live
    finally:
        live.stop()


def raw(app: LiveApp, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    req = urllib.request.Request(f"{app.url}{path}", data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310 - loopback
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, json.loads(err.read() or b"null")


def assert_openai_error(status: int, body: Any, expected: int) -> None:
    assert status == expected, body
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def test_the_client_chats_through_a_cold_start(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="stub-model", messages=ASK)
    assert "Paris" in reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def test_the_client_lists_models_with_status(client: openai.OpenAI) -> None:
    client.chat.completions.create(model="stub-model", messages=ASK)  # it runs now
    models = {m.id: m for m in client.models.list()}
    assert {"stub-model", "other-model"} <= set(models)
    assert models["stub-model"].model_extra["status"] == "ready"
    assert models["other-model"].model_extra["status"] == "offline"


def test_the_client_streams_and_gets_no_usage_chunk_it_did_not_ask_for(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="stub-model", messages=ASK, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert all(c.usage is None for c in chunks)
    with_usage = list(client.chat.completions.create(model="stub-model", messages=ASK, stream=True,
                                                     stream_options={"include_usage": True}))
    assert with_usage[-1].usage is not None and with_usage[-1].usage.total_tokens > 0


def test_the_async_client_streams(app: LiveApp, key: str) -> None:
    async def go() -> str:
        aclient = openai.AsyncOpenAI(base_url=f"{app.url}/v1", api_key=key, max_retries=0)
        stream = await aclient.chat.completions.create(model="stub-model", messages=ASK, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        reply = await aclient.chat.completions.create(model="stub-model", messages=ASK)
        await aclient.close()
        return text + (reply.choices[0].message.content or "")

    assert asyncio.run(go()).count("Paris") == 2


def test_a_held_request_streams_progress_as_sse_comments(app: LiveApp, key: str) -> None:
    body = json.dumps({"model": "other-model", "messages": ASK, "stream": True}).encode()
    req = urllib.request.Request(f"{app.url}/v1/chat/completions", data=body, method="POST",
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310 - loopback
        text = resp.read().decode()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
    comments = [line for line in text.splitlines() if line.startswith(": ")]
    assert comments and any("requested" in c or "queued" in c or "loading" in c for c in comments), text
    assert "Paris" in text and text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize("headers,code", [
    ({}, "missing_api_key"),
    ({"Authorization": "Bearer cai-000000000000.nope"}, "invalid_api_key"),
    ({"Authorization": "Bearer not-a-key"}, "invalid_api_key"),
    ({"Authorization": "Basic abc"}, "invalid_api_key"),
])
def test_missing_or_invalid_keys_get_401(app: LiveApp, headers: dict[str, str], code: str) -> None:
    status, _, body = raw(app, "POST", "/v1/chat/completions", json.dumps({"model": "stub-model",
                                                                          "messages": ASK}).encode(), headers)
    assert_openai_error(status, body, 401)
    assert body["error"]["code"] == code


@pytest.mark.parametrize("payload,param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    (json.dumps({"messages": ASK}).encode(), "model"),
    (json.dumps({"model": "stub-model"}).encode(), "messages"),
    (json.dumps({"model": "stub-model", "messages": "hi"}).encode(), "messages"),
    (json.dumps({"model": "stub-model", "messages": [{"content": "x"}]}).encode(), "messages[0]"),
    (json.dumps({"model": "stub-model", "messages": ASK, "stream": "yes"}).encode(), "stream"),
])
def test_malformed_requests_get_400(app: LiveApp, key: str, payload: bytes, param: str | None) -> None:
    status, _, body = raw(app, "POST", "/v1/chat/completions", payload, {"Authorization": f"Bearer {key}"})
    assert_openai_error(status, body, 400)
    assert body["error"]["param"] == param


def test_an_unknown_model_gets_404_and_the_client_raises(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-model", messages=ASK)
    assert err.value.status_code == 404 and err.value.code == "model_not_found"


def test_a_model_outside_the_keys_allow_list_is_not_found(app: LiveApp) -> None:
    limited = app.create_key("alice", "--model", "stub-model")
    client = openai.OpenAI(base_url=f"{app.url}/v1", api_key=limited, max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:  # like an unknown model: its name is not confirmed
        client.chat.completions.create(model="other-model", messages=ASK)
    assert err.value.code == "model_not_found"
    assert [m.id for m in client.models.list()] == ["stub-model"]  # not listed either


def test_a_body_too_large_gets_413(app: LiveApp, key: str) -> None:
    big = json.dumps({"model": "stub-model", "messages": [{"role": "user", "content": "x" * (17 * 1024 * 1024)}]})
    status, _, body = raw(app, "POST", "/v1/chat/completions", big.encode(), {"Authorization": f"Bearer {key}"})
    assert_openai_error(status, body, 413)


def test_a_revoked_key_stops_working(app: LiveApp) -> None:
    doomed = app.create_key("alice")
    client = openai.OpenAI(base_url=f"{app.url}/v1", api_key=doomed, max_retries=0)
    client.models.list()
    app.manage("apikey", "revoke", doomed.split(".")[0])
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_rate_limits_give_429_with_retry_after_and_headers(app: LiveApp) -> None:
    limited = app.create_key("alice")
    app.limit_key(limited, requests_per_minute=2)
    body = json.dumps({"model": "stub-model", "messages": ASK}).encode()
    auth = {"Authorization": f"Bearer {limited}", "Content-Type": "application/json"}
    first = raw(app, "POST", "/v1/chat/completions", body, auth)
    assert first[0] == 200 and first[1]["x-ratelimit-limit-requests"] == "2"
    raw(app, "POST", "/v1/chat/completions", body, auth)
    status, headers, err = raw(app, "POST", "/v1/chat/completions", body, auth)
    if status == 200:  # the minute turned over between requests: one more try in the new window
        raw(app, "POST", "/v1/chat/completions", body, auth)
        status, headers, err = raw(app, "POST", "/v1/chat/completions", body, auth)
    assert_openai_error(status, err, 429)
    assert int(headers["retry-after"]) >= 1 and headers["x-ratelimit-remaining-requests"] == "0"


def test_usage_is_recorded_without_content(app: LiveApp, client: openai.OpenAI) -> None:
    client.chat.completions.create(model="stub-model", messages=[{"role": "user", "content": "canary-usage-4711"}])
    out = app.shell("import time\nfrom gateway.models import UsageRecord\n"
                    "for _ in range(50):\n"  # rows are written in batches, every half second
                    "    r = UsageRecord.objects.filter(model='stub-model', status=200).first()\n"
                    "    if r: break\n"
                    "    time.sleep(0.1)\n"
                    "print(r.prompt_tokens, r.completion_tokens, r.endpoint, r.user.username)")
    prompt, completion, endpoint, user = out.strip().splitlines()[-1].split()
    assert int(prompt) > 0 and int(completion) > 0 and endpoint == "chat" and user == "alice"


def test_unknown_endpoints_and_methods_answer_in_openai_shape(app: LiveApp, key: str) -> None:
    status, _, body = raw(app, "GET", "/v1/nope", headers={"Authorization": f"Bearer {key}"})
    assert_openai_error(status, body, 404)
    status, _, body = raw(app, "GET", "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"})
    assert_openai_error(status, body, 405)


def test_metrics_are_scraped_and_parsed(app: LiveApp, client: openai.OpenAI) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    client.chat.completions.create(model="stub-model", messages=ASK)
    with urllib.request.urlopen(f"{app.url}/metrics", timeout=10) as resp:  # noqa: S310 - loopback
        text = resp.read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    ok = [v for (name, labels), v in samples.items()
          if name == "chatai_requests_total" and ("model", "stub-model") in labels and ("status", "200") in labels]
    assert ok and ok[0] >= 1
    assert samples[("chatai_platform_up", (("platform", "local"),))] == 1.0
    assert any(name == "chatai_time_to_first_byte_seconds_count" for name, _ in samples)
    assert any(name == "chatai_tokens_total" for name, _ in samples)
    assert any(name.startswith("django_") or name.startswith("python_") for name, _ in samples)


def test_a_logged_in_session_uses_the_same_endpoint_with_csrf_protection(app: LiveApp) -> None:
    import http.cookiejar
    import re as _re

    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    page = opener.open(f"{app.url}/accounts/login/", timeout=10).read().decode()
    token = _re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    form = urllib.parse.urlencode({"username": "alice", "password": "pw-alice-123",
                                   "csrfmiddlewaretoken": token, "next": "/"}).encode()
    opener.open(urllib.request.Request(f"{app.url}/accounts/login/", data=form, method="POST"), timeout=10).read()
    csrf = next(c.value for c in jar if c.name == "csrftoken")
    body = json.dumps({"model": "stub-model", "messages": ASK}).encode()

    def chat(headers: dict[str, str]) -> tuple[int, Any]:
        req = urllib.request.Request(f"{app.url}/v1/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json", **headers})
        try:
            with opener.open(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    status, err = chat({})
    assert_openai_error(status, err, 403)
    assert err["error"]["code"] == "csrf_failed"
    status, reply = chat({"X-CSRFToken": csrf})
    assert status == 200 and "Paris" in reply["choices"][0]["message"]["content"]
