"""A login node behind a bastion (ProxyJump), on REAL sshd: the data link through it, and
`manage.py hpcside deploy` (Fabric) from nothing to a working bridge."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from hpcbridge.client import Head, Platform
from hpcbridge.config import JumpHost, PlatformConfig, PlatformConfigError, parse_platform
from hpcbridge.deploy import merge_key_line
from hpcbridge.links import HostKeyRefused, ssh_connect
from tests.conftest import Hpcside
from tests.harness.accounts import Account
from tests.harness.bastion import Bastion
from tests.harness.sshd import SSHD, SSHServer, keygen

pytestmark = [pytest.mark.sshd, pytest.mark.root]
CHAT = {"model": "stub-model", "messages": [{"role": "user", "content": "hello"}]}


def test_proxy_jump_is_validated(tmp_path: Path) -> None:
    key, known = tmp_path / "key", tmp_path / "known_hosts"
    key.write_text("k")
    known.write_text("")
    base = {"name": "p", "host": "login", "user": "svc", "key_file": str(key), "known_hosts": str(known)}
    cfg = parse_platform({**base, "proxy_jump": {"host": "bastion", "user": "jump"}}, 0)
    assert cfg.proxy_jump == JumpHost("bastion", 22, "jump", str(key), str(known))
    for jump, message in [("bastion", "must be an object"), ({"host": "b"}, "proxy_jump.user: required"),
                          ({"host": "b", "user": "j", "port": 0}, "proxy_jump.port"),
                          ({"host": "b", "user": "j", "via": "x"}, "proxy_jump.via: unknown field"),
                          ({"host": "b", "user": "j", "known_hosts": "/nope"}, "proxy_jump.known_hosts")]:
        with pytest.raises(PlatformConfigError, match=message):
            parse_platform({**base, "proxy_jump": jump}, 0)


def test_the_key_line_is_installed_once_and_replaces_an_older_one() -> None:
    line = 'restrict,command="cd /new && exec python3 -m hpcside forcecommand" ssh-ed25519 AAAAkey web'
    old = 'restrict,command="cd /old && exec python3 -m hpcside forcecommand" ssh-ed25519 AAAAkey web'
    other = "ssh-ed25519 AAAAother operator"
    assert merge_key_line(f"{other}\n{old}\n", line) == f"{other}\n{line}\n"
    assert merge_key_line(merge_key_line("", line), line) == f"{line}\n"


@pytest.fixture(scope="module")
def side(deployment: Path, account: Account) -> Iterator[Hpcside]:
    h = Hpcside(deployment, account, None)
    h.write_config(h.stub_service(min_instances=0, idle_timeout="10m"), hold_timeout="20s")
    yield h
    h.cleanup()


def jump_config(cfg: PlatformConfig, bastion: Bastion, known_hosts: str = "") -> PlatformConfig:
    return PlatformConfig(**{**cfg.__dict__, "proxy_jump": JumpHost(
        "127.0.0.1", bastion.port, bastion.user, cfg.key_file, known_hosts or str(bastion.known_hosts))})


async def chat(plat: Platform) -> list[Any]:
    return [e async for e in plat.stream("POST", "/v1/chat/completions", "stub-model",
                                         {"content-type": "application/json"}, json.dumps(CHAT).encode())]


async def round_trips(plat: Platform, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        async for _event in plat.stream("GET", "/health", "", {}, b""):
            pass
        out.append(time.perf_counter() - start)
    return out


def through(cfg: PlatformConfig) -> list[Any]:
    plat = Platform(cfg).start()
    try:
        return asyncio.run(chat(plat))
    finally:
        plat.stop()


def test_the_bridge_works_through_the_bastion_and_refuses_an_unknown_bastion_key(side: Hpcside,
                                                                                  tmp_path: Path) -> None:
    with SSHServer(side.account, side.deployment, side.config) as login:
        bastion = Bastion(login.port, [Path(f"{login.client_key}.pub").read_text()]).start()
        try:
            cfg = jump_config(PlatformConfig(name="jumped", host="127.0.0.1", port=login.port, user=side.account.name,
                                             key_file=str(login.client_key), known_hosts=str(login.known_hosts),
                                             keepalive=1.0, dead_after=5.0), bastion)
            events = through(cfg)
            heads = [e for e in events if isinstance(e, Head)]
            assert heads and heads[0].status == 200, events
            assert f"Accepted publickey for {bastion.user}" in bastion.log()
            # No delayed-ACK stall on the extra hop: the body follows the head at once (was ~40 ms).
            plat = Platform(cfg).start()
            try:
                rts = asyncio.run(round_trips(plat, 40))
            finally:
                plat.stop()
            assert statistics.median(rts) < 0.015, sorted(rts)
            # The bastion only forwards to the login node: no shell for the jump account.
            client, jump = ssh_connect(cfg)
            assert jump is not None
            _in, out, _err = jump.exec_command("id")
            assert b"uid=" not in out.read()
            client.close()
            jump.close()
            # Another host key for the bastion on file: refused before any authentication.
            wrong = tmp_path / "wrong_known_hosts"
            other = keygen(tmp_path / "other_host", "someone-else")
            wrong.write_text(f"[127.0.0.1]:{bastion.port} {' '.join(other.split()[:2])}\n")
            with pytest.raises(HostKeyRefused, match="CHANGED"):
                ssh_connect(jump_config(cfg, bastion, str(wrong)))
            unknown = tmp_path / "empty_known_hosts"
            unknown.write_text("")
            with pytest.raises(HostKeyRefused, match="not in"):
                ssh_connect(jump_config(cfg, bastion, str(unknown)))
        finally:
            bastion.stop()


@pytest.fixture
def bare_login(side: Hpcside) -> Iterator[dict[str, Any]]:
    """A login node where nothing is deployed: the functional account's authorized_keys holds only
    the operator's own key (a normal shell: before the service key is locked)."""
    root = Path(tempfile.mkdtemp(prefix="chatai-bare-", dir="/run"))
    root.chmod(0o755)
    keys, opt = root / "keys", root / "opt"
    for d in (keys, opt):
        d.mkdir(mode=0o755)
        shutil.chown(d, side.account.name, side.account.name)
    operator, web = root / "operator_key", root / "web_key"
    operator_pub, web_pub = keygen(operator, "operator"), keygen(web, "chatai-web")
    (keys / side.account.name).write_text(operator_pub + "\n")
    shutil.chown(keys / side.account.name, side.account.name, side.account.name)
    (keys / side.account.name).chmod(0o600)
    server = SSHServer(side.account, side.deployment, side.config, root=root / "sshd")
    server.root.mkdir()
    server.root.chmod(0o755)
    host_pub = keygen(server.root / "host_key", "chatai-test-host")
    from tests.harness.slurm import free_port

    server.port = free_port()
    server.known_hosts.write_text(f"[127.0.0.1]:{server.port} {' '.join(host_pub.split()[:2])}\n")
    (server.root / "sshd_config").write_text("\n".join([
        f"Port {server.port}", "ListenAddress 127.0.0.1", f"HostKey {server.root / 'host_key'}",
        f"PidFile {server.root / 'sshd.pid'}", f"AuthorizedKeysFile {keys}/%u", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "UsePAM no", "PubkeyAuthentication yes",
        f"AllowUsers {side.account.name}", "StrictModes yes", "LogLevel VERBOSE", "PrintMotd no"]) + "\n")
    assert Path(SSHD).exists()
    server.launch()
    bastion = Bastion(server.port, [operator_pub, web_pub]).start()
    services = root / "services.ini"
    shutil.copy(side.config, services)
    try:
        yield {"root": root, "keys": keys / side.account.name, "opt": opt, "operator": operator, "web": web,
               "server": server, "bastion": bastion, "services": services}
    finally:
        bastion.stop()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_deploy_from_nothing_to_a_working_bridge_through_the_bastion(side: Hpcside, bare_login: dict[str, Any],
                                                                      settings: Any) -> None:
    b = bare_login
    server, bastion = b["server"], b["bastion"]
    platform = {"name": "far", "transport": "ssh", "host": "127.0.0.1", "port": server.port,
                "user": side.account.name, "key_file": str(b["web"]), "known_hosts": str(server.known_hosts),
                "keepalive": 1.0, "dead_after": 5.0,
                "proxy_jump": {"host": "127.0.0.1", "port": bastion.port, "user": bastion.user,
                               "known_hosts": str(bastion.known_hosts)}}
    settings.HPC_PLATFORMS = [platform]
    # The operator's own ssh_config: the login node behind the bastion, their key for both hops.
    ssh_config = b["root"] / "ssh_config"
    ssh_config.write_text(f"Host far-login\n  HostName 127.0.0.1\n  Port {server.port}\n"
                          f"  ProxyJump {bastion.user}@127.0.0.1:{bastion.port}\n"
                          f"Host *\n  IdentityFile {b['operator']}\n  IdentitiesOnly yes\n")
    args = ["hpcside", "deploy", "far", "--host", "far-login", "--login", side.account.name,
            "--ssh-config", str(ssh_config), "--remote-root", str(b["opt"]),
            "--remote-config", f"{b['opt']}/services.ini", "--services", str(b["services"]),
            "--authorized-keys", str(b["keys"])]
    out = io.StringIO()
    call_command(*args, "--dry-run", stdout=out)
    assert out.getvalue().count("(dry run: not done)") == 6, out.getvalue()
    assert list(b["opt"].iterdir()) == [] and "chatai-web" not in b["keys"].read_text()
    assert "Accepted publickey" not in bastion.log()

    out = io.StringIO()
    call_command(*args, stdout=out)
    text = out.getvalue()
    assert "installed" in text and "protocol 1" in text and "deployed" in text, text
    # The deploy went through the bastion (the operator's ProxyJump) with the operator's key.
    assert f"Accepted publickey for {bastion.user}" in bastion.log()
    lines = b["keys"].read_text().splitlines()
    assert len(lines) == 2 and lines[1].startswith('restrict,command="cd ' + str(b["opt"]) + "/hpcside-")
    # Idempotent: a second deploy changes nothing in authorized_keys.
    out = io.StringIO()
    call_command(*args, stdout=out)
    assert "already installed" in out.getvalue() and b["keys"].read_text().splitlines() == lines
    # The web key now reaches only the ForceCommand, and the bridge works through the bastion.
    cfg = parse_platform(platform, 0)
    client, jump = ssh_connect(cfg)
    _in, stdout, _err = client.exec_command("id")
    assert b"uid=" not in stdout.read()
    client.close()
    assert jump is not None
    jump.close()
    events = through(cfg)
    heads = [e for e in events if isinstance(e, Head)]
    assert heads and heads[0].status == 200, events


def test_deploy_refuses_an_unknown_login_host_key(side: Hpcside, bare_login: dict[str, Any], settings: Any,
                                                   tmp_path: Path) -> None:
    b = bare_login
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    settings.HPC_PLATFORMS = [{"name": "far", "transport": "ssh", "host": "127.0.0.1", "port": b["server"].port,
                               "user": side.account.name, "key_file": str(b["web"]), "known_hosts": str(empty)}]
    with pytest.raises(CommandError, match="not found in known_hosts"):
        call_command("hpcside", "deploy", "far", "--login", side.account.name, "-i", str(b["operator"]),
                     "--ssh-config", "/dev/null", "--remote-root", str(b["opt"]), "--services", str(b["services"]),
                     "--authorized-keys", str(b["keys"]), stdout=io.StringIO())
    assert list(b["opt"].iterdir()) == []
