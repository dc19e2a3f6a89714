"""Unauthenticated /v1 requests: throttled per client address, and an unknown key prefix costs no
database query once it is known to be unknown. In process (Django's test client and database)."""

from __future__ import annotations

import itertools
import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client

from gateway import keys
from gateway.limits import limiter

ASK = {"model": "stub-model", "messages": [{"role": "user", "content": "hi"}]}
_hosts = itertools.count(1)


@pytest.fixture
def frozen_minute(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The throttle's clock stands at the start of a minute: no window turns over mid-test."""
    monkeypatch.setattr(limiter, "clock", lambda: 1_800_000_000.0)
    yield


def address() -> str:
    return f"198.51.100.{next(_hosts)}"  # a fresh client per test: the counters live in the process


def post(client: Client, key: str = "", **extra: Any) -> Any:
    headers = {"HTTP_AUTHORIZATION": f"Bearer {key}"} if key else {}
    return client.post("/v1/chat/completions", json.dumps(ASK), content_type="application/json",
                       **headers, **extra)


@pytest.mark.django_db
def test_an_unknown_key_prefix_costs_one_query_then_none(django_assert_num_queries: Any) -> None:
    prefix = secrets.token_hex(6)  # never asked for before in this process
    with django_assert_num_queries(1):
        assert keys.api_key_authenticate(f"cai-{prefix}.guess-one") is None
    with django_assert_num_queries(0):
        assert keys.api_key_authenticate(f"cai-{prefix}.guess-two") is None


@pytest.mark.django_db
def test_a_key_created_after_a_miss_on_its_prefix_works_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    assert keys.api_key_authenticate("cai-abcdefabcdef.early") is None  # remembered as unknown
    monkeypatch.setattr(keys.secrets, "token_hex", lambda n: "abcdefabcdef")
    user = User.objects.create_user("carol")
    key, secret = keys.api_key_create(user=user, name="new")
    assert secret.startswith("cai-abcdefabcdef.")
    found = keys.api_key_authenticate(secret)
    assert found is not None and found.pk == key.pk


@pytest.mark.django_db(transaction=True)
def test_failed_authentications_from_one_address_get_429_with_retry_after(settings: Any, frozen_minute: None) -> None:
    settings.GATEWAY_AUTH_FAILURES_PER_MINUTE = 3
    user = User.objects.create_user("dave")
    _, good = keys.api_key_create(user=user, name="good")
    client = Client(REMOTE_ADDR=address())
    statuses = [post(client).status_code, post(client, "cai-000000000000.x").status_code,
                post(client, "not-a-key").status_code]
    assert statuses == [401, 401, 401]
    refused = post(client, "cai-000000000000.y")
    assert refused.status_code == 429 and refused["Retry-After"] == "60"
    body = refused.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "rate_limit_exceeded"
    assert post(client).status_code == 429  # a missing key too
    assert post(client, good).status_code == 429  # until the minute is over, nothing from there is tried
    assert post(Client(REMOTE_ADDR=address())).status_code == 401  # other addresses are not affected


@pytest.mark.django_db(transaction=True)
def test_behind_a_trusted_proxy_each_forwarded_client_counts_alone(settings: Any, frozen_minute: None) -> None:
    settings.GATEWAY_AUTH_FAILURES_PER_MINUTE = 1
    settings.TRUSTED_PROXIES = ["127.0.0.1"]
    proxy = Client(REMOTE_ADDR="127.0.0.1")
    first, second = address(), address()
    assert post(proxy, HTTP_X_FORWARDED_FOR=first).status_code == 401
    assert post(proxy, HTTP_X_FORWARDED_FOR=first).status_code == 429
    assert post(proxy, HTTP_X_FORWARDED_FOR=f"{first}, {second}").status_code == 401  # the proxy names `second`
    # A client cannot pick its address: X-Forwarded-For from an untrusted peer is ignored.
    stranger = address()
    assert post(Client(REMOTE_ADDR=stranger), HTTP_X_FORWARDED_FOR=address()).status_code == 401
    assert post(Client(REMOTE_ADDR=stranger), HTTP_X_FORWARDED_FOR=address()).status_code == 429
