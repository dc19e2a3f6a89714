"""/v1 validation, errors and keys in process, with Django's async test client and test database:
the fast tier's view of what tests/test_gateway_openai.py shows on a live daphne."""

from __future__ import annotations

import datetime as dt
import itertools
import json
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth.models import User
from django.test import AsyncClient
from django.utils import timezone

from gateway import keys
from gateway.models import ApiKey

pytestmark = pytest.mark.django_db(transaction=True)

ASK = [{"role": "user", "content": "What is the capital of France?"}]
_hosts = itertools.count(1)


def client() -> AsyncClient:
    # A fresh address per client: the failed-authentication throttle counts per address.
    return AsyncClient(REMOTE_ADDR=f"203.0.113.{next(_hosts) % 250 + 1}")


def post(body: bytes, key: str | None = None, path: str = "/v1/chat/completions",
         headers: dict[str, str] | None = None) -> Any:
    """The request goes through the async views as under daphne (AsyncClient), driven from a sync test."""
    sent = {"Authorization": f"Bearer {key}"} if key else {}
    sent.update(headers or {})
    return async_to_sync(client().post)(path, body, content_type="application/json", headers=sent)


def assert_openai_error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.content
    error = json.loads(response.content)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


def new_key(name: str = "erin", **options: Any) -> str:
    user, _ = User.objects.get_or_create(username=name)
    return keys.api_key_create(user=user, name="test", **options)[1]


@pytest.mark.parametrize("headers, code", [
    ({}, "missing_api_key"),
    ({"Authorization": "Bearer cai-000000000000.nope"}, "invalid_api_key"),
    ({"Authorization": "Bearer not-a-key"}, "invalid_api_key"),
    ({"Authorization": "Basic abc"}, "invalid_api_key"),
])
def test_missing_or_invalid_keys_get_401_in_openai_shape(headers: dict[str, str], code: str) -> None:
    response = post(json.dumps({"model": "stub-model", "messages": ASK}).encode(), headers=headers)
    assert assert_openai_error(response, 401)["code"] == code


@pytest.mark.parametrize("payload, param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    (json.dumps({"messages": ASK}).encode(), "model"),
    (json.dumps({"model": "stub-model"}).encode(), "messages"),
    (json.dumps({"model": "stub-model", "messages": "hi"}).encode(), "messages"),
    (json.dumps({"model": "stub-model", "messages": [{"content": "x"}]}).encode(), "messages[0]"),
    (json.dumps({"model": "stub-model", "messages": ASK, "stream": "yes"}).encode(), "stream"),
    (b'{"model": "stub-model", "messages": [{"role": "user", "content": ' + b"[" * 100_000 + b"]" * 100_000
     + b"}]}", None),  # nested too deeply for the JSON parser: 400, not 500
])
def test_malformed_requests_get_400_naming_the_parameter(payload: bytes, param: str | None) -> None:
    response = post(payload, new_key())
    assert assert_openai_error(response, 400)["param"] == param


def test_a_revoked_key_stops_working_at_once() -> None:
    key = new_key()
    prefix = key.split(".")[0].removeprefix(keys.KEY_PREFIX)
    keys.api_key_revoke(ApiKey.objects.get(prefix=prefix))
    response = post(json.dumps({"model": "stub-model", "messages": ASK}).encode(), key)
    assert assert_openai_error(response, 401)["code"] == "invalid_api_key"


def test_an_expired_key_is_refused() -> None:
    key = new_key(expires_at=timezone.now() - dt.timedelta(seconds=1))
    response = post(json.dumps({"model": "stub-model", "messages": ASK}).encode(), key)
    assert_openai_error(response, 401)


def test_unknown_endpoints_answer_in_openai_shape() -> None:
    key = new_key()
    response = async_to_sync(client().get)("/v1/nothing-here", headers={"Authorization": f"Bearer {key}"})
    assert_openai_error(response, 404)


def test_a_request_that_fails_before_it_is_forwarded_gives_back_its_budget_hold_and_slot(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway import budgets as budgets_module
    from gateway import views
    from gateway.models import Budget, ModelOverlay, RateLimitPolicy

    budgets_module.forget()
    user = User.objects.create(username="fay")
    Budget.objects.create(name="fay's", user=user, tokens=100_000)
    RateLimitPolicy.objects.create(name="one at a time", user=user, parallel_streams=1)
    ModelOverlay.objects.create(model_id="ext", external_base_url="http://127.0.0.1:9/v1", external_model="x")
    key = keys.api_key_create(user=user, name="k")[1]

    async def cache_down(caller: Any) -> int:
        raise ConnectionError("the cache is down")

    monkeypatch.setattr(views.fairshare, "priority", cache_down)
    body = json.dumps({"model": "ext", "messages": ASK, "stream": True}).encode()
    for _ in range(2):  # the second would find the one parallel slot taken if the first kept it
        with pytest.raises(ConnectionError):
            post(body, key)
    assert budgets_module.budgets.held_sync(f"u{user.pk}", timezone.now()) == 0  # no prompt left held


def test_a_cache_failing_at_the_end_of_a_request_costs_no_usage_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis restarting as a request ends: its parallel slot and budget count cannot be settled, but its
    usage row (what budgets, fair share and the charge-back are rebuilt from) is still queued; it was
    lost with the exception, and a plain reply became a 500."""
    from gateway import external, views
    from gateway.models import ModelOverlay, UsageRecord
    from gateway.usage import writer

    user = User.objects.create(username="gus")
    ModelOverlay.objects.create(model_id="ext", external_base_url="http://127.0.0.1:9/v1", external_model="x")
    key = keys.api_key_create(user=user, name="k")[1]

    async def cache_down(*_args: Any, **_kwargs: Any) -> None:
        raise ConnectionError("the cache is down")

    monkeypatch.setattr(views.limiter, "release_all", cache_down)
    monkeypatch.setattr(views.budgets, "settle", cache_down)
    monkeypatch.setattr(views.fairshare, "record", cache_down)
    async def ask() -> Any:
        try:
            return await client().post("/v1/chat/completions", json.dumps({"model": "ext", "messages": ASK}),
                                       content_type="application/json", headers={"Authorization": f"Bearer {key}"})
        finally:
            await external.session().close()  # this loop's pool, before the loop goes

    response = async_to_sync(ask)()
    assert response.status_code == 502, response.content  # nothing listens on port 9: the provider's error
    writer.flush_sync()
    assert list(UsageRecord.objects.filter(user=user).values_list("status", "model")) == [(502, "ext")]


def test_a_request_whose_upstream_cannot_even_be_opened_gives_back_its_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    """open_events raising (the platforms' settings broken) skipped the accounting: the parallel slot
    stayed taken (renewed for the worker's life) and the user was locked out after that many tries."""
    from gateway import views
    from gateway.models import ModelOverlay, RateLimitPolicy, UsageRecord
    from gateway.usage import writer

    user = User.objects.create(username="hal")
    RateLimitPolicy.objects.create(name="one at a time", user=user, parallel_streams=1)
    ModelOverlay.objects.create(model_id="ext", external_base_url="http://127.0.0.1:9/v1", external_model="x")
    key = keys.api_key_create(user=user, name="k")[1]

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("HPC_PLATFORMS cannot be read")

    monkeypatch.setattr(views, "open_events", broken)
    for _ in range(2):  # the second found the one parallel slot taken (429)
        with pytest.raises(RuntimeError):
            post(json.dumps({"model": "ext", "messages": ASK}).encode(), key)
    writer.flush_sync()
    assert list(UsageRecord.objects.filter(user=user).values_list("status", flat=True)) == [500, 500]
