"""django-prometheus's middleware counts the Django pages and admin (the /v1 front has its own counters)."""

from __future__ import annotations

from django.test import Client
from prometheus_client import REGISTRY


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_page_view_is_counted_by_view_and_status(settings) -> None:  # type: ignore[no-untyped-def]
    settings.METRICS_TOKEN = "scrape-secret"
    before = _sample("django_http_responses_total_by_status_view_method_total",
                     status="200", view="privacy", method="GET")
    assert Client().get("/privacy/").status_code == 200
    after = _sample("django_http_responses_total_by_status_view_method_total",
                    status="200", view="privacy", method="GET")
    assert after == before + 1
    # The admin is counted too (a redirect to its login page when signed out).
    admin_before = _sample("django_http_requests_total_by_view_transport_method_total",
                           view="admin:index", transport="http", method="GET")
    Client().get("/admin/")
    assert _sample("django_http_requests_total_by_view_transport_method_total",
                   view="admin:index", transport="http", method="GET") == admin_before + 1


def test_the_scrape_shows_the_page_series_and_stays_closed_to_strangers(settings) -> None:  # type: ignore[no-untyped-def]
    settings.METRICS_ALLOWED_IPS = []
    settings.METRICS_TOKEN = "scrape-secret"
    client = Client()
    client.get("/privacy/")
    assert client.get("/metrics").status_code == 403
    body = client.get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-secret").content.decode()
    line = next(x for x in body.splitlines()
                if x.startswith("django_http_responses_total_by_status_view_method_total{")
                and 'view="privacy"' in x)
    assert float(line.rsplit(" ", 1)[1]) >= 1
