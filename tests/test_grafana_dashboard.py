"""deploy/grafana/chatai.json against a real Prometheus scraping a live daphne's /metrics with the token.

Every panel's query must return data once some traffic went through: /v1 requests with a key
(holding through a cold start), a 401, a 429, page views and a 404 page."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.accounts import stop_process_group
from tests.harness.net import wait_http
from tests.harness.slurm import free_port
from tests.live import LiveApp

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "chatai.json"
TOKEN = "scrape-" + "s" * 24
# Grafana's $__rate_interval is at least four scrape intervals; the test scrapes every second.
VARIABLES = {"$__rate_interval": "4s", "$__interval": "1s", "$__range": "5m"}
# Series that are legitimately all zero after the traffic: nothing left in flight, no job queued.
MAY_BE_ZERO = ("increase(chatai_held_requests_total", "chatai_platform_models{", "chatai_platform_demand",
               "chatai_platform_streams")


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


def test_the_docs_list_every_panel_query() -> None:
    docs = (ROOT / "docs" / "monitoring.md").read_text()
    missing = [expr for _, expr in panel_queries() if f"`{expr}`" not in docs]
    assert not missing, missing


@pytest.fixture
def live() -> Iterator[LiveApp]:
    app = LiveApp(extra_env={"METRICS_TOKEN": TOKEN}).start()
    try:
        yield app
    finally:
        app.stop()


@pytest.fixture
def prometheus(live: LiveApp) -> Iterator[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed (scripts/test.sh installs Debian's package)")
    work = Path(tempfile.mkdtemp(prefix="chatai-prom-"))
    (work / "prometheus.yml").write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "chatai", "metrics_path": "/metrics",
                            "authorization": {"type": "Bearer", "credentials": TOKEN},
                            "static_configs": [{"targets": [live.url.removeprefix("http://")]}]}]}))
    port = free_port()
    log = open(work / "prometheus.log", "wb")  # noqa: SIM115 - lives with the process
    proc = subprocess.Popen([binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/-/ready", 20, "prometheus", lambda: (work / "prometheus.log").read_text()[-2000:])
        yield url
    finally:
        stop_process_group(proc)
        log.close()
        shutil.rmtree(work, ignore_errors=True)


def api(prom: str, path: str, **params: Any) -> dict[str, Any]:
    url = f"{prom}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - loopback test server
        answer: dict[str, Any] = json.loads(resp.read())
    assert answer["status"] == "success", answer
    return answer


def wait_for(prom: str, query: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not any(float(r["value"][1]) > 0 for r in api(prom, "query", query=query)["data"]["result"]):
        assert time.monotonic() < deadline, f"no data for {query}"
        time.sleep(0.5)


def call(url: str, path: str, key: str = "", body: Any = None) -> int:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data=data, headers=headers)  # noqa: S310 - loopback
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:  # noqa: S310 - loopback
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        exc.read()
        return int(exc.code)


def traffic(app: LiveApp, key: str, limited: str, rounds: int) -> None:
    chat = {"model": "stub-model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
    for i in range(rounds):
        assert call(app.url, "/v1/chat/completions", key, chat) == 200
        assert call(app.url, "/v1/chat/completions", key, {**chat, "stream": True}) == 200
        assert call(app.url, "/v1/chat/completions", limited, chat) == (200 if i == 0 else 429)
        assert call(app.url, "/v1/chat/completions", "cai-nope.wrong", chat) == 401
        assert call(app.url, "/v1/models", key) == 200
        assert call(app.url, "/privacy/") == 200
        assert call(app.url, "/no-such-page/") == 404
        time.sleep(1.2)  # spread over scrapes: rates need two samples of a series


def test_every_panel_query_returns_data_from_a_real_prometheus(live: LiveApp, prometheus: str) -> None:
    live.create_user("grafana")
    key, limited = live.create_key("grafana"), live.create_key("grafana")
    live.limit_key(limited, requests_per_minute=1)
    wait_for(prometheus, 'up{job="chatai"}', 15)  # scraping with the token before the traffic starts
    left = 60 - time.time() % 60
    if left < 40:  # the limited key's 1 a minute is a fixed window: the rounds must not cross into the next
        time.sleep(left + 0.5)
    start = time.time()
    traffic(live, key, limited, rounds=4)
    # The instance the first request started is reported by the next pong (every 5 s).
    wait_for(prometheus, "chatai_platform_instances", 15)
    time.sleep(2.5)
    end = time.time()
    failures = []
    for title, expr in panel_queries():
        for name, value in VARIABLES.items():
            expr = expr.replace(name, value)
        result = api(prometheus, "query_range", query=expr, start=start, end=end, step=1)["data"]["result"]
        values = [float(v) for series in result for _, v in series["values"]]
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            failures.append(f"{title}: {expr}: no data ({result[:2]})")
        elif not any(finite) and not any(part in expr for part in MAY_BE_ZERO):
            failures.append(f"{title}: {expr}: only zeros")
    assert not failures, "\n".join(failures)
