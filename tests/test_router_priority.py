"""Fair-share order at the router, with real processes: the session server (local transport), the
stand-in vLLM started with ``--scheduling-policy priority`` (it records, in the order they start
generating, each request's x-request-id and the priority its body carried), and for the cold
start the scheduler with the local launcher.

A heavy user's backlog of slow streams fills the admission cap; a light user's request (a lower
priority number, as the gateway computes it) starts at once beside them, ahead of the older heavy
ones, which wait for their own streams to end. Pure logic of the queue is in
tests/test_hpcside_admission.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hpcbridge.client import BridgeError, Head, Platform, Progress
from hpcbridge.config import PlatformConfig
from hpcside.launchers import LocalLauncher
from hpcside.state import ensure_dirs, read_json, write_json
from tests.harness.slurm import free_port
from tests.live import local_services, stub_service

SUPPORT = Path(__file__).resolve().parent / "support"
ASK = [{"role": "user", "content": "hello"}]
HEAVY = {"stub_delay": 0.1, "stub_repeat": 4}  # 28 events, about 2.8 s: room for the checks made meanwhile
HEAVY_SECONDS = 2.8
LIGHT = {"stub_delay": 0.01}


def start_stub(policy: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(SUPPORT / "stub_vllm.py"), "--port", str(port), "--model", "m",
                             "--scheduling-policy", policy], env={**os.environ, "VLLM_API_KEY": "tok"},
                            stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("the stub did not listen")


def stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stub/stats", timeout=5) as resp:  # noqa: S310 - loopback
        return dict(json.loads(resp.read()))


class Site:
    """One stub instance in a hand-written routing table (the scheduler stays out of the way),
    a service with ``options``, and a session server over the local transport."""

    def __init__(self, tmp_path: Path, policy: str = "priority", settings: str = "", **options: str) -> None:
        self.proc, self.port = start_stub(policy)
        state = tmp_path / "state"
        ensure_dirs(state)
        write_json(state / "routing.json", {"version": 1, "generated_at": time.time(), "slurm_ok": True, "models": {
            "m": [{"id": "aaaaaaaaaaaa", "url": f"http://127.0.0.1:{self.port}", "token": "tok", "job_id": "1"}]}})
        write_json(state / "last-reconcile", {"started_at": time.time()})
        extra = "".join(f"{k} = {v}\n" for k, v in options.items())
        (tmp_path / "services.ini").write_text(
            f"[hpcside]\nstate_dir = {state}\nlauncher = local\nmin_interval = 1h\n{settings}\n"
            f"[service:m]\ntemplate = vllm-cpu\nmodel_path = /nonexistent\n{extra}")
        self.state = state
        self.platform = Platform(PlatformConfig(name="local", transport="local",
                                                hpcside_config=str(tmp_path / "services.ini"))).start()

    def close(self) -> None:
        self.platform.stop()
        self.proc.kill()
        self.proc.wait()

    def started(self) -> list[tuple[str, int]]:
        return [(rid, prio) for rid, prio in stats(self.port)["started"]]


@pytest.fixture
def site(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Site]:
    s = Site(tmp_path, **getattr(request, "param", {"max_inflight": "2"}))
    try:
        yield s
    finally:
        s.close()


class Client:
    """Streams requests through the platform and notes what each one got."""

    def __init__(self, platform: Platform, model: str = "m") -> None:
        self.platform, self.model = platform, model
        self.heads: dict[str, float] = {}
        self.progress: dict[str, list[Progress]] = {}
        self.status: dict[str, int] = {}
        self.text: dict[str, bytes] = {}

    async def stream(self, rid: str, priority: int | None, extra: dict[str, Any]) -> None:
        headers = {"content-type": "application/json", "x-request-id": rid}
        if priority is not None:
            headers["x-chatai-priority"] = str(priority)
        body = json.dumps({"model": self.model, "messages": ASK, "stream": True, **extra}).encode()
        self.progress[rid] = []
        raw = b""
        async for event in self.platform.stream("POST", "/v1/chat/completions", self.model, headers, body):
            if isinstance(event, Head):
                self.heads[rid] = time.monotonic()
                self.status[rid] = event.status
            elif isinstance(event, Progress):
                self.progress[rid].append(event)
            else:
                raw += event
        self.text[rid] = raw

    async def until(self, predicate: Any, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.02)


async def queue_after_two_heavy(site: Site, client: Client, later: list[tuple[str, int | None, dict[str, Any]]],
                                heavy_priority: int | None = 10) -> list[asyncio.Task[None]]:
    """Two heavy streams take both slots, h2 0.3 s after h1, so that the two slots free 0.3 s apart
    (two requests admitted a few ms apart may reach the stand-in's threads in either order); then
    ``later`` arrive one by one (arrival order fixed)."""
    tasks = []
    for rid in ("h1", "h2"):
        tasks.append(asyncio.ensure_future(client.stream(rid, heavy_priority, HEAVY)))
        await client.until(lambda rid=rid: rid in client.heads)
        await asyncio.sleep(0.3)
    for rid, priority, extra in later:
        tasks.append(asyncio.ensure_future(client.stream(rid, priority, extra)))
        await asyncio.sleep(0.05)
    return tasks


def test_a_light_request_starts_at_once_beside_a_heavy_backlog_that_waits_its_turn(site: Site) -> None:
    client = Client(site.platform)
    queued_seen: list[int] = []

    async def scenario() -> None:
        tasks = await queue_after_two_heavy(site, client, [
            ("h3", 10, HEAVY), ("h4", 10, HEAVY), ("h5", 10, HEAVY),
            ("light1", 0, LIGHT), ("light2", 0, LIGHT), ("h6", 10, HEAVY)])
        _, models = await site.platform.request("GET", "/v1/models")
        queued_seen.extend(m["queued"] for m in json.loads(models)["data"] if m["id"] == "m")
        await client.until(lambda: {"light1", "light2"} <= set(client.text), timeout=2 * HEAVY_SECONDS)
        first_heavy_done.append("h1" in client.text)
        await asyncio.gather(*tasks)

    first_heavy_done: list[bool] = []
    asyncio.run(scenario())
    started = site.started()
    # The light requests go next, in their own arrival order; the heavy ones keep theirs.
    assert [rid for rid, _ in started] == ["h1", "h2", "light1", "light2", "h3", "h4", "h5", "h6"]
    # ...and at once: both were answered while the first heavy stream still ran.
    assert first_heavy_done == [False]
    assert not client.progress["light1"] and not client.progress["light2"]
    # The priority reached vLLM in the body (vLLM's default 0 is left out).
    assert dict(started) == {"h1": 10, "h2": 10, "light1": 0, "light2": 0, "h3": 10, "h4": 10, "h5": 10, "h6": 10}
    assert queued_seen == [4]  # the heavy ones
    assert set(client.status.values()) == {200}
    assert all(b"data: [DONE]" in raw for raw in client.text.values())
    # Waiting more than a second for a slot is reported, with the requests ahead.
    busy = [p for p in client.progress["h6"] if p.stage == "busy"]
    assert busy and re.fullmatch(r"waiting for a free slot on m: \d+ requests? ahead", busy[0].message), busy
    assert not [p for p in client.progress["h6"] if p.stage == "ready"]  # "ready" ends a cold start only


def test_without_a_priority_header_requests_are_served_first_come_first_served(site: Site) -> None:
    client = Client(site.platform)

    async def scenario() -> None:
        tasks = await queue_after_two_heavy(site, client, [("a", None, LIGHT), ("b", None, LIGHT),
                                                           ("c", None, LIGHT)], heavy_priority=None)
        await asyncio.gather(*tasks)

    asyncio.run(scenario())
    assert [rid for rid, _ in site.started()] == ["h1", "h2", "a", "b", "c"]
    assert client.heads["a"] > client.heads["h1"] + 1.0  # a waited for a slot: no priority, no way past


def test_a_cancelled_waiting_request_leaves_the_queue_without_taking_or_freeing_a_slot(site: Site) -> None:
    client = Client(site.platform)
    queued: list[int] = []

    async def scenario() -> None:
        tasks = await queue_after_two_heavy(site, client, [])
        gone = site.platform.stream("POST", "/v1/chat/completions", "m",
                                    {"content-type": "application/json", "x-request-id": "gone",
                                     "x-chatai-priority": "10"},
                                    json.dumps({"model": "m", "messages": ASK, "stream": True, **LIGHT}).encode())
        pending = asyncio.ensure_future(gone.__anext__())
        await asyncio.sleep(0.3)  # queued behind the two heavy streams
        assert not pending.done()
        pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)
        await gone.aclose()  # type: ignore[attr-defined]  # the bridge sends CANCEL
        tasks.append(asyncio.ensure_future(client.stream("next", 10, LIGHT)))
        await asyncio.sleep(0.3)
        _, models = await site.platform.request("GET", "/v1/models")
        queued.extend(m["queued"] for m in json.loads(models)["data"] if m["id"] == "m")
        await asyncio.gather(*tasks)
        # Both slots are free again: two requests run at once, neither waits.
        both = [asyncio.ensure_future(client.stream(rid, 10, HEAVY)) for rid in ("x", "y")]
        # Within a heavy stream's length: had a slot leaked, one of them would wait for the other to end.
        await client.until(lambda: {"x", "y"} <= set(client.heads), timeout=HEAVY_SECONDS - 0.5)
        await asyncio.gather(*both)

    asyncio.run(scenario())
    assert queued == [1]  # only "next" waits: the cancelled one left the queue
    started = [rid for rid, _ in site.started()]
    assert started[:3] == ["h1", "h2", "next"] and sorted(started[3:]) == ["x", "y"]  # x and y start together
    assert not [p for rid in ("x", "y") for p in client.progress[rid]]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the load published for the scheduler is back to nothing
        files = list((site.state / "inflight").glob("*.json"))
        load = json.loads(files[0].read_text()) if files else {}
        if load.get("instances") == {} and load["models"]["m"]["inflight"] == 0 \
                and load["models"]["m"]["waiting"] == 0:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"slots or waiting requests leaked: {load}")


def test_requests_waiting_for_a_slot_count_as_waiting_for_the_scheduler(site: Site) -> None:
    client = Client(site.platform)
    seen: list[dict[str, Any]] = []

    async def scenario() -> None:
        tasks = await queue_after_two_heavy(site, client, [("w1", 10, LIGHT), ("w2", 10, LIGHT), ("w3", 10, LIGHT)])
        # The session publishes its load every second; h1 runs for another 2 s or so.
        deadline = time.monotonic() + HEAVY_SECONDS - 0.8
        while time.monotonic() < deadline:
            seen[:] = [json.loads(path.read_text()) for path in (site.state / "inflight").glob("*.json")]
            if seen and seen[0]["models"].get("m", {}).get("waiting") == 3:
                break
            await asyncio.sleep(0.1)
        await asyncio.gather(*tasks)

    asyncio.run(scenario())
    assert seen and seen[0]["models"]["m"]["inflight"] == 2 and seen[0]["models"]["m"]["waiting"] == 3, seen
    assert seen[0]["instances"] == {"aaaaaaaaaaaa": 2}


@pytest.mark.parametrize("site", [{"max_inflight": "1", "settings": "hold_timeout = 2s\n"}], indirect=True)
def test_a_request_that_finds_no_slot_within_the_hold_timeout_gets_503_model_busy(site: Site) -> None:
    client = Client(site.platform)
    error: list[Any] = []

    async def scenario() -> None:
        first = asyncio.ensure_future(client.stream("long", 0, {"stub_delay": 0.5}))  # 3.5 s
        await client.until(lambda: "long" in client.heads)
        try:
            await client.stream("late", 0, LIGHT)
        except BridgeError as exc:
            error.append(exc)
        await first

    asyncio.run(scenario())
    (exc,) = error
    assert (exc.status, exc.code, exc.retry_after) == (503, "model_busy", 10)
    assert [p.stage for p in client.progress["late"]] == ["busy"]  # after 1 s; then the bound (2 s)
    assert [rid for rid, _ in site.started()] == ["long"]


@pytest.fixture
def fcfs_site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path, policy="fcfs", scheduling_policy="fcfs", max_inflight="2")
    try:
        yield s
    finally:
        s.close()


def test_an_fcfs_service_gets_no_priority_field_but_the_router_still_orders_by_priority(fcfs_site: Site) -> None:
    """The stub, like vLLM, refuses a nonzero priority under fcfs: every request succeeds, so none
    carried one; the client's own field is removed too. The router's queue still orders them."""
    client = Client(fcfs_site.platform)

    async def scenario() -> None:
        tasks = await queue_after_two_heavy(fcfs_site, client, [("late", 50, {**LIGHT, "priority": -7}),
                                                                ("early", -50, LIGHT)])
        await asyncio.gather(*tasks)

    asyncio.run(scenario())
    assert set(client.status.values()) == {200}
    assert fcfs_site.started() == [("h1", 0), ("h2", 0), ("early", 0), ("late", 0)]


def test_the_stub_refuses_a_priority_under_fcfs_as_vllm_does() -> None:
    proc, port = start_stub("fcfs")
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
                                     data=json.dumps({"model": "m", "messages": ASK, "priority": 3}).encode(),
                                     headers={"Authorization": "Bearer tok", "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=5)  # noqa: S310 - loopback
        assert err.value.code == 400
        assert "Priority scheduling is not enabled" in json.loads(err.value.read())["error"]["message"]
    finally:
        proc.kill()
        proc.wait()


# -- a cold start -------------------------------------------------------------------------


def test_requests_held_through_a_cold_start_are_admitted_in_priority_order(tmp_path: Path) -> None:
    slow = tmp_path / "slow-stub.sh"  # the instance takes 2 s to listen: every request below is held
    slow.write_text((SUPPORT / "stub.sh").read_text().replace("exec ", "export STUB_MODE=slow:2\nexec ", 1))
    config = local_services(tmp_path / "services.ini", tmp_path / "state", "rp",
                            stub_service("cold", "cold-model", template=slow, max_inflight="1"),
                            min_interval="0", hold_timeout="60s")
    platform = Platform(PlatformConfig(name="local", transport="local", hpcside_config=str(config))).start()
    client = Client(platform, model="cold-model")
    order = [("r0", 5), ("r1", 3), ("r2", 9), ("r3", 0), ("r4", 3)]

    async def scenario() -> None:
        tasks = []
        for rid, priority in order:
            tasks.append(asyncio.ensure_future(client.stream(rid, priority, {"stub_delay": 0.02})))
            await asyncio.sleep(0.05)
        await asyncio.gather(*tasks)

    try:
        asyncio.run(scenario())
        routes = (read_json(tmp_path / "state" / "routing.json") or {})["models"]["cold-model"]
        port = int(routes[0]["url"].rsplit(":", 1)[1])
        started = [(rid, prio) for rid, prio in stats(port)["started"]]
    finally:
        platform.stop()
        LocalLauncher(tmp_path / "state").kill_all("rp.")
    assert started == [("r3", 0), ("r1", 3), ("r4", 3), ("r0", 5), ("r2", 9)]
    for rid, _ in order:  # each was held (cold-start stages), then told it was going to an instance
        stages = [p.stage for p in client.progress[rid]]
        assert stages[-1] == "ready" and set(stages[:-1]) <= {"requested", "queued", "starting", "busy"}, stages


def test_the_stub_with_few_seats_starts_waiting_requests_in_priority_order() -> None:
    """--max-num-seqs 1: what waits inside the stand-in is ordered as in vLLM's priority queue."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(SUPPORT / "stub_vllm.py"), "--port", str(port), "--model", "m",
                             "--scheduling-policy", "priority", "--max-num-seqs", "1"],
                            env={**os.environ, "VLLM_API_KEY": "tok"}, stdout=subprocess.DEVNULL)

    def post(rid: str, priority: int, delay: float) -> None:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
                                     data=json.dumps({"model": "m", "messages": ASK, "priority": priority,
                                                      "stub_delay": delay}).encode(),
                                     headers={"Authorization": "Bearer tok", "x-request-id": rid})
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback
            assert resp.status == 200

    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        threads = []
        for rid, priority, delay in [("first", 9, 0.1), ("later", 5, 0), ("sooner", 1, 0)]:
            threads.append(threading.Thread(target=post, args=(rid, priority, delay)))
            threads[-1].start()
            time.sleep(0.1)
        for t in threads:
            t.join()
        assert stats(port)["started"] == [["first", 9], ["sooner", 1], ["later", 5]]
    finally:
        proc.kill()
        proc.wait()
