"""Deploying the HPC side with Fabric: upload hpcside, the services file, check-config, the key line, version.

The operator runs it (``manage.py hpcside deploy PLATFORM``) with an account that may log in with
a normal shell: their own (the functional account's commands then run through ``sudo -u``) or the
functional account before its key is locked. Fabric reads the operator's ssh_config (ProxyJump,
IdentityFile, the agent); host keys are pinned from the platform's known_hosts on every hop
(RejectPolicy: Fabric's default would be AutoAddPolicy). The data link itself stays hpcbridge's
raw paramiko channel (docs/architecture.md).
"""

from __future__ import annotations

import hashlib
import io
import re
import shlex
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fabric
import paramiko

import hpcside
from hpcbridge.config import PlatformConfig
from hpcbridge.links import LinkError, ssh_connect
from hpcside import protocol

HPCSIDE = Path(hpcside.__file__).resolve().parent


class DeployError(Exception):
    """A step failed; the message says which and why."""


@dataclass
class DeployOptions:
    platform: PlatformConfig
    login: str | None = None  # the account that logs in (default: ssh_config's User, else yours)
    host: str | None = None  # an ssh_config Host alias (default: the platform's host and port)
    ssh_config: str | None = None  # default: ~/.ssh/config
    identity: str | None = None  # default: ssh_config's IdentityFile and the agent
    remote_root: str = "~/chatai"  # hpcside-VERSION-HASH/ goes under it
    remote_config: str = "~/.config/hpcside/services.ini"
    services: Path | None = None  # written when given; otherwise the remote file must exist
    authorized_keys: str = "~/.ssh/authorized_keys"
    python: str = "/usr/bin/python3"
    pubkey: Path | None = None  # default: the platform's key_file + .pub
    dry_run: bool = False


