"""Faults under load on the real stack: no request lost.

Real parts: a 3-node Slurm, sshd with the ForceCommand key, hpcside (session server, router,
scheduler), the gateway on daphne with PostgreSQL and Redis, and the official openai async client
with many concurrent streams. The instances are the streaming stand-in (tests/support/stub_vllm.py)
run as Slurm jobs, emitting tokens at a steady pace and continuing a partial reply as greedy
decoding does. Each test asserts what a user would notice: every stream's text whole and once,
no error for a request that starts after the fault, nothing hung.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Hpcside
from tests.harness.accounts import Account
from tests.harness.slurm import SlurmCluster
from tests.harness.sshd import SSHServer
from tests.live import LiveApp

pytestmark = [pytest.mark.slurm, pytest.mark.sshd, pytest.mark.postgres, pytest.mark.redis, pytest.mark.root,
              pytest.mark.live]

SENTENCE = "The capital of France is Paris."
ASK = [{"role": "user", "content": "What is the capital of France?"}]
REPEAT = 8  # 56 tokens at 20 per second: a stream lasts about 3 s
DELAY = 0.05


class Stack:
    def __init__(self, cluster: SlurmCluster, h: Hpcside, sshd: SSHServer, app: LiveApp, key: str) -> None:
        self.cluster, self.h, self.sshd, self.app, self.key = cluster, h, sshd, app, key
        self.app_logs = ""

    def ready(self) -> list[dict]:
        return [i for i in self.h.ready() if i["job_id"]]

    def wait_ready(self, count: int, timeout: float = 90) -> list[dict]:
        return self.h.until(lambda: len(self.ready()) >= count and self.ready(), timeout=timeout,
                            what=f"{count} ready instances")

    def client(self) -> Any:
        import openai

        return openai.AsyncOpenAI(base_url=f"{self.app.url}/v1", api_key=self.key, max_retries=0, timeout=120)


@contextmanager
def build_stack(account: Account, deployment: Path, *, walltime: str = "10m", renewal_margin: str = "1m",
                extra_env: dict[str, str] | None = None) -> Iterator[Stack]:
    """The whole stack with two ready stand-in instances (also used by bench/chaos.py)."""
    with SlurmCluster(["n1", "n2", "n3"], account) as cluster:
        h = Hpcside(deployment, account, cluster)
        h.write_config(h.stub_service(min_instances=2, max_instances=3, scale_up_inflight=1000,
                                      scale_down_delay="1h", readiness_timeout="60s", walltime=walltime,
                                      renewal_margin=renewal_margin),
                       hold_timeout="90s", min_interval="1s")
        try:
            with SSHServer(h.account, h.deployment, h.config, slurm_env=f"SLURM_CONF={cluster.conf}") as sshd:
                app = LiveApp(db="postgresql", redis_url="redis://127.0.0.1:6379/5", extra_env={
                    "LIMIT_PARALLEL_STREAMS": "2000", "LIMIT_REQUESTS_PER_MINUTE": "1000000",
                    "PYTHONASYNCIODEBUG": "1",  # slow callbacks on daphne's loop are logged: none may be
                    "HPC_PLATFORMS": json.dumps([{
                        "name": "hpc", "transport": "ssh", "host": "127.0.0.1", "port": sshd.port,
                        "user": h.account.name, "key_file": str(sshd.client_key),
                        "known_hosts": str(sshd.known_hosts)}]), **(extra_env or {})})
                app.start()
                app.create_user("alice")
                stack = Stack(cluster, h, sshd, app, app.create_key("alice"))
                try:
                    stack.wait_ready(2)
                    yield stack
                finally:
                    app.stop_workers()
                    stack.app_logs = app.logs()
                    app.stop()
        finally:
            h.cleanup()


@pytest.fixture(scope="module")
def stack(account: Account, deployment: Path) -> Iterator[Stack]:
    with build_stack(account, deployment) as s:
        yield s
    # asyncio's debug mode logs every callback that held daphne's event loop for 100 ms or more. On
    # this shared 2-core machine a busy moment stretches an ordinary step past that, even past half a
    # second with 16 streams on top of Slurm, sshd and PostgreSQL; a blocking call (a lock or an Event
    # waited on the loop, a sync connect) holds it for a second or more.
    slow = [line for line in s.app_logs.splitlines() if "Executing <" in line and " took " in line
            and float(line.rsplit(" took ", 1)[1].split()[0]) >= 1.0]
    assert not slow, f"daphne's event loop was blocked: {slow[:3]}"


async def one_stream(client: Any, repeat: int = REPEAT) -> tuple[str, str | None]:
    text = ""
    try:
        stream = await client.chat.completions.create(
            model="stub-model", messages=ASK, stream=True, extra_body={"stub_delay": DELAY, "stub_repeat": repeat})
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
        return text, None
    except Exception as exc:  # noqa: BLE001 - what the client sees is the result
        return text, f"{type(exc).__name__}: {exc}"


async def one_request(client: Any) -> str | None:
    try:
        reply = await client.chat.completions.create(model="stub-model", messages=ASK)
        return None if SENTENCE in (reply.choices[0].message.content or "") else "wrong answer"
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"


async def under_load(stack: Stack, fault: Callable[[], Awaitable[None]], streams: int = 16,
                     after: int = 16) -> tuple[list[tuple[str, str | None]], list[str | None]]:
    """``streams`` streams; the fault one second in; then ``after`` new requests. Nothing may hang."""
    client = stack.client()
    running = [asyncio.ensure_future(one_stream(client)) for _ in range(streams)]
    await asyncio.sleep(1.0)
    await fault()
    later = await asyncio.wait_for(asyncio.gather(*[one_request(client) for _ in range(after)]), 150)
    done = await asyncio.wait_for(asyncio.gather(*running), 150)
    await client.close()
    return done, later


def assert_nothing_lost(done: list[tuple[str, str | None]], later: list[str | None]) -> None:
    errors = [e for _, e in done if e]
    assert not errors, f"{len(errors)} of {len(done)} streams failed: {errors[:3]}"
    broken = [t for t, _ in done if t != SENTENCE * REPEAT]
    assert not broken, f"{len(broken)} streams lost or repeated text at the splice: {broken[0]!r}"
    failed = [e for e in later if e]
    assert not failed, f"{len(failed)} of {len(later)} requests after the fault failed: {failed[:3]}"


def test_a_killed_instance_of_two_loses_no_stream_and_refuses_no_request(stack: Stack) -> None:
    victim = stack.wait_ready(2)[0]

    async def kill() -> None:
        assert stack.cluster.kill_job_processes(victim["job_id"]) >= 1

    done, later = asyncio.run(under_load(stack, kill))
    assert_nothing_lost(done, later)
    stack.wait_ready(2)  # replaced


def test_when_every_instance_dies_streams_go_on_once_the_replacements_are_ready(stack: Stack) -> None:
    victims = stack.wait_ready(2)

    async def kill_all() -> None:
        for victim in victims:
            stack.cluster.kill_job_processes(victim["job_id"])

    done, later = asyncio.run(under_load(stack, kill_all, streams=8, after=8))
    assert_nothing_lost(done, later)
    assert not {v["id"] for v in victims} & {i["id"] for i in stack.wait_ready(2)}


def test_with_slurmctld_down_the_ready_instances_go_on_serving(stack: Stack) -> None:
    stack.wait_ready(2)

    async def outage() -> None:
        stack.cluster.stop_controller()

    try:
        done, later = asyncio.run(under_load(stack, outage))
        assert_nothing_lost(done, later)
    finally:
        stack.cluster.restart_controller()
    stack.wait_ready(2)


def test_a_cut_ssh_link_loses_no_stream(stack: Stack) -> None:
    stack.wait_ready(2)

    async def cut() -> None:
        assert stack.sshd.kill_sessions() >= 1

    done, later = asyncio.run(under_load(stack, cut))
    assert_nothing_lost(done, later)


def test_a_killed_session_server_loses_no_stream(stack: Stack) -> None:
    stack.wait_ready(2)

    async def kill_server() -> None:
        out = subprocess.run(["pkill", "-KILL", "-u", stack.h.account.name, "-f", "hpcside.*forcecommand"],
                             check=False)
        assert out.returncode == 0, "no session server found"

    done, later = asyncio.run(under_load(stack, kill_server))
    assert_nothing_lost(done, later)


def test_a_lost_node_loses_no_stream(stack: Stack) -> None:
    victim = stack.wait_ready(2)[0]

    async def node_dies() -> None:
        stack.cluster.kill_node(victim["node"])

    done, later = asyncio.run(under_load(stack, node_dies))
    assert_nothing_lost(done, later)
    stack.h.until(lambda: len(stack.ready()) >= 2 and all(i["node"] != victim["node"] for i in stack.ready()),
                  timeout=120, what="two ready instances on live nodes")


def test_walltime_renewal_under_load_drops_no_stream(account: Account, deployment: Path) -> None:
    # A 2-minute walltime with a 100 s margin: each instance is renewed 20 s after it starts; the
    # successor takes new requests and the old one drains its streams before it is cancelled.
    with build_stack(account, deployment, walltime="2m", renewal_margin="100s") as stack:
        first = {i["id"] for i in stack.ready()}

        async def load_through_renewal() -> tuple[list[tuple[str, str | None]], list[str | None]]:
            client = stack.client()
            results: list[tuple[str, str | None]] = []
            deadline = asyncio.get_running_loop().time() + 40

            async def worker() -> None:
                while asyncio.get_running_loop().time() < deadline:
                    results.append(await one_stream(client))

            await asyncio.wait_for(asyncio.gather(*[worker() for _ in range(8)]), 120)
            later = await asyncio.gather(*[one_request(client) for _ in range(8)])
            await client.close()
            return results, list(later)

        done, later = asyncio.run(load_through_renewal())
        assert_nothing_lost(done, later)
        renewed = {i["id"] for i in stack.wait_ready(2)} - first
        assert renewed, "no instance was renewed during the run"
        log = (stack.h.state / "hpcside.log").read_text()
        assert "drained and idle" in log and "walltime ends" not in log
