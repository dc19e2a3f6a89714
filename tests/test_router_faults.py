"""Instances that die under the router: no error for a request that can still be answered, and
streams cut mid-way continued on another instance as one stream.

Real parts: hpcside's session server (local transport), its scheduler with the local launcher,
and stand-in vLLM servers (tests/support/stub_vllm.py, which continues a partial assistant
message the way greedy decoding does) started as jobs; the faults are SIGKILLs of those jobs.
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

from hpcbridge.client import BridgeError, Head, Platform, Progress
from hpcbridge.config import PlatformConfig
from hpcside.launchers import LocalLauncher
from hpcside.state import read_json
from tests.live import local_services, stub_service

PREFIX = "rf"
SENTENCE = "The capital of France is Paris."
CHAT = {"model": "stub-model", "messages": [{"role": "user", "content": "hello"}]}


def services(tmp_path: Path, min_instances: int) -> Path:
    return local_services(tmp_path / "services.ini", tmp_path / "state", PREFIX,
                          stub_service("stub", "stub-model", min_instances=min_instances, max_instances="3",
                                       scale_down_delay="1h"),
                          min_interval="0", hold_timeout="60s")


class Site:
    """A session server over the local transport, the scheduler it drives, and its instances."""

    def __init__(self, tmp_path: Path, min_instances: int) -> None:
        self.config_path = services(tmp_path, min_instances)
        self.state = tmp_path / "state"
        self.platform = Platform(PlatformConfig(name="local", transport="local", keepalive=1.0,
                                                hpcside_config=str(self.config_path))).start()

    def routes(self) -> list[dict[str, Any]]:
        data = read_json(self.state / "routing.json")
        return (data or {}).get("models", {}).get("stub-model", []) if isinstance(data, dict) else []

    def wait_ready(self, count: int, timeout: float = 30.0, besides: tuple[str, ...] = ()) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ids = [r["id"] for r in self.routes() if r["id"] not in besides]
            if len(ids) >= count:
                return ids
            time.sleep(0.2)
        raise AssertionError(f"{count} ready instance(s) not reached: {self.routes()}")

    def kill(self, iid: str) -> None:
        """SIGKILL the instance's whole process group, as the OOM killer or a node failure would."""
        for path in (self.state / "local-jobs").glob("L*.json"):
            rec = json.loads(path.read_text())
            if rec["name"] == f"{PREFIX}.{iid}":
                os.killpg(rec["pid"], signal.SIGKILL)
                return
        raise AssertionError(f"no job for instance {iid}")

    def close(self) -> None:
        self.platform.stop()
        LocalLauncher(self.state).kill_all(PREFIX + ".")


@pytest.fixture
def site2(tmp_path: Path) -> Iterator[Site]:
    site = Site(tmp_path, min_instances=2)
    asyncio.run(site.platform.request("GET", "/health"))  # the first ping starts the scheduler
    site.wait_ready(2)
    yield site
    site.close()


@pytest.fixture
def site1(tmp_path: Path) -> Iterator[Site]:
    site = Site(tmp_path, min_instances=1)
    asyncio.run(site.platform.request("GET", "/health"))
    site.wait_ready(1)
    yield site
    site.close()


def events_of(raw: bytes) -> list[str]:
    return [block[len("data: "):] for block in raw.decode().split("\n\n") if block.startswith("data: ")]


async def stream_and_kill(site: Site, path: str, body: dict[str, Any],
                          kill_after: int) -> tuple[Head, bytes, list[Progress]]:
    """Stream a request; after ``kill_after`` data events, SIGKILL the instance serving it."""
    head: Any = None
    raw = b""
    progress: list[Progress] = []
    killed = False
    async for event in site.platform.stream("POST", path, "stub-model", {"content-type": "application/json"},
                                            json.dumps(body).encode()):
        if isinstance(event, Head):
            head = event
        elif isinstance(event, Progress):
            progress.append(event)
        else:
            raw += event
            if not killed and raw.count(b"\n\ndata: ") + 1 >= kill_after:
                site.kill(head.instance)
                killed = True
    assert killed, "the stream ended before the kill"
    return head, raw, progress


