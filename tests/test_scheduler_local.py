"""The local launcher (embedded default) and the reconcile's lock and minimum interval."""

from __future__ import annotations

import http.client
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcside.config import load
from hpcside.launchers import LocalLauncher
from hpcside.reconcile import Scheduler

SUPPORT = Path(__file__).resolve().parent / "support"


def config_file(tmp_path: Path, min_instances: int = 1, min_interval: str = "0") -> Path:
    path = tmp_path / "services.ini"
    path.write_text(f"""
[hpcside]
state_dir = {tmp_path}/state
launcher = local
job_prefix = local
min_interval = {min_interval}
python = {sys.executable}
bind_host = 127.0.0.1
endpoint_host = 127.0.0.1

[service:stub]
model = stub-model
template = {SUPPORT / 'stub.sh'}
model_path = {SUPPORT / 'stub_vllm.py'}
min_instances = {min_instances}
scale_down_delay = 0
walltime = 10m
renewal_margin = 1m
""")
    return path


def reconcile_until(scheduler: Scheduler, condition, timeout: float = 30):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        scheduler.reconcile(force=True)
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError("condition not reached")


@pytest.fixture
def scheduler(tmp_path: Path):  # type: ignore[no-untyped-def]
    sched = Scheduler(load(config_file(tmp_path)))
    yield sched
    assert isinstance(sched.launcher, LocalLauncher)
    sched.launcher.kill_all("local.")


def test_the_local_launcher_runs_the_same_template_and_keeps_min_instances(scheduler: Scheduler) -> None:
    reconcile_until(scheduler, lambda: bool(scheduler_routes(scheduler)))
    (entry,) = scheduler_routes(scheduler)
    host, port = entry["url"].removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {entry['token']}"})
    assert conn.getresponse().status == 200
    jobs = scheduler.launcher.list_jobs("local.")
    assert len(jobs) == 1 and jobs[0].state == "RUNNING"


def test_local_jobs_are_cancelled_when_scaled_down(tmp_path: Path, scheduler: Scheduler) -> None:
    reconcile_until(scheduler, lambda: bool(scheduler_routes(scheduler)))
    scheduler.config = load(config_file(tmp_path, min_instances=0))
    scheduler.settings = scheduler.config.settings
    reconcile_until(scheduler, lambda: not scheduler.launcher.list_jobs("local."), timeout=40)
    assert scheduler_routes(scheduler) == []


def test_the_local_launcher_enforces_walltime(tmp_path: Path) -> None:
    launcher = LocalLauncher(tmp_path)
    script = tmp_path / "job.sh"
    script.write_text("exec sleep 60\n")
    launcher.submit(script, "w.aaaaaaaaaaaa", tmp_path / "out", walltime=0.5)
    assert [j.state for j in launcher.list_jobs("w.")] == ["RUNNING"]
    time.sleep(0.6)
    launcher.list_jobs("w.")  # past walltime: terminated, as Slurm would
    deadline = time.monotonic() + 5
    while launcher.list_jobs("w.") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert launcher.list_jobs("w.") == []


def scheduler_routes(scheduler: Scheduler) -> list:  # type: ignore[type-arg]
    import json

    path = scheduler.dir / "routing.json"
    if not path.exists():
        return []
    return list(json.loads(path.read_text())["models"].get("stub-model", []))


def test_the_lock_does_not_outlive_a_crashed_process(tmp_path: Path) -> None:
    sched = Scheduler(load(config_file(tmp_path, min_instances=0)))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(sched.dir / 'scheduler.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        outcome = sched.reconcile(force=True)
        assert not outcome.ran and "another reconcile is running" in outcome.why_skipped
    finally:
        holder.kill()  # the crash: no cleanup runs
        holder.wait()
    assert sched.reconcile(force=True).ran


def test_a_second_trigger_within_min_interval_is_skipped(tmp_path: Path) -> None:
    sched = Scheduler(load(config_file(tmp_path, min_instances=0, min_interval="30s")))
    assert sched.reconcile().ran
    second = sched.reconcile()
    assert not second.ran and "min_interval" in second.why_skipped
    assert sched.reconcile(force=True).ran


def test_a_clock_that_went_backwards_does_not_block_reconciles(tmp_path: Path) -> None:
    times = iter([2_000_000_000.0, 1_000_000_000.0])
    sched = Scheduler(load(config_file(tmp_path, min_instances=0, min_interval="30s")), clock=lambda: next(times))
    assert sched.reconcile().ran
    assert sched.reconcile().ran
