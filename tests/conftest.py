"""Shared fixtures: the functional account, real Slurm clusters, and hpcside deployed as on a login node."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.accounts import Account, ensure_functional_account
from tests.harness.slurm import SlurmCluster

ROOT = Path(__file__).resolve().parent.parent
SUPPORT = Path(__file__).resolve().parent / "support"
SYSTEM_PYTHON = "/usr/bin/python3"  # what the functional account has on a login node
_prefixes = itertools.count(1)


# Markers from what a test uses, so a new test that starts Slurm or daphne cannot slip into the
# fast tier (`scripts/test.sh --fast`, `-m "not (slurm or ...)"`) by a forgotten marker.
MARKS_BY_FIXTURE = {"account": ("root",), "deployment": ("root",), "hpcside_on": ("root",),
                    "slurm1": ("slurm", "root"), "slurm3": ("slurm", "root"), "slurm1_acct": ("slurm", "root")}
MARKS_BY_MODULE_NAME = {"LiveApp": ("live",), "SlurmCluster": ("slurm", "root"), "SSHServer": ("sshd", "root"),
                        "OIDCProvider": ("browser",), "Nginx": ("nginx", "live")}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = getattr(item, "module", None)
        names = set(MARKS_BY_MODULE_NAME).intersection(vars(module)) if module is not None else set()
        wanted = {m for n in names for m in MARKS_BY_MODULE_NAME[n]}
        wanted |= {m for f in getattr(item, "fixturenames", ()) for m in MARKS_BY_FIXTURE.get(f, ())}
        for mark in sorted(wanted - {m.name for m in item.iter_markers()}):
            item.add_marker(getattr(pytest.mark, mark))


@pytest.fixture(scope="session")
def account() -> Account:
    return ensure_functional_account()


@pytest.fixture(scope="session")
def deployment(account: Account) -> Iterator[Path]:
    """hpcside and the stub copied to a directory the functional account can read."""
    root = Path(tempfile.mkdtemp(prefix="chatai-deploy-"))
    root.chmod(0o755)
    shutil.copytree(ROOT / "hpcside", root / "hpcside", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(SUPPORT / "stub_vllm.py", root / "stub_vllm.py")
    shutil.copy(SUPPORT / "stub.sh", root / "stub.sh")
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm1(account: Account) -> Iterator[SlurmCluster]:
    with SlurmCluster(["n1"], account) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def slurm1_acct(account: Account) -> Iterator[SlurmCluster]:
    """One node with accounting (slurmdbd on the machine's MariaDB, a database of its own): sacct works."""
    with SlurmCluster(["n1"], account, accounting=True) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def slurm3(account: Account) -> Iterator[SlurmCluster]:
    with SlurmCluster(["n1", "n2", "n3"], account) as cluster:
        yield cluster


class Hpcside:
    """hpcside run as the functional account against one cluster, with its own state dir."""

    def __init__(self, deployment: Path, account: Account, cluster: SlurmCluster | None) -> None:
        self.deployment, self.account, self.cluster = deployment, account, cluster
        self.home = Path(tempfile.mkdtemp(prefix="chatai-svc-", dir="/tmp"))
        shutil.chown(self.home, account.name, account.name)
        self.home.chmod(0o700)
        self.state = self.home / "state"
        self.config = self.home / "services.ini"
        self.prefix = f"t{os.getpid() % 1000}x{next(_prefixes)}"

    def write_config(self, services: str, **settings: Any) -> None:
        base = {
            "state_dir": str(self.state), "launcher": "slurm" if self.cluster else "local",
            "job_prefix": self.prefix, "min_interval": "0", "probe_timeout": "1s",
            "python": SYSTEM_PYTHON, "bind_host": "127.0.0.1", "endpoint_host": "127.0.0.1",
            "backoff_base": "2s", "backoff_max": "30s",
        }
        base.update({k: str(v) for k, v in settings.items()})
        text = "[hpcside]\n" + "".join(f"{k} = {v}\n" for k, v in base.items()) + "\n" + services
        self.config.write_text(text)
        shutil.chown(self.config, self.account.name, self.account.name)

    def stub_service(self, name: str = "stub", model: str = "stub-model", **fields: Any) -> str:
        values = {"model": model, "template": str(self.deployment / "stub.sh"),
                  "model_path": str(self.deployment / "stub_vllm.py"), "cpus": 1,
                  "walltime": "10m", "renewal_margin": "1m", "readiness_timeout": "60s",
                  "scale_down_delay": "0", "idle_timeout": "1h", "unhealthy_grace": "2s"}
        values.update(fields)
        return f"[service:{name}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()) + "\n"

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": self.home.as_posix(), "LANG": "C.UTF-8"}
        if self.cluster:
            env["SLURM_CONF"] = str(self.cluster.conf)
        argv = ["runuser", "-u", self.account.name, "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()),
                SYSTEM_PYTHON, "-m", "hpcside", "--config", str(self.config), *args]
        proc = subprocess.run(argv, cwd=self.deployment, capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"hpcside {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def schedule(self) -> subprocess.CompletedProcess[str]:
        return self.run("schedule", "--force", check=False)

    def status(self) -> dict[str, Any]:
        return json.loads(self.run("status", "--json").stdout)

    def routing(self) -> dict[str, Any]:
        return json.loads((self.state / "routing.json").read_text())

    def service(self, name: str = "stub") -> dict[str, Any]:
        return next(s for s in self.status()["services"] if s["service"] == name)

    def until(self, condition: Callable[[], Any], timeout: float = 60, what: str = "condition",
              interval: float = 0.3) -> Any:
        """Reconcile until ``condition()`` is truthy; fail with the status if it never is."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.schedule()
            result = condition()
            if result:
                return result
            time.sleep(interval)
        status = self.run("status", check=False).stdout
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{status}")

    def publish_load(self, model: str, inflight: int = 0, waiting: int = 0,
                     last_request_at: float | None = None, instances: dict[str, int] | None = None,
                     pid: int | None = None) -> None:
        """Write an in-flight file as a session server would (documented format)."""
        if not (self.state / "inflight").is_dir():
            self.schedule()  # the account creates its state directory
        path = self.state / "inflight" / f"test-{pid or os.getpid()}.json"
        path.write_text(json.dumps({
            "version": 1, "host": "test-host", "pid": pid or os.getpid(), "updated_at": time.time(),
            "models": {model: {"inflight": inflight, "waiting": waiting,
                               "last_request_at": last_request_at or time.time()}},
            "instances": instances or {},
        }))
        shutil.chown(path, self.account.name, self.account.name)

    def ready(self, service: str = "stub") -> list[dict[str, Any]]:
        return [i for i in self.status()["instances"] if i["service"] == service and i["phase"] == "ready"]

    def cancel_jobs(self) -> None:
        if self.cluster and "slurmctld" in self.cluster.procs:
            subprocess.run(["scancel", "-u", self.account.name], env=self.cluster.env,
                           capture_output=True, check=False)
            deadline = time.monotonic() + 15
            while self.cluster.jobs() and time.monotonic() < deadline:
                time.sleep(0.2)
        elif not self.cluster:
            subprocess.run(["pkill", "-u", self.account.name, "-f", "stub_vllm.py"], check=False)

    def cleanup(self) -> None:
        self.cancel_jobs()
        shutil.rmtree(self.home, ignore_errors=True)


@pytest.fixture
def hpcside_on(deployment: Path, account: Account) -> Iterator[Callable[[SlurmCluster | None], Hpcside]]:
    made: list[Hpcside] = []

    def make(cluster: SlurmCluster | None) -> Hpcside:
        h = Hpcside(deployment, account, cluster)
        made.append(h)
        return h

    yield make
    for h in made:
        h.cleanup()


# For modules that define a module-scoped `app` (a LiveApp with the user alice): her key and an
# official OpenAI client on it.
@pytest.fixture(scope="module")
def key(app: Any) -> str:
    return str(app.create_key("alice"))


@pytest.fixture(scope="module")
def client(app: Any, key: str) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{app.url}/v1", api_key=key, max_retries=0, timeout=60)
