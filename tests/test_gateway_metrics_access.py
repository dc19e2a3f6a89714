"""/metrics is not public: a bearer token or an address on the allow-list."""

from __future__ import annotations

from django.test import Client


def test_metrics_refuse_strangers_and_accept_the_token(settings) -> None:  # type: ignore[no-untyped-def]
    settings.METRICS_ALLOWED_IPS = []
    settings.METRICS_TOKEN = "scrape-secret"
    client = Client()
    assert client.get("/metrics").status_code == 403
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
    ok = client.get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-secret")
    assert ok.status_code == 200 and b"chatai_platform_up" in ok.content


def test_metrics_accept_allow_listed_addresses(settings) -> None:  # type: ignore[no-untyped-def]
    settings.METRICS_ALLOWED_IPS = ["127.0.0.1"]
    settings.METRICS_TOKEN = ""
    assert Client(REMOTE_ADDR="127.0.0.1").get("/metrics").status_code == 200
    assert Client(REMOTE_ADDR="10.1.2.3").get("/metrics").status_code == 403
