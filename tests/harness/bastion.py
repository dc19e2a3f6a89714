"""A REAL OpenSSH bastion on loopback: a jump account that may only forward to the login node's port."""

from __future__ import annotations

import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .accounts import HarnessError, run
from .slurm import free_port
from .sshd import SSHD, keygen

JUMP_USER = "chatai-jump"


def ensure_jump_account(name: str = JUMP_USER) -> str:
    try:
        pwd.getpwnam(name)
    except KeyError:
        run(["useradd", "--create-home", "--shell", "/bin/sh", name])
    run(["usermod", "-p", "*", name])  # key-only logins (UsePAM no treats "!" as locked)
    return name


@dataclass
class Bastion:
    target_port: int  # the login node's sshd on 127.0.0.1
    pubkeys: list[str]  # public keys (lines) allowed to jump
    user: str = field(default_factory=ensure_jump_account)
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="chatai-bastion-", dir="/run")))
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def known_hosts(self) -> Path:
        return self.root / "known_hosts"

    def start(self) -> Bastion:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.root.chmod(0o755)
        host_pub = keygen(self.root / "host_key", "chatai-test-bastion")
        self.port = self.port or free_port()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {' '.join(host_pub.split()[:2])}\n")
        keys = self.root / "authorized_keys"
        keys.mkdir(mode=0o755)
        # Port forwarding to the login node only: no shell, no pty, no other destination.
        allow = f'restrict,port-forwarding,permitopen="127.0.0.1:{self.target_port}",command="/bin/false"'
        (keys / self.user).write_text("".join(f"{allow} {' '.join(k.split()[:2])}\n" for k in self.pubkeys))
        (keys / self.user).chmod(0o644)
        (self.root / "sshd_config").write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.root / 'host_key'}",
            f"PidFile {self.root / 'sshd.pid'}", f"AuthorizedKeysFile {keys}/%u",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
            "PubkeyAuthentication yes", f"AllowUsers {self.user}", "StrictModes yes",
            "AllowTcpForwarding local", f"PermitOpen 127.0.0.1:{self.target_port}", "PermitTTY no",
            "X11Forwarding no", "AllowAgentForwarding no", "PermitTunnel no", "ForceCommand /bin/false",
            "LogLevel VERBOSE", "PrintMotd no",
        ]) + "\n")
        log = open(self.root / "sshd.log", "ab")  # noqa: SIM115 - lives with the daemon
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.root / "sshd_config")],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError(f"bastion sshd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise HarnessError(f"bastion sshd did not listen on {self.port}:\n{self.log()}")

    def log(self) -> str:
        path = self.root / "sshd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            import os
            import signal

            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)
