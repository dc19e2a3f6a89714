"""Prometheus metrics on /metrics: django-prometheus's plus ours. Not public: a token or an allow-list.

Each worker process exports its own numbers; scrape every worker (they are separate targets).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from chatai import netaddr

REQUESTS = Counter("chatai_requests_total", "API requests by endpoint, model and status",
                   ["endpoint", "model", "status"])
TTFB = Histogram("chatai_time_to_first_byte_seconds", "Time from request to the first byte of the answer",
                 ["endpoint", "model"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
TOKENS = Counter("chatai_tokens_total", "Tokens by model and kind", ["model", "kind"])
RATE_LIMITED = Counter("chatai_rate_limited_total", "Requests refused by a rate limit", ["endpoint"])
HELD = Counter("chatai_held_requests_total", "Requests held through a model's cold start", ["model"])
COLD_START = Histogram("chatai_cold_start_seconds", "How long a held request waited for a ready instance",
                       ["model"], buckets=(1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200))


def observe_progress(model: str, stage: str, elapsed: float) -> None:
    """A held request's progress: its "ready" stage carries the wait through the cold start."""
    if stage == "ready":
        COLD_START.labels(model).observe(elapsed)


class LinkStateCollector(Collector):
    """Each HPC platform's link state, read when scraped."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from hpcbridge.registry import get_bridge

        up = GaugeMetricFamily("chatai_platform_up", "1 when the link to the HPC platform is up", labels=["platform"])
        conns = GaugeMetricFamily("chatai_platform_connections", "Open SSH connections", labels=["platform"])
        streams = GaugeMetricFamily("chatai_platform_streams", "Requests in flight on the link", labels=["platform"])
        slurm = GaugeMetricFamily("chatai_platform_slurm_ok", "1 when the platform's last pong found Slurm answering",
                                  labels=["platform"])
        instances = GaugeMetricFamily("chatai_platform_instances", "Ready instances per model (the last pong)",
                                      labels=["platform", "model"])
        models = GaugeMetricFamily("chatai_platform_models", "Models by status (queued: jobs waiting in Slurm)",
                                   labels=["platform", "status"])
        demand = GaugeMetricFamily("chatai_platform_demand", "Requests in flight or held per model",
                                   labels=["platform", "model"])
        for name, platform in get_bridge().platforms.items():
            state = platform.state()
            up.add_metric([name], 1.0 if state["up"] else 0.0)
            conns.add_metric([name], state["connections"])
            streams.add_metric([name], state["streams"])
            pong = state.get("last_pong") or {}
            if state["up"] and pong:
                slurm.add_metric([name], 1.0 if pong.get("slurm_ok") else 0.0)
            for model, count in sorted((pong.get("ready") or {}).items()):
                instances.add_metric([name, str(model)], float(count))
            by_status = dict.fromkeys(("ready", "starting", "queued", "failed", "offline"), 0)
            for m in known_models(name):
                status = str(m.get("status", "offline"))
                by_status[status] = by_status.get(status, 0) + 1
                demand.add_metric([name, str(m["id"])], float(m.get("demand") or 0))
            for status, count in by_status.items():
                models.add_metric([name, status], float(count))
        yield from (up, conns, streams, slurm, instances, models, demand)


def known_models(platform: str) -> list[dict[str, Any]]:
    """The platform's models as the gateway last read them (its /v1/models cache): no request at scrape time."""
    from gateway.registry import platform_lists

    return list(platform_lists.stale(platform) or [])


REGISTRY.register(LinkStateCollector())


def allowed(request: HttpRequest) -> bool:
    """Fail closed. With METRICS_TOKEN set, the token is required (no address is enough). Without
    it, the client's address must be on METRICS_ALLOWED_IPS; a forwarded request counts only
    through a TRUSTED_PROXIES proxy, and when no list is set, only direct requests from this
    machine qualify: behind a proxy nothing is served."""
    token = settings.METRICS_TOKEN
    if token:
        header = request.headers.get("Authorization", "")
        return hmac.compare_digest(header.encode(), f"Bearer {token}".encode())
    address = netaddr.known_client_address(request.META)
    if settings.METRICS_ALLOWED_IPS:
        return netaddr.in_networks(address, settings.METRICS_ALLOWED_IPS)
    return not netaddr.is_forwarded(request.META) and address in netaddr.LOOPBACK


def metrics_view(request: HttpRequest) -> HttpResponse:
    if not allowed(request):
        return HttpResponse("forbidden\n", status=403, content_type="text/plain")
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)
