"""The live app for end-to-end tests: daphne in a subprocess, hpcside behind the local transport."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hpcside.launchers import LocalLauncher
from tests.harness.accounts import stop_process_group
from tests.harness.net import wait_http
from tests.harness.slurm import free_port

ROOT = Path(__file__).resolve().parent.parent
SUPPORT = ROOT / "tests" / "support"


def stub_service(name: str, model: str, *, min_instances: int = 0, template: Path = SUPPORT / "stub.sh",
                 model_path: Path = SUPPORT / "stub_vllm.py", walltime: str = "1h", **options: str) -> str:
    """One [service:NAME] section of hpcside's services file running the stub (or a script that
    takes the stub's arguments), through the local launcher."""
    lines = [f"[service:{name}]", f"model = {model}", f"template = {template}", f"model_path = {model_path}",
             f"min_instances = {min_instances}", *(f"{k} = {v}" for k, v in options.items()),
             f"walltime = {walltime}", "renewal_margin = 5m"]
    return "\n".join(lines) + "\n\n"


def local_services(path: Path, state_dir: Path, prefix: str, sections: str, **settings: str) -> Path:
    """An hpcside services file for the local launcher on this machine: the [hpcside] part the
    tests share (settings override it), then ``sections`` (stub_service() output)."""
    base = {"state_dir": str(state_dir), "launcher": "local", "job_prefix": prefix, "min_interval": "1s",
            "python": sys.executable, "bind_host": "127.0.0.1", "endpoint_host": "127.0.0.1",
            "hold_timeout": "30s", **settings}
    path.write_text("[hpcside]\n" + "".join(f"{k} = {v}\n" for k, v in base.items()) + "\n" + sections)
    return path


@dataclass
class LiveApp:
    """One deployment (database, hpcside state) served by one or more daphne workers."""

    db: str = "sqlite"  # sqlite | postgresql
    redis_url: str = ""
    workers: int = 1
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="chatai-live-")))
    procs: list[subprocess.Popen] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    db_name: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)
    services: str = ""  # [service:...] sections instead of the two test stubs
    port: int = 0  # the first worker's port, when it must be known before start (OIDC redirect URIs)
    hpcside: dict[str, str] = field(default_factory=dict)  # [hpcside] settings over the tests' (python, say)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports[0]}"

    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "REDIS", "HPC", "DJANGO"))}
        env.update({"CHATAI_DATA_DIR": str(self.dir / "var"), "SECRET_KEY": "test-secret-key-" + "x" * 40,
                    "HPC_PLATFORMS": json.dumps([{"name": "local", "transport": "local",
                                                  "hpcside_config": str(self.dir / "services.ini")}]),
                    "LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1",
                    "GATEWAY_POLICY_TTL": "0"})  # tests edit policies and expect them at once
        if self.db == "postgresql":
            env.update({"DB_ENGINE": "postgresql", "DB_NAME": self.db_name, "DB_USER": "postgres",
                        "DB_HOST": "127.0.0.1"})
        if self.redis_url:
            env["REDIS_URL"] = self.redis_url
        env.update(self.extra_env)
        return env

    def start(self) -> LiveApp:
        """Start the deployment; whatever a failed start left running is stopped before it raises."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> LiveApp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start(self) -> None:
        local_services(self.dir / "services.ini", self.dir / "hpcside", "live",
                       self.services or stub_service("stub", "stub-model", idle_timeout="10m")
                       + stub_service("other", "other-model"), **self.hpcside)
        if self.db == "postgresql":
            self.db_name = f"chatai_live_{os.getpid()}_{free_port()}"
            subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-c", f"CREATE DATABASE {self.db_name}"],
                           check=True, capture_output=True)
        self.manage("migrate", "--no-input", "-v", "0")
        for i in range(self.workers):
            port = self.port if i == 0 and self.port else free_port()
            log = open(self.dir / f"daphne-{port}.log", "wb")  # noqa: SIM115 - lives with the process
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "chatai.asgi:application"],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            self.ports.append(port)
        for url in self.urls():
            wait_http(f"{url}/healthz", 30, "daphne", lambda: self.logs()[-3000:])

    def manage(self, *args: str, input: str | None = None) -> str:
        proc = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=self.env, capture_output=True,
                              text=True, input=input, check=False, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc.stdout

    def shell(self, code: str) -> str:
        return self.manage("shell", "-c", code)

    def create_user(self, username: str, groups: tuple[str, ...] = ()) -> None:
        self.shell("from django.contrib.auth.models import User, Group\n"
                   f"u = User.objects.create_user({username!r}, password='pw-{username}-123')\n"
                   + "".join(f"u.groups.add(Group.objects.get_or_create(name={g!r})[0])\n" for g in groups))

    def create_key(self, username: str, *extra: str) -> str:
        out = self.manage("apikey", "create", username, "--name", "test", *extra)
        match = re.search(r"^(cai-\S+)$", out, re.M)
        assert match, out
        return match.group(1)

    def limit_key(self, key: str, **limits: int) -> None:
        """Give one key its own rate-limit policy (as an admin would)."""
        prefix = key.split(".")[0].removeprefix("cai-")
        self.shell("from gateway.models import ApiKey, RateLimitPolicy\n"
                   f"RateLimitPolicy.objects.create(name='test', api_key=ApiKey.objects.get(prefix={prefix!r}), "
                   + ", ".join(f"{k}={v}" for k, v in limits.items()) + ")")

    def limit_user(self, username: str, **limits: int) -> None:
        """Give a user a rate-limit policy of their own (counted across all their keys), as an admin would."""
        self.shell("from django.contrib.auth.models import User\nfrom gateway.models import RateLimitPolicy\n"
                   f"RateLimitPolicy.objects.create(name='test', user=User.objects.get(username={username!r}), "
                   + ", ".join(f"{k}={v}" for k, v in limits.items()) + ")")

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.dir.glob("daphne-*.log")))

    def stop_workers(self) -> None:
        """Stop daphne (its usage rows are flushed at exit); the deployment's files stay."""
        for proc in self.procs:
            stop_process_group(proc)

    def stop(self) -> None:
        self.stop_workers()
        if (self.dir / "hpcside").exists():
            LocalLauncher(self.dir / "hpcside").kill_all("live.")
        if self.db == "postgresql" and self.db_name:
            subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-c",
                            f"DROP DATABASE IF EXISTS {self.db_name} WITH (FORCE)"], capture_output=True, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
