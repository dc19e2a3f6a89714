"""Start and stop a REAL OpenSSH server on loopback, with the web server's key locked to the ForceCommand."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .accounts import Account, HarnessError, run
from .slurm import free_port

SSHD = "/usr/sbin/sshd"


def keygen(path: Path, comment: str) -> str:
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    return Path(f"{path}.pub").read_text().strip()


@dataclass
class SSHServer:
    account: Account
    deployment: Path  # holds the hpcside package
    config: Path  # the services file the ForceCommand uses
    # Not under /tmp: StrictModes refuses keys below a world-writable directory.
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="chatai-sshd-", dir="/run")))
    port: int = 0
    slurm_env: str = ""  # e.g. SLURM_CONF=/path: set for the ForceCommand like a login node's profile
    proc: subprocess.Popen[bytes] | None = None

    @property
    def client_key(self) -> Path:
        return self.root / "client_key"

    @property
    def known_hosts(self) -> Path:
        return self.root / "known_hosts"

    def start(self) -> SSHServer:
        if not Path(SSHD).exists():
            raise HarnessError("sshd is not installed: apt-get install -y --no-install-recommends openssh-server")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.root.chmod(0o755)  # sshd reads authorized_keys with the user's rights
        host_pub = keygen(self.root / "host_key", "chatai-test-host")
        keygen(self.client_key, "chatai-web")
        self.port = self.port or free_port()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {' '.join(host_pub.split()[:2])}\n")
        keys = self.root / "authorized_keys"
        keys.mkdir(mode=0o755)
        line = run([sys.executable, "-S", "-m", "hpcside", "--config", str(self.config), "authorized-key",
                    "--pubkey", f"{self.client_key}.pub", "--root", str(self.deployment),
                    "--python", "/usr/bin/python3"], cwd=str(self.deployment)).stdout
        if self.slurm_env:  # the login node's environment, set by the operator, not by the client
            line = line.replace('command="cd ', f'command="export {self.slurm_env} && cd ', 1)
        (keys / self.account.name).write_text(line)
        (keys / self.account.name).chmod(0o644)
        (self.root / "sshd_config").write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.root / 'host_key'}",
            f"PidFile {self.root / 'sshd.pid'}", f"AuthorizedKeysFile {keys}/%u",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
            "PubkeyAuthentication yes", f"AllowUsers {self.account.name}", "StrictModes yes",
            "PermitUserEnvironment no", "LogLevel VERBOSE", "MaxStartups 50:30:100", "PrintMotd no",
        ]) + "\n")
        self.launch()
        return self

    def launch(self) -> None:
        log = open(self.root / "sshd.log", "ab")  # noqa: SIM115 - lives with the daemon
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.root / "sshd_config")],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError(f"sshd exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                import socket

                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                time.sleep(0.05)
        raise HarnessError(f"sshd did not listen on {self.port}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        path = self.root / "sshd.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def ssh(self, *args: str, command: str | None = None, timeout: float = 30,
            input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        """The OpenSSH client with the web server's key, as an attacker holding it would use it."""
        argv = ["ssh", "-i", str(self.client_key), "-p", str(self.port), "-o", "BatchMode=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
                "-o", "ConnectTimeout=5", *args, f"{self.account.name}@127.0.0.1"]
        if command is not None:
            argv.append(command)
        return subprocess.run(argv, capture_output=True, timeout=timeout, check=False, input=input)

    def kill_sessions(self) -> int:
        """Kill the per-connection sshd processes (the link dies; the listener stays)."""
        out = subprocess.run(["pgrep", "-f", f"sshd: {self.account.name}"], capture_output=True, text=True,
                             check=False).stdout.split()
        for pid in out:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(out)

    def stop_listener(self) -> None:
        """The whole server goes away (platform down): listener and sessions."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.kill_sessions()

    def stop(self) -> None:
        self.stop_listener()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> SSHServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
