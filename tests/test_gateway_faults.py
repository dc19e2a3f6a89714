"""External providers as models, upstream errors passed through, and a platform that goes down."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.harness.accounts import stop_process_group
from tests.harness.net import wait_http
from tests.harness.slurm import free_port
from tests.live import SUPPORT, LiveApp
from tests.test_gateway_openai import ASK, assert_openai_error, raw

PROVIDER_KEY = "provider-secret-0123456789"


class Provider:
    """An OpenAI-compatible server outside the cluster (the stub, run directly)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, str(SUPPORT / "stub_vllm.py"), "--port", str(self.port),
                                      "--model", "provider-model"], env={**os.environ, "VLLM_API_KEY": PROVIDER_KEY},
                                     stdout=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_http(f"{self.url}/health", 15, "the provider stub")
        except BaseException:
            stop_process_group(self.proc)
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/stub/stats", timeout=5) as resp:  # noqa: S310 - loopback
            return json.loads(resp.read())


@pytest.fixture(scope="module")
def provider() -> Iterator[Provider]:
    p = Provider()
    yield p
    stop_process_group(p.proc)


@pytest.fixture(scope="module")
def app(provider: Provider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApp]:
    secret = tmp_path_factory.mktemp("secrets") / "provider-key"
    secret.write_text(PROVIDER_KEY + "\n")
    live = LiveApp(extra_env={"EXT_PROVIDER_KEY_FILE": str(secret)}).start()
    try:
        live.create_user("alice")
        live.shell("from gateway.models import ModelOverlay\n"
                   f"ModelOverlay.objects.create(model_id='ext-model', external_base_url='{provider.url}/v1', "
                   "external_model='provider-model', external_key_env='EXT_PROVIDER_KEY', display_name='External')\n"
                   f"ModelOverlay.objects.create(model_id='provider-model', external_base_url='{provider.url}/v1/', "
                   "external_key_env='EXT_PROVIDER_KEY')\n"
                   f"ModelOverlay.objects.create(model_id='ext-nokey', external_base_url='{provider.url}/v1', "
                   "external_key_env='NOT_SET_ANYWHERE')\n"
                   f"ModelOverlay.objects.create(model_id='ext-limited', external_base_url='{provider.url}/v1', "
                   "external_model='provider-model', external_key_env='EXT_PROVIDER_KEY', requests_per_minute=1)\n")
        yield live
    finally:
        live.stop()


def post(app: LiveApp, key: str, payload: dict):  # type: ignore[no-untyped-def]
    return raw(app, "POST", "/v1/chat/completions", json.dumps(payload).encode(),
               {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})


def test_an_external_provider_is_listed_and_answers_with_its_own_key(client: openai.OpenAI,
                                                                     provider: Provider) -> None:
    models = {m.id: m for m in client.models.list()}
    assert models["ext-model"].model_extra["status"] == "ready"
    assert models["ext-model"].model_extra["name"] == "External"
    reply = client.chat.completions.create(model="ext-model", messages=ASK)
    assert "Paris" in reply.choices[0].message.content
    assert reply.model == "provider-model"  # the provider's answer, unchanged
    assert provider.stats()["last_headers"]["authorization"] == f"Bearer {PROVIDER_KEY}"
    text = "".join(c.choices[0].delta.content or "" for c in
                   client.chat.completions.create(model="ext-model", messages=ASK, stream=True) if c.choices)
    assert "Paris" in text


