"""The secure pipe over a REAL sshd: the restricted key, the session server, the bridge."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hpcbridge.client import BridgeError, Head, Platform, PlatformUnavailable, Progress
from hpcbridge.config import PlatformConfig
from tests.conftest import Hpcside
from tests.harness.accounts import Account
from tests.harness.sshd import SSHServer, keygen

pytestmark = [pytest.mark.sshd, pytest.mark.root]


@pytest.fixture(scope="module")
def side(deployment: Path, account: Account) -> Iterator[Hpcside]:
    """hpcside with the local launcher (the stub starts in well under a second)."""
    h = Hpcside(deployment, account, None)
    h.write_config(h.stub_service(min_instances=0, idle_timeout="10m"), hold_timeout="20s")
    yield h
    h.cleanup()


@pytest.fixture(scope="module")
def sshd(side: Hpcside) -> Iterator[SSHServer]:
    with SSHServer(side.account, side.deployment, side.config) as server:
        yield server


def platform_config(sshd: SSHServer, **kw: Any) -> PlatformConfig:
    values: dict[str, Any] = dict(name="test", transport="ssh", host="127.0.0.1", port=sshd.port,
                                  user=sshd.account.name, key_file=str(sshd.client_key),
                                  known_hosts=str(sshd.known_hosts), keepalive=1.0, dead_after=5.0)
    values.update(kw)
    return PlatformConfig(**values)


@pytest.fixture
def platform(sshd: SSHServer) -> Iterator[Platform]:
    plat = Platform(platform_config(sshd)).start()
    try:
        yield plat
    finally:
        plat.stop()


CHAT = {"model": "stub-model", "messages": [{"role": "user", "content": "hello"}]}


async def collect(plat: Platform, body: dict[str, Any], path: str = "/v1/chat/completions",
                  headers: dict[str, str] | None = None) -> list[tuple[float, Any]]:
    start = time.monotonic()
    out = []
    async for event in plat.stream("POST", path, body.get("model", ""), headers or {"content-type": "application/json"},
                                   json.dumps(body).encode()):
        out.append((time.monotonic() - start, event))
    return out


def stub_stats(side: Hpcside) -> dict[str, Any]:
    (entry,) = side.routing()["models"]["stub-model"]
    with urllib.request.urlopen(f"{entry['url']}/stub/stats", timeout=5) as resp:  # noqa: S310 - loopback
        return dict(json.load(resp))


# -- the key itself ---------------------------------------------------------------------


def test_the_key_cannot_run_a_shell(sshd: SSHServer, tmp_path: Path) -> None:
    marker = tmp_path / "owned"
    for command in (f"id; touch {marker}; rm -rf /", f"serve; touch {marker}", "id", "bash", "serve --help"):
        proc = sshd.ssh(command=command)
        assert proc.returncode == 1, command
        assert proc.stderr.startswith(b"hpcside: command") and b"uid=" not in proc.stdout
        assert b"Traceback" not in proc.stderr
    assert not marker.exists()
    assert sshd.ssh().returncode == 1  # no command: no login shell either
    assert b"serve" in sshd.ssh(command="").stderr


def test_the_key_cannot_forward_ports_or_get_a_terminal(sshd: SSHServer) -> None:
    local = sshd.ssh("-N", "-o", "ExitOnForwardFailure=yes", "-L", "0:127.0.0.1:22", timeout=15)
    assert local.returncode != 0
    remote = sshd.ssh("-N", "-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:22", timeout=15)
    assert remote.returncode != 0
    stdio = sshd.ssh("-W", "127.0.0.1:22", timeout=15)
    assert stdio.returncode != 0 and not stdio.stdout.startswith(b"SSH-")
    tty = sshd.ssh("-tt", command="version", timeout=15)
    assert b"PTY allocation request failed" in tty.stderr or b"pty" in tty.stderr.lower()


def test_the_key_line_uses_restrict_with_the_forced_command(sshd: SSHServer) -> None:
    # restrict turns off every forwarding, the pty and ~/.ssh/rc, and whatever later OpenSSH adds;
    # the tests above show this sshd honours it.
    line = (sshd.root / "authorized_keys" / sshd.account.name).read_text()
    options = line.split(" ssh-ed25519 ")[0]
    assert options.startswith('restrict,command="') and options.endswith(' forcecommand"'), options


def test_the_allowed_verbs_answer(sshd: SSHServer) -> None:
    version = sshd.ssh(command="version")
    assert version.returncode == 0 and version.stdout.startswith(b"hpcside ")
    ping = sshd.ssh(command="ping")
    assert ping.returncode == 0 and "slurm_ok" in json.loads(ping.stdout)
    status = sshd.ssh(command="status")
    assert status.returncode == 0 and json.loads(status.stdout)["services"][0]["model"] == "stub-model"


def test_a_refused_command_is_logged_without_its_content(sshd: SSHServer, side: Hpcside) -> None:
    secret = "canary-7f3a9 rm -rf"
    assert sshd.ssh(command=secret).returncode == 1
    log = (side.state / "hpcside.log").read_text()
    assert "refused command" in log and "canary-7f3a9" not in log


# -- the bridge over SSH ------------------------------------------------------------------


def test_a_cold_model_is_held_with_progress_then_streams(platform: Platform, side: Hpcside) -> None:
    events = asyncio.run(collect(platform, {**CHAT, "stream": True}))
    kinds = [type(e).__name__ for _, e in events]
    assert kinds[0] == "Progress" and "Head" in kinds
    stages = [e.stage for _, e in events if isinstance(e, Progress)]
    assert stages[-1] == "ready"
    head = next(e for _, e in events if isinstance(e, Head))
    assert head.status == 200 and head.headers["content-type"] == "text/event-stream"
    body = b"".join(e for _, e in events if isinstance(e, bytes))
    assert b"Paris" in body and body.endswith(b"data: [DONE]\n\n")


def test_a_stream_arrives_incrementally(platform: Platform, side: Hpcside) -> None:
    events = asyncio.run(collect(platform, {**CHAT, "stream": True, "stub_delay": 0.2}))
    times = [t for t, e in events if isinstance(e, bytes)]
    assert len(times) >= 7
    assert times[-1] - times[0] >= 1.0  # spread out as the model "writes", not delivered at the end


def test_non_streaming_requests_and_local_answers(platform: Platform) -> None:
    head, body = asyncio.run(platform.request("POST", "/v1/chat/completions", "stub-model",
                                              {"content-type": "application/json"}, json.dumps(CHAT).encode()))
    assert head.status == 200 and json.loads(body)["choices"][0]["message"]["content"].endswith("Paris.")
    head, body = asyncio.run(platform.request("GET", "/v1/models"))
    models = json.loads(body)["data"]
    assert models[0]["id"] == "stub-model" and models[0]["status"] in ("ready", "starting", "queued", "offline")


def test_only_allow_listed_headers_reach_the_instance_with_its_own_token(platform: Platform, side: Hpcside) -> None:
    asyncio.run(platform.request("POST", "/v1/chat/completions", "stub-model",
                                 {"content-type": "application/json", "authorization": "Bearer user-key",
                                  "cookie": "sessionid=abc", "x-forwarded-for": "1.2.3.4", "x-request-id": "r-1"},
                                 json.dumps(CHAT).encode()))
    seen = stub_stats(side)["last_headers"]
    (entry,) = side.routing()["models"]["stub-model"]
    assert seen["authorization"] == f"Bearer {entry['token']}"
    assert "cookie" not in seen and "x-forwarded-for" not in seen
    assert seen["x-request-id"] == "r-1"


@pytest.mark.parametrize("path,model,status,code", [
    ("/etc/passwd", "stub-model", 404, "not_found"),
    ("/v1/chat/completions/../../admin", "stub-model", 404, "not_found"),
    ("/v1/chat/completions", "no-such-model", 404, "model_not_found"),
])
def test_requests_outside_the_allow_list_get_clear_errors(platform: Platform, path: str, model: str,
                                                          status: int, code: str) -> None:
    with pytest.raises(BridgeError) as err:
        asyncio.run(platform.request("POST", path, model, {}, b"{}"))
    assert (err.value.status, err.value.code) == (status, code)


def test_a_client_that_goes_away_cancels_the_upstream_request(platform: Platform, side: Hpcside) -> None:
    asyncio.run(platform.request("POST", "/v1/chat/completions", "stub-model", {}, json.dumps(CHAT).encode()))
    before = stub_stats(side)["cancelled"]

    async def read_a_little() -> None:
        agen = platform.stream("POST", "/v1/chat/completions", "stub-model", {},
                               json.dumps({**CHAT, "stream": True, "stub_delay": 0.05, "stub_repeat": 200}).encode())
        got = 0
        async for event in agen:
            if isinstance(event, bytes):
                got += 1
                if got == 3:
                    break
        await agen.aclose()  # type: ignore[attr-defined]

    asyncio.run(read_a_little())
    deadline = time.monotonic() + 5
    while stub_stats(side)["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stub_stats(side)["cancelled"] == before + 1


def test_many_concurrent_streams_share_one_connection(platform: Platform) -> None:
    async def many() -> list[list[tuple[float, Any]]]:
        return list(await asyncio.gather(*(collect(platform, {**CHAT, "stream": True}) for _ in range(50))))

    results = asyncio.run(many())
    assert all(b"[DONE]" in b"".join(e for _, e in r if isinstance(e, bytes)) for r in results)
    assert platform.state()["connections"] == 1


def test_a_killed_link_ends_its_stream_at_once_and_the_bridge_comes_back(platform: Platform, sshd: SSHServer) -> None:
    asyncio.run(platform.request("GET", "/v1/models"))

    async def interrupted() -> float:
        agen = platform.stream("POST", "/v1/chat/completions", "stub-model", {},
                               json.dumps({**CHAT, "stream": True, "stub_delay": 0.05, "stub_repeat": 200}).encode())
        killed_at = 0.0
        try:
            async for event in agen:
                if isinstance(event, bytes) and not killed_at:
                    killed_at = time.monotonic()
                    await asyncio.get_running_loop().run_in_executor(None, sshd.kill_sessions)
        except BridgeError as exc:
            assert exc.code == "platform_link_lost"
            return time.monotonic() - killed_at
        raise AssertionError("the stream ended without an error")

    assert asyncio.run(interrupted()) < 1.0
    deadline = time.monotonic() + 6
    while not platform.state()["up"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert platform.state()["up"], platform.state()
    head, _ = asyncio.run(platform.request("GET", "/v1/models"))
    assert head.status == 200


def test_requests_fail_fast_while_the_platform_is_down_and_recover(platform: Platform, sshd: SSHServer) -> None:
    asyncio.run(platform.request("GET", "/v1/models"))
    sshd.stop_listener()
    try:
        deadline = time.monotonic() + 3
        while platform.state()["up"] and time.monotonic() < deadline:
            time.sleep(0.05)
        timings = []
        for _ in range(5):
            start = time.monotonic()
            with pytest.raises(PlatformUnavailable) as err:
                asyncio.run(platform.request("GET", "/v1/models"))
            timings.append(time.monotonic() - start)
            assert err.value.status == 503 and err.value.retry_after and err.value.retry_after >= 1
        assert max(timings) < 0.05, timings
    finally:
        sshd.launch()
    deadline = time.monotonic() + 35
    while not platform.state()["up"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert platform.state()["up"]


def test_an_unknown_host_key_is_refused(sshd: SSHServer, tmp_path: Path) -> None:
    other = keygen(tmp_path / "other_host", "not-the-server")
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[127.0.0.1]:{sshd.port} {' '.join(other.split()[:2])}\n")
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    for known, words in ((wrong, "CHANGED"), (empty, "unknown host key")):
        plat = Platform(platform_config(sshd, known_hosts=str(known), connect_timeout=3.0)).start()
        try:
            with pytest.raises(PlatformUnavailable):
                asyncio.run(plat.request("GET", "/v1/models"))
            assert words in plat.state()["last_error"], plat.state()
        finally:
            plat.stop()
    assert empty.read_text() == ""  # never auto-added


def test_a_saturated_connection_gets_a_second_one(sshd: SSHServer) -> None:
    plat = Platform(platform_config(sshd, streams_per_connection=2, max_connections=2)).start()
    try:
        async def many() -> None:
            body = json.dumps({**CHAT, "stream": True, "stub_delay": 0.3}).encode()

            async def one() -> None:
                async for _ in plat.stream("POST", "/v1/chat/completions", "stub-model", {}, body):
                    pass

            await asyncio.gather(*(one() for _ in range(6)))
            await asyncio.gather(*(one() for _ in range(6)))

        asyncio.run(many())
        assert plat.state()["connections"] == 2
    finally:
        plat.stop()
