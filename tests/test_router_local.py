"""The router through the local transport: load published for autoscaling, pings answered.

Faults (instances refusing or dying) are in tests/test_router_faults.py, with a real scheduler."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hpcbridge.client import Head, Platform
from hpcbridge.config import PlatformConfig
from hpcside.state import ensure_dirs, write_json
from tests.harness.slurm import free_port

SUPPORT = Path(__file__).resolve().parent / "support"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture
def stub() -> Iterator[dict[str, Any]]:
    port = free_port()
    env = {**os.environ, "VLLM_API_KEY": "tok-live"}
    proc = subprocess.Popen([sys.executable, str(SUPPORT / "stub_vllm.py"), "--port", str(port), "--model", "m"],
                            env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield {"port": port}
    proc.kill()
    proc.wait()


@pytest.fixture
def state(tmp_path: Path, stub: dict[str, Any]) -> Path:
    """A routing table with one live instance, written as the scheduler would."""
    state = tmp_path / "state"
    ensure_dirs(state)
    write_json(state / "routing.json", {"version": 1, "generated_at": time.time(), "slurm_ok": True, "models": {
        "m": [{"id": "bbbbbbbbbbbb", "url": f"http://127.0.0.1:{stub['port']}", "token": "tok-live", "job_id": "2"}]}})
    write_json(state / "last-reconcile", {"started_at": time.time()})  # the scheduler stays out of the way
    (tmp_path / "services.ini").write_text(
        f"[hpcside]\nstate_dir = {state}\nlauncher = local\nmin_interval = 1h\n\n"
        "[service:m]\ntemplate = vllm-cpu\nmodel_path = /nonexistent\n")
    return tmp_path


@pytest.fixture
def platform(state: Path) -> Iterator[Platform]:
    plat = Platform(PlatformConfig(name="local", transport="local",
                                   hpcside_config=str(state / "services.ini"))).start()
    try:
        yield plat
    finally:
        plat.stop()


def test_load_is_published_while_requests_are_in_flight(platform: Platform, state: Path) -> None:
    async def slow_and_watch() -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []
        agen = platform.stream("POST", "/v1/chat/completions", "m", {},
                               json.dumps({**CHAT, "stream": True, "stub_delay": 0.5}).encode())
        async for event in agen:
            if isinstance(event, Head):  # the stream runs 3.5 s; the session publishes every second
                deadline = time.monotonic() + 3
                while time.monotonic() < deadline:
                    seen[:] = [json.loads(p.read_text()) for p in (state / "state" / "inflight").glob("*.json")]
                    if seen and seen[0]["models"].get("m", {}).get("inflight") == 1:
                        break
                    await asyncio.sleep(0.1)
        return seen

    seen = asyncio.run(slow_and_watch())
    assert seen, "no in-flight file was published"
    assert seen[0]["models"]["m"]["inflight"] == 1, seen
    assert seen[0]["instances"] == {"bbbbbbbbbbbb": 1}
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        files = list((state / "state" / "inflight").glob("*.json"))
        if files and json.loads(files[0].read_text())["models"]["m"]["inflight"] == 0:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the finished request was not published")


def test_the_local_transport_answers_pings(platform: Platform) -> None:
    asyncio.run(platform.request("GET", "/health"))
    deadline = time.monotonic() + 5
    while not platform.state()["last_pong"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert platform.state()["last_pong"]["ready"] == {"m": 1}
