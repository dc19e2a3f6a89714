"""One model on several platforms, and links lost under a request (hpcbridge/failover.py).

The ranking is a pure function. The rest runs two real platforms, each an hpcside session server
over the local transport with its own scheduler and stand-in instances; the faults are the
session server killed (what a cut SSH link or a dying login-node process look like from the web
side) and a platform whose link cannot be opened.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hpcbridge.client import Bridge, Head, Platform, Progress
from hpcbridge.config import PlatformConfig
from hpcbridge.failover import Offer, rank, stream
from hpcside.launchers import LocalLauncher
from hpcside.state import read_json
from tests.live import local_services, stub_service

SENTENCE = "The capital of France is Paris."
CHAT = {"model": "stub-model", "messages": [{"role": "user", "content": "hello"}]}


def test_a_platform_with_a_ready_instance_wins_then_the_least_loaded() -> None:
    offers = [Offer("a", "offline"), Offer("b", "ready", 1), Offer("c", "ready", 2)]
    up = {"a": True, "b": True, "c": True}
    assert rank(offers, up, {"b": 3, "c": 2}) == ["c", "b", "a"]  # 1 per instance on c, 3 on b
    assert rank(offers, up, {}) == ["b", "c", "a"]


def test_a_platform_that_is_down_or_just_failed_goes_last() -> None:
    offers = [Offer("a", "ready", 1), Offer("b", "ready", 1)]
    assert rank(offers, {"a": False, "b": True}, {}) == ["b", "a"]
    assert rank(offers, {"a": True, "b": True}, {}, avoid={"a"}) == ["b", "a"]


def test_a_cold_model_starts_where_slurm_can_start_it_soonest() -> None:
    offers = [Offer("a", "offline", start_estimate=600), Offer("b", "offline", start_estimate=5),
              Offer("c", "offline"), Offer("d", "starting")]
    assert rank(offers, dict.fromkeys("abcd", True), {}) == ["d", "b", "a", "c"]


class Sites:
    def __init__(self, tmp_path: Path) -> None:
        self.roots = {name: tmp_path / name for name in ("a", "b")}
        for name, root in self.roots.items():
            root.mkdir()
            local_services(root / "services.ini", root / "state", f"fo{name}",
                           stub_service("stub", "stub-model", min_instances=1), min_interval="0")
        self.bridge = Bridge({name: Platform(PlatformConfig(name=name, transport="local", keepalive=1.0,
                                                            backoff_max=1.0,
                                                            hpcside_config=str(root / "services.ini")))
                              for name, root in self.roots.items()})

    def ready(self, name: str) -> int:
        data = read_json(self.roots[name] / "state" / "routing.json")
        return len((data or {}).get("models", {}).get("stub-model", [])) if isinstance(data, dict) else 0

    def wait_ready(self) -> None:
        for name in self.roots:
            asyncio.run(self.bridge.get(name).request("GET", "/health"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(self.ready(n) for n in self.roots):
            time.sleep(0.2)
        assert all(self.ready(n) for n in self.roots), "instances not ready"

    def kill_session(self, name: str) -> None:
        for conn in self.bridge.platforms[name].connections:
            os.kill(conn.link.proc.pid, signal.SIGKILL)  # type: ignore[attr-defined]

    def close(self) -> None:
        self.bridge.stop()
        for name, root in self.roots.items():
            LocalLauncher(root / "state").kill_all(f"fo{name}.")


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[Sites]:
    s = Sites(tmp_path)
    s.wait_ready()
    yield s
    s.close()


OFFERS = (Offer("a", "ready", 1), Offer("b", "ready", 1))


async def collect(sites: Sites, body: dict, offers: tuple[Offer, ...] = OFFERS, kill_after: int = 0,
                  path: str = "/v1/chat/completions") -> tuple[Head, bytes, list[Progress]]:
    head: Any = None
    raw = b""
    progress: list[Progress] = []
    killed = ""
    async for event in stream(sites.bridge, offers, "POST", path, "stub-model",
                              {"content-type": "application/json"}, json.dumps(body).encode(), link_wait=20):
        if isinstance(event, Head):
            head = event
            killed = "" if kill_after else "-"
        elif isinstance(event, Progress):
            progress.append(event)
        else:
            raw += event
            if not killed and raw.count(b"data: ") >= kill_after:
                killed = next(n for n, p in sites.bridge.platforms.items() if p.state()["streams"])
                sites.kill_session(killed)
    return head, raw, progress


def text_of(raw: bytes) -> tuple[str, int]:
    text, done = "", 0
    for block in raw.decode().split("\n\n"):
        if block == "data: [DONE]":
            done += 1
        elif block.startswith("data: "):
            for choice in json.loads(block[6:]).get("choices", []):
                text += choice.get("delta", {}).get("content") or ""
    return text, done


def test_a_stream_whose_link_is_lost_is_continued_over_the_link_that_comes_back(sites: Sites) -> None:
    body = {**CHAT, "stream": True, "stub_delay": 0.1, "stub_repeat": 3}
    head, raw, progress = asyncio.run(collect(sites, body, kill_after=5))
    assert head.status == 200
    assert text_of(raw) == (SENTENCE * 3, 1)
    assert any(p.stage == "continuing" for p in progress)


def test_requests_fail_over_to_the_platform_that_is_up(sites: Sites) -> None:
    sites.bridge.platforms["a"].stop()  # its link is gone and stays gone
    for _ in range(5):
        head, raw, _ = asyncio.run(collect(sites, {**CHAT, "stream": True}))
        assert head.status == 200 and text_of(raw) == (SENTENCE, 1)
    assert sites.bridge.platforms["b"].state()["up"]


def test_a_request_sent_as_its_link_dies_is_answered_over_another(sites: Sites) -> None:
    async def many() -> list[int]:
        async def one() -> int:
            h, raw, _ = await collect(sites, {**CHAT, "stream": True, "stub_delay": 0.02})
            return h.status if text_of(raw) == (SENTENCE, 1) else -1
        tasks = [asyncio.ensure_future(one()) for _ in range(12)]
        await asyncio.sleep(0.05)
        sites.kill_session("a")
        sites.kill_session("b")
        return list(await asyncio.gather(*tasks))

    assert asyncio.run(many()) == [200] * 12