def test_the_users_request_reaches_the_provider_byte_for_byte(app: LiveApp, key: str, provider: Provider) -> None:
    body = json.dumps({"model": "provider-model", "messages": ASK, "temperature": 0.25,
                       "some_provider_option": {"x": [1, 2]}}, indent=1).encode()
    status, _, reply = raw(app, "POST", "/v1/chat/completions", body,
                           {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert status == 200, reply
    assert provider.stats()["last_body_sha256"] == hashlib.sha256(body).hexdigest()
    assert provider.stats()["last_headers"].get("cookie") is None


def test_provider_errors_pass_through_with_status_body_and_retry_after(app: LiveApp, key: str) -> None:
    status, headers, body = post(app, key, {"model": "ext-model", "messages": ASK, "stub_status": 429})
    assert status == 429 and headers["retry-after"] == "7"
    assert body == {"error": {"message": "stub error 429", "type": "BadRequestError", "param": "stub_status",
                              "code": 429}}


def test_platform_errors_pass_through_plain_and_streamed(app: LiveApp, key: str) -> None:
    status, _, body = post(app, key, {"model": "stub-model", "messages": ASK, "stub_status": 422})
    assert status == 422 and body["error"]["message"] == "stub error 422"
    # Streamed: the error is known before the first event, so it comes as a plain HTTP error, as OpenAI does.
    status, _, body = post(app, key, {"model": "stub-model", "messages": ASK, "stream": True, "stub_status": 400})
    assert status == 400 and body["error"]["message"] == "stub error 400"


def test_a_provider_without_its_key_is_refused_without_calling_it(app: LiveApp, key: str,
                                                                  provider: Provider) -> None:
    before = provider.stats()["requests"]
    status, _, body = post(app, key, {"model": "ext-nokey", "messages": ASK})
    assert_openai_error(status, body, 503)
    assert body["error"]["code"] == "provider_not_configured" and "NOT_SET" not in body["error"]["message"]
    assert provider.stats()["requests"] == before
    assert "NOT_SET_ANYWHERE" in app.logs()  # the operator learns which variable is missing


def test_a_model_limit_applies_on_top_of_the_users_own(app: LiveApp, key: str) -> None:
    first = post(app, key, {"model": "ext-limited", "messages": ASK})
    second = post(app, key, {"model": "ext-limited", "messages": ASK})
    if second[0] == 200:  # the minute turned over between the two
        second = post(app, key, {"model": "ext-limited", "messages": ASK})
    assert first[0] == 200
    assert_openai_error(second[0], second[2], 429)
    assert "ext-limited" in second[2]["error"]["message"] and int(second[1]["retry-after"]) >= 1
    assert post(app, key, {"model": "ext-model", "messages": ASK})[0] == 200  # other models are not affected


def test_an_unreachable_provider_gets_502_in_openai_shape(app: LiveApp, key: str, provider: Provider) -> None:
    stop_process_group(provider.proc)
    status, _, body = post(app, key, {"model": "ext-model", "messages": ASK})
    assert_openai_error(status, body, 502)
    assert body["error"]["code"] == "upstream_unreachable"


def test_a_platform_that_goes_down_gives_503_with_retry_after(app: LiveApp, key: str) -> None:
    assert post(app, key, {"model": "stub-model", "messages": ASK})[0] == 200
    config = Path(app.dir / "services.ini")
    good = config.read_text()
    config.write_text("[hpcside]\nbroken = \n")  # the session server can no longer start
    try:
        sessions = subprocess.run(["pgrep", "-f", "--", f"--config {config} forcecommand"], capture_output=True,
                                  text=True, check=False).stdout.split()
        assert sessions
        for pid in sessions:
            os.kill(int(pid), signal.SIGKILL)
        time.sleep(1)
        status, headers, body = post(app, key, {"model": "stub-model", "messages": ASK})
        assert_openai_error(status, body, 503)
        assert body["error"]["code"] == "platform_unavailable" and int(headers["retry-after"]) >= 1
        started = time.monotonic()
        status, headers, body = post(app, key, {"model": "stub-model", "messages": ASK, "stream": True})
        assert status == 503 and time.monotonic() - started < 2
    finally:
        config.write_text(good)
    deadline = time.monotonic() + 60
    while post(app, key, {"model": "stub-model", "messages": ASK})[0] != 200:  # and it comes back by itself
        assert time.monotonic() < deadline, "the platform did not come back"
        time.sleep(1)


def test_a_client_that_goes_away_cancels_its_stream_and_frees_its_slot(app: LiveApp) -> None:
    import http.client

    single = app.create_key("alice")
    app.limit_key(single, parallel_streams=1)
    conn = http.client.HTTPConnection("127.0.0.1", app.ports[0], timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps(
        {"model": "stub-model", "messages": ASK, "stream": True, "stub_delay": 0.2, "stub_repeat": 100}),
        {"Authorization": f"Bearer {single}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    while not resp.fp.readline().startswith(b"data: "):  # through any cold-start comments
        pass
    busy = post(app, single, {"model": "stub-model", "messages": ASK})
    assert busy[0] == 429  # the stream holds the key's one slot
    conn.close()  # the client goes away about 140 s before the stream would end
    deadline = time.monotonic() + 10
    while post(app, single, {"model": "stub-model", "messages": ASK})[0] != 200:
        assert time.monotonic() < deadline, "the abandoned stream still holds its slot"
        time.sleep(0.2)
    out = app.shell("import time\nfrom gateway.models import UsageRecord\n"
                    "for _ in range(50):\n"
                    "    if UsageRecord.objects.filter(status=499).exists(): break\n"
                    "    time.sleep(0.1)\n"
                    "print(UsageRecord.objects.filter(status=499, streamed=True).count())")
    assert int(out.strip().splitlines()[-1]) >= 1
