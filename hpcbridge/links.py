"""Byte pipes to a session server: an SSH channel (paramiko) or a local subprocess.

A link is opened once and carries one long-lived ``serve`` session. The SSH link pins the
host key from a known_hosts file (an unknown or changed key is refused, never added),
sets TCP_NODELAY (paramiko does not; without it every round trip waits for delayed ACKs)
and enables transport keep-alives.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

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
        self.client = paramiko.SSHClient()
        try:
            self.client.load_host_keys(cfg.known_hosts)
        except OSError as exc:
            raise LinkError(f"{cfg.name}: cannot read known_hosts {cfg.known_hosts}: {exc.strerror}") from None
        self.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            sock = socket.create_connection((cfg.host, cfg.port), timeout=cfg.connect_timeout)
        except OSError as exc:
            raise LinkError(f"{cfg.name}: cannot reach {cfg.host}:{cfg.port}: {exc.strerror or exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.client.connect(
                cfg.host, port=cfg.port, username=cfg.user, key_filename=cfg.key_file, sock=sock,
                look_for_keys=False, allow_agent=False, timeout=cfg.connect_timeout,
                banner_timeout=cfg.connect_timeout, auth_timeout=cfg.connect_timeout,
            )
        except paramiko.BadHostKeyException:
            sock.close()
            raise HostKeyRefused(f"{cfg.name}: the host key of {cfg.host}:{cfg.port} CHANGED; refusing to connect "
                                 f"(verify it out of band and update {cfg.known_hosts})") from None
        except paramiko.SSHException as exc:
            sock.close()
            if "not found in known_hosts" in str(exc):
                raise HostKeyRefused(f"{cfg.name}: {cfg.host}:{cfg.port} is not in {cfg.known_hosts}; "
                                     "refusing an unknown host key") from None
            raise LinkError(f"{cfg.name}: SSH failed: {exc}") from None
        except OSError as exc:
            sock.close()
            raise LinkError(f"{cfg.name}: SSH failed: {exc}") from None
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


__all__ = ["HostKeyRefused", "Link", "LinkError", "LocalLink", "SSHLink", "open_link"]