def package() -> tuple[bytes, str]:
    """hpcside as a tar (no caches) and its name on the login node: version and content hash."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in sorted(HPCSIDE.rglob("*")):
            if "__pycache__" in path.parts or path.suffix == ".pyc":
                continue
            info = tar.gettarinfo(str(path), arcname=f"hpcside/{path.relative_to(HPCSIDE)}")
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            info.mode = 0o755 if path.is_dir() else 0o644
            if path.is_dir():
                tar.addfile(info)
            else:
                with path.open("rb") as fh:
                    tar.addfile(info, fh)
    data = buf.getvalue()
    return data, f"hpcside-{hpcside.__version__}-{hashlib.sha256(data).hexdigest()[:10]}"


def key_blob(line: str) -> str | None:
    """The key type and base64 of an authorized_keys line (after any options)."""
    parts = line.split()
    for i, part in enumerate(parts):
        if re.fullmatch(r"(ssh-[a-z0-9-]+|ecdsa-sha2-[a-z0-9-]+|sk-[a-z0-9@.-]+)", part) and i + 1 < len(parts):
            return f"{part} {parts[i + 1]}"
    return None


def merge_key_line(current: str, line: str) -> str:
    """authorized_keys with the ForceCommand line for this key exactly once (replacing older lines for it)."""
    blob = key_blob(line)
    kept = [x for x in current.splitlines() if not (x.strip() and not x.lstrip().startswith("#")
                                                    and key_blob(x) == blob)]
    return "\n".join([*kept, line]) + "\n"


class Deployer:
    def __init__(self, opts: DeployOptions, say: Callable[[str], None]) -> None:
        self.opts, self.cfg, self.say = opts, opts.platform, say
        self.conn: fabric.Connection | None = None
        self.home = "~"  # the functional account's, resolved once connected

    # -- the connection -------------------------------------------------------------------

    def connect(self) -> fabric.Connection:
        config = fabric.Config(runtime_ssh_path=self.opts.ssh_config) if self.opts.ssh_config else fabric.Config()
        kwargs: dict[str, Any] = {"config": config, "connect_timeout": int(self.cfg.connect_timeout)}
        if self.opts.identity:
            kwargs["connect_kwargs"] = {"key_filename": [self.opts.identity]}
        if self.opts.host:
            conn = fabric.Connection(self.opts.host, user=self.opts.login, **kwargs)
        else:
            conn = fabric.Connection(self.cfg.host, user=self.opts.login, port=self.cfg.port, **kwargs)
        jump_known = self.cfg.proxy_jump.known_hosts if self.cfg.proxy_jump else self.cfg.known_hosts
        pin(conn, self.cfg.known_hosts)
        hop = conn.gateway
        while isinstance(hop, fabric.Connection):  # ProxyJump from the operator's ssh_config
            pin(hop, jump_known)
            hop = hop.gateway
        try:
            conn.open()
        except paramiko.BadHostKeyException as exc:
            raise DeployError(f"the host key of {exc.hostname} CHANGED; refusing (check it out of band)") from None
        except paramiko.SSHException as exc:
            raise DeployError(f"cannot log in to {conn.host}:{conn.port} as {conn.user}: {exc}") from None
        except OSError as exc:
            raise DeployError(f"cannot reach {conn.host}:{conn.port}: {exc}") from None
        return conn

    def as_service(self, command: str) -> str:
        """A command line run as the functional account (directly, or through sudo from the operator's)."""
        assert self.conn is not None
        if self.conn.user == self.cfg.user:
            return command
        return f"sudo -n -u {shlex.quote(self.cfg.user)} -H -- sh -c {shlex.quote(command)}"

    def run(self, command: str, what: str) -> str:
        assert self.conn is not None
        # in_stream=False: Fabric's default shares one stdin among threads and breaks the connection.
        result = self.conn.run(self.as_service(command), hide=True, warn=True, in_stream=False)
        if result.exited != 0:
            raise DeployError(f"{what} failed (exit {result.exited}): {(result.stderr or result.stdout).strip()}")
        return str(result.stdout)

    def feed(self, command: str, data: bytes, what: str) -> str:
        """Run a command with ``data`` on its stdin (binary safe: a tar, a file's content)."""
        assert self.conn is not None and self.conn.transport is not None
        channel = self.conn.transport.open_session(timeout=self.cfg.connect_timeout)
        try:
            channel.exec_command(self.as_service(command))
            channel.sendall(data)
            channel.shutdown_write()
            out, err = channel.makefile("rb").read(), channel.makefile_stderr("rb").read()
            status = channel.recv_exit_status()
        finally:
            channel.close()
        if status != 0:
            raise DeployError(f"{what} failed (exit {status}): {(err or out).decode(errors='replace').strip()}")
        return out.decode(errors="replace")

    def path(self, remote: str) -> str:
        return self.home + remote[1:] if remote.startswith("~/") else remote

    # -- the steps ------------------------------------------------------------------------

    def deploy(self) -> str:
        tar, name = package()
        pubkey_path = self.opts.pubkey or Path(f"{self.cfg.key_file}.pub")
        pubkey = pubkey_path.read_text()
        dest = f"{self.opts.remote_root}/{name}"
        steps = [
            ("connect", f"ssh {self.opts.host or f'{self.cfg.host}:{self.cfg.port}'} as "
                        f"{self.opts.login or 'the ssh_config user'} (host keys pinned from {self.cfg.known_hosts})"),
            ("upload", f"hpcside {hpcside.__version__} ({len(tar)} bytes, tar over the connection) to {dest}"),
            ("services", f"write {self.opts.services} to {self.opts.remote_config}" if self.opts.services
             else f"check that {self.opts.remote_config} exists"),
            ("check-config", f"{self.opts.python} -m hpcside --config {self.opts.remote_config} check-config"),
            ("key", f"the ForceCommand line for {pubkey_path} in {self.opts.authorized_keys} (once)"),
            ("version", f"`version` through the ForceCommand as {self.cfg.user}: protocol {protocol.VERSION}"),
        ]
        if self.opts.dry_run:
            for i, (step, text) in enumerate(steps, 1):
                self.say(f"[{i}/{len(steps)}] {step}: {text} (dry run: not done)")
            return "dry run"
        self.say(f"[1/6] connect: {steps[0][1]}")
        self.conn = self.connect()
        try:
            self.home = self.run('printf %s "$HOME"', "finding the functional account's home").strip()
            dest = self.path(dest)
            config = self.path(self.opts.remote_config)
            self.say(f"[2/6] upload: {steps[1][1]}")
            q = shlex.quote
            self.feed(f"umask 022 && mkdir -p {q(dest)} && tar -x -o -C {q(dest)} -f -", tar, "upload")
            if self.opts.services:
                self.say(f"[3/6] services: write {config}")
                self.feed(f"umask 077 && mkdir -p {q(str(Path(config).parent))} && cat > {q(config)}.new "
                          f"&& mv {q(config)}.new {q(config)}", self.opts.services.read_bytes(),
                          "writing the services file")
            else:
                self.say(f"[3/6] services: check {config}")
                self.run(f"test -f {q(config)}", f"{config} is missing: give --services FILE;")
            self.say(f"[4/6] check-config: {steps[3][1]}")
            base = f"cd {q(dest)} && {q(self.opts.python)} -E -s -m hpcside --config {q(config)}"
            self.say("      " + self.run(f"{base} check-config", "check-config").strip())
            self.say(f"[5/6] key: {steps[4][1]}")
            line = self.feed(f"{base} authorized-key --pubkey /dev/stdin --root {q(dest)} "
                             f"--python {q(self.opts.python)}", pubkey.encode(), "authorized-key").strip()
            keys = self.path(self.opts.authorized_keys)
            current = self.run(f"cat {q(keys)} 2>/dev/null || true", "reading authorized_keys")
            wanted = merge_key_line(current, line)
            if wanted == current:
                self.say("      already installed")
            else:
                self.feed(f"umask 077 && mkdir -p {q(str(Path(keys).parent))} && cat > {q(keys)}.new "
                          f"&& mv {q(keys)}.new {q(keys)}", wanted.encode(), "writing authorized_keys")
                self.say("      installed")
        finally:
            self.conn.close()
        self.say(f"[6/6] version: {steps[5][1]}")
        answer = check_version(self.cfg)
        self.say(f"      {answer}")
        return answer


def check_version(cfg: PlatformConfig) -> str:
    """``version`` through the ForceCommand, over the data link's own path (bastion included)."""
    try:
        client, jump = ssh_connect(cfg)
    except LinkError as exc:
        raise DeployError(f"version check: {exc}") from None
    try:
        _stdin, stdout, stderr = client.exec_command("version", timeout=cfg.connect_timeout)
        out = stdout.read().decode(errors="replace").strip()
        err = stderr.read().decode(errors="replace").strip()
    finally:
        client.close()
        if jump is not None:
            jump.close()
    match = re.fullmatch(r"hpcside (\S+) protocol (\d+)", out)
    if match is None:
        raise DeployError(f"version check: unexpected answer {out or err!r}")
    if int(match.group(2)) != protocol.VERSION:
        raise DeployError(f"version check: the login node speaks protocol {match.group(2)}, "
                          f"this web app {protocol.VERSION}")
    if match.group(1) != hpcside.__version__:
        raise DeployError(f"version check: the ForceCommand runs hpcside {match.group(1)}, "
                          f"not {hpcside.__version__}")
    return out


def pin(conn: fabric.Connection, known_hosts: str) -> None:
    """Only the platform's known_hosts, and an unknown key refused (Fabric's default: AutoAddPolicy)."""
    client = paramiko.SSHClient()
    client.load_host_keys(known_hosts)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    conn.client = client


__all__: list[str] = ["DeployError", "DeployOptions", "Deployer", "check_version", "merge_key_line", "package"]
