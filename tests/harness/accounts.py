"""The non-root functional account that owns the service jobs, as on a real cluster."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
from dataclasses import dataclass

FUNCTIONAL_USER = os.environ.get("CHATAI_TEST_USER", "chatai")


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    home: str


def ensure_functional_account(name: str = FUNCTIONAL_USER) -> Account:
    """Create the account if missing; unlock it for key-only SSH (``*`` not ``!``)."""
    if os.geteuid() != 0:
        raise HarnessError("the test harness must run as root to create the functional account")
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        run(["useradd", "--create-home", "--shell", "/bin/bash", name])
        entry = pwd.getpwnam(name)
    # useradd leaves the password field as "!", which sshd (UsePAM no) treats as locked.
    run(["usermod", "-p", "*", name])
    return Account(name=name, uid=entry.pw_uid, gid=entry.pw_gid, home=entry.pw_dir)


def kill_user_processes(account: Account) -> None:
    """Nothing of the account may outlive a test run."""
    subprocess.run(["pkill", "-KILL", "-u", account.name], check=False)


class HarnessError(RuntimeError):
    """A real component could not be started; the message says why."""


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise HarnessError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def stop_process_group(proc: subprocess.Popen, grace: float = 10.0) -> None:  # type: ignore[type-arg]
    """TERM the process group started with start_new_session, KILL it if it does not go within grace."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
