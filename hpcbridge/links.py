"""Byte pipes to a session server: an SSH channel (paramiko) or a local subprocess.

A link is opened once and carries one long-lived ``serve`` session. The SSH link pins the
host key from a known_hosts file (an unknown or changed key is refused, never added),
sets TCP_NODELAY (paramiko does not; without it every round trip waits for delayed ACKs)
and enables transport keep-alives. A login node behind a bastion (``proxy_jump``) is reached
through a direct-tcpip channel of the bastion's transport, its host key pinned too.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import paramiko

from hpcbridge.config import PlatformConfig


class LinkError(Exception):
    """The link could not be opened; the message is safe to show to an operator."""


class HostKeyRefused(LinkError):
    pass


class Link:
    def send(self, data: bytes) -> None:
        raise NotImplementedError

    def recv(self) -> bytes:
        """Blocking; b"" at end of stream."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class SSHLink(Link):
    def __init__(self, cfg: PlatformConfig) -> None:
        self.cfg = cfg
        self.lock = threading.Lock()
        self.client, self.jump = ssh_connect(cfg)
        transport = self.client.get_transport()
        assert transport is not None
        transport.set_keepalive(max(1, int(cfg.keepalive)))
        self.channel = transport.open_session(timeout=cfg.connect_timeout)
        self.channel.exec_command(cfg.command)

    def send(self, data: bytes) -> None:
        with self.lock:
            self.channel.sendall(data)

    def recv(self) -> bytes:
        return bytes(self.channel.recv(1 << 16))

    def close(self) -> None:
        try:
            self.channel.close()
        finally:
            self.client.close()
            if self.jump is not None:
                self.jump.close()


def ssh_connect(cfg: PlatformConfig) -> tuple[paramiko.SSHClient, paramiko.SSHClient | None]:
    """An SSH client to the login node (and the bastion's, with proxy_jump), host keys pinned on each hop.

    Through a bastion: one transport to it, a direct-tcpip channel to the login node, and the
    login node's transport over that channel; the data link is still one channel on it."""
    jump = cfg.proxy_jump
    if jump is None:
        return _connect(cfg.name, cfg.host, cfg.port, cfg.user, cfg.key_file, cfg.known_hosts,
                        _tcp(cfg.name, cfg.host, cfg.port, cfg.connect_timeout), cfg.connect_timeout), None
    bastion = _connect(cfg.name, jump.host, jump.port, jump.user, jump.key_file, jump.known_hosts,
                       QuickAckSocket(_tcp(cfg.name, jump.host, jump.port, cfg.connect_timeout)), cfg.connect_timeout)
    try:
        transport = bastion.get_transport()
        assert transport is not None
        transport.set_keepalive(max(1, int(cfg.keepalive)))
        try:
            channel = transport.open_channel("direct-tcpip", (cfg.host, cfg.port), ("127.0.0.1", 0),
                                             timeout=cfg.connect_timeout)
        except (paramiko.SSHException, OSError) as exc:
            raise LinkError(f"{cfg.name}: the bastion {jump.host}:{jump.port} did not open a tunnel to "
                            f"{cfg.host}:{cfg.port}: {exc}") from None
        return _connect(cfg.name, cfg.host, cfg.port, cfg.user, cfg.key_file, cfg.known_hosts, channel,
                        cfg.connect_timeout), bastion
    except BaseException:
        bastion.close()
        raise


class QuickAckSocket:
    """The bastion's socket, acknowledging at once after every read.

    sshd sends a reply forwarded from the login node as several small segments without
    TCP_NODELAY (Nagle); our delayed ACK then held the second one for ~40 ms: a request's body
    arrived 40 ms after its head (measured: 41.5 ms round trip, 0.6 ms with this)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._quickack = getattr(socket, "TCP_QUICKACK", None)  # Linux

    def recv(self, size: int) -> bytes:
        data = self._sock.recv(size)
        if self._quickack is not None and data:
            try:
                self._sock.setsockopt(socket.IPPROTO_TCP, self._quickack, 1)
            except OSError:
                pass
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _tcp(name: str, host: str, port: int, timeout: float) -> socket.socket:
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise LinkError(f"{name}: cannot reach {host}:{port}: {exc.strerror or exc}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _connect(name: str, host: str, port: int, user: str, key_file: str, known_hosts: str, sock: Any,
             timeout: float) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    try:
        client.load_host_keys(known_hosts)
    except OSError as exc:
        sock.close()
        raise LinkError(f"{name}: cannot read known_hosts {known_hosts}: {exc.strerror}") from None
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(host, port=port, username=user, key_filename=key_file, sock=sock, look_for_keys=False,
                       allow_agent=False, timeout=timeout, banner_timeout=timeout, auth_timeout=timeout)
    except paramiko.BadHostKeyException:
        sock.close()
        raise HostKeyRefused(f"{name}: the host key of {host}:{port} CHANGED; refusing to connect "
                             f"(verify it out of band and update {known_hosts})") from None
    except paramiko.SSHException as exc:
        sock.close()
        if "not found in known_hosts" in str(exc):
            raise HostKeyRefused(f"{name}: {host}:{port} is not in {known_hosts}; "
                                 "refusing an unknown host key") from None
        raise LinkError(f"{name}: SSH failed: {exc}") from None
    except OSError as exc:
        sock.close()
        raise LinkError(f"{name}: SSH failed: {exc}") from None
    return client


class LocalLink(Link):
    """hpcside as a subprocess on this machine (the single-machine default)."""

    def __init__(self, cfg: PlatformConfig) -> None:
        self.lock = threading.Lock()
        root = Path(__file__).resolve().parent.parent
        env = {**os.environ, "SSH_ORIGINAL_COMMAND": cfg.command}
        env.pop("PYTHONPATH", None)
        # Local jobs end with the web app that started them (hpcside/watchdog.py), even on SIGKILL.
        env.setdefault("HPCSIDE_OWNER_PID", str(os.getpid()))
        try:
            self.proc = subprocess.Popen(
                [cfg.python or sys.executable, "-E", "-s", "-m", "hpcside", "--config", cfg.hpcside_config,
                 "forcecommand"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=root, env=env,
                bufsize=0,
            )
        except OSError as exc:
            raise LinkError(f"{cfg.name}: cannot start hpcside: {exc.strerror}") from None
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout_fd = self.proc.stdin, self.proc.stdout.fileno()

    def send(self, data: bytes) -> None:
        with self.lock:
            self.stdin.write(data)

    def recv(self) -> bytes:
        try:
            return os.read(self.stdout_fd, 1 << 16)
        except OSError:
            return b""

    def close(self) -> None:
        try:
            self.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def open_link(cfg: PlatformConfig) -> Link:
    return LocalLink(cfg) if cfg.transport == "local" else SSHLink(cfg)


__all__ = ["HostKeyRefused", "Link", "LinkError", "LocalLink", "SSHLink", "open_link", "ssh_connect"]
