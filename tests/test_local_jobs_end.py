"""The local launcher (embedded default): nothing of a job outlives the job, its web app or its data.

Each job here leaves a child that ignores SIGTERM, as multiprocessing's resource_tracker in vLLM does.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hpcside.launchers import LocalLauncher
from hpcside.watchdog import group_members

STUBBORN_JOB = """#!/bin/bash
bash -c 'trap "" TERM; while :; do sleep 0.2; done' &
exec sleep {main_seconds}
"""


def wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


class Jobs:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.state = tmp_path / "state"
        self.state.mkdir()
        self.launcher = LocalLauncher(self.state)
        self.groups: list[int] = []

    def submit(self, main_seconds: int = 300) -> int:
        script = self.tmp / f"job{len(self.groups)}.sh"
        script.write_text(STUBBORN_JOB.format(main_seconds=main_seconds))
        job_id = self.launcher.submit(script, "t.job", self.tmp / "out.log", walltime=600)
        pid = int(__import__("json").loads((self.state / "local-jobs" / f"{job_id}.json").read_text())["pid"])
        self.groups.append(pid)
        assert wait_until(lambda: len(group_members(pid)) >= 3), "the job did not start"
        return pid


@pytest.fixture
def jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Jobs]:
    # A shorter TERM-to-KILL grace (the watchdog's is KILL_AFTER - 2): the same escalation, in
    # seconds rather than the ten a loading vLLM gets.
    monkeypatch.setattr(LocalLauncher, "KILL_AFTER", 3.0)
    j = Jobs(tmp_path)
    yield j
    for pgid in j.groups:
        if group_members(pgid):
            os.killpg(pgid, signal.SIGKILL)


def test_a_job_whose_main_process_died_leaves_no_process_behind(jobs: Jobs) -> None:
    pgid = jobs.submit(main_seconds=1)
    assert wait_until(lambda: not group_members(pgid)), f"left behind: {group_members(pgid)}"
    assert jobs.launcher.list_jobs("t.") == []


def test_jobs_end_when_the_web_app_that_started_them_is_killed(jobs: Jobs, monkeypatch: pytest.MonkeyPatch) -> None:
    owner = subprocess.Popen(["sleep", "300"])
    try:
        monkeypatch.setenv("HPCSIDE_OWNER_PID", str(owner.pid))
        pgid = jobs.submit()
        time.sleep(1)
        assert group_members(pgid), "the job ended while its owner lived"
    finally:
        owner.kill()
        owner.wait()
    assert wait_until(lambda: not group_members(pgid)), f"left behind: {group_members(pgid)}"


def test_jobs_end_when_their_data_directory_is_removed(jobs: Jobs) -> None:
    pgid = jobs.submit()
    shutil.rmtree(jobs.state)
    assert wait_until(lambda: not group_members(pgid)), f"left behind: {group_members(pgid)}"


def test_stopping_every_job_also_ends_children_that_ignore_sigterm(jobs: Jobs) -> None:
    pgids = [jobs.submit(), jobs.submit()]
    assert jobs.launcher.kill_all("t.") == 2
    for pgid in pgids:
        assert not group_members(pgid), f"left behind: {group_members(pgid)}"