def chat_text(raw: bytes) -> str:
    text = ""
    for data in events_of(raw):
        if data != "[DONE]":
            for choice in json.loads(data).get("choices", []):
                text += choice["delta"].get("content") or ""
    return text


def test_a_stream_cut_by_a_dying_instance_continues_on_another_as_one_stream(site2: Site) -> None:
    body = {**CHAT, "stream": True, "stub_delay": 0.1, "stub_repeat": 4, "stream_options": {"include_usage": True}}
    head, raw, progress = asyncio.run(stream_and_kill(site2, "/v1/chat/completions", body, kill_after=6))
    assert head.status == 200
    data = events_of(raw)
    assert data.count("[DONE]") == 1 and data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert not [c for c in chunks if "error" in c]
    assert chat_text(raw) == SENTENCE * 4, "text lost or repeated at the splice"
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert sum(1 for c in chunks for ch in c["choices"] if "role" in ch["delta"]) == 1
    usage = [c["usage"] for c in chunks if c.get("usage")]
    assert len(usage) == 1 and usage[0]["completion_tokens"] == 28 and usage[0]["prompt_tokens"] == 7
    assert any(p.stage == "continuing" for p in progress)


def test_a_completion_stream_is_continued_with_prompt_plus_text(site2: Site) -> None:
    body = {"model": "stub-model", "prompt": "Say it:", "stream": True, "stub_delay": 0.1, "stub_repeat": 3}
    _, raw, _ = asyncio.run(stream_and_kill(site2, "/v1/completions", body, kill_after=5))
    data = events_of(raw)
    assert data.count("[DONE]") == 1
    text = "".join(json.loads(d)["choices"][0]["text"] for d in data[:-1] if json.loads(d)["choices"])
    assert text == SENTENCE * 3


def test_a_stream_that_cannot_be_continued_ends_with_one_error_event_and_done(site2: Site) -> None:
    body = {**CHAT, "stream": True, "stub_delay": 0.1, "stub_repeat": 3, "n": 2}
    _, raw, _ = asyncio.run(stream_and_kill(site2, "/v1/chat/completions", body, kill_after=4))
    data = events_of(raw)
    assert data[-1] == "[DONE]" and data.count("[DONE]") == 1
    errors = [json.loads(d) for d in data[:-1] if "error" in json.loads(d)]
    assert len(errors) == 1 and errors[0]["error"]["code"] == "stream_interrupted"
    assert "several choices" in errors[0]["error"]["message"]


def test_requests_after_an_instance_died_are_answered_not_refused(site2: Site) -> None:
    victim = site2.wait_ready(2)[0]
    site2.kill(victim)

    async def many() -> list[Any]:
        async def one() -> Any:
            try:
                return (await site2.platform.request("POST", "/v1/chat/completions", "stub-model",
                                                     {"content-type": "application/json"},
                                                     json.dumps(CHAT).encode()))[0].status
            except BridgeError as exc:
                return f"{exc.status} {exc.code}"
        return await asyncio.gather(*[one() for _ in range(16)])

    assert asyncio.run(many()) == [200] * 16


def test_the_only_instance_dying_mid_stream_is_continued_once_its_replacement_is_ready(site1: Site) -> None:
    before = site1.wait_ready(1)
    body = {**CHAT, "stream": True, "stub_delay": 0.1, "stub_repeat": 3}
    head, raw, progress = asyncio.run(stream_and_kill(site1, "/v1/chat/completions", body, kill_after=4))
    assert chat_text(raw) == SENTENCE * 3
    assert events_of(raw).count("[DONE]") == 1
    assert site1.wait_ready(1, besides=tuple(before)), "no replacement"
    assert any(p.stage == "ready" for p in progress)


def test_a_request_arriving_while_the_only_instance_is_dead_is_held_not_failed(site1: Site) -> None:
    victim = site1.wait_ready(1)[0]
    site1.kill(victim)
    head, body = asyncio.run(site1.platform.request("POST", "/v1/chat/completions", "stub-model",
                                                    {"content-type": "application/json"},
                                                    json.dumps(CHAT).encode()))
    assert head.status == 200 and head.instance != victim
    assert SENTENCE in json.loads(body)["choices"][0]["message"]["content"]
