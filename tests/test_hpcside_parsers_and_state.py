"""Pure parsers of Slurm's output, and the state files' format and permissions."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from hpcside.launchers import SubmissionError, parse_sbatch, parse_squeue, parse_time_left
from hpcside.state import (
    Load,
    ModelLoad,
    SchedulerState,
    ensure_dirs,
    publish_inflight,
    read_endpoint,
    read_inflight,
    write_json,
)


def test_sbatch_parsable_output_with_and_without_cluster() -> None:
    assert parse_sbatch("1234\n") == "1234"
    assert parse_sbatch("1234;cluster\n") == "1234"
    with pytest.raises(SubmissionError):
        parse_sbatch("sbatch: error: something\n")


@pytest.mark.parametrize("text,seconds", [
    ("1-02:03:04", 93784), ("02:03:04", 7384), ("03:04", 184), ("0:05", 5), ("UNLIMITED", None),
    ("NOT_SET", None), ("INVALID", None),
])
def test_time_left(text: str, seconds: float) -> None:
    assert parse_time_left(text) == seconds


def test_squeue_rows_are_parsed_and_foreign_jobs_skipped() -> None:
    out = ("101|chatai.a1b2c3d4e5f6|RUNNING|gpu07|23:59:10|None\n"
           "102|chatai.b1b2c3d4e5f6|PENDING|(null)|1-00:00:00|Priority\n"
           "103|my-batch-job|RUNNING|gpu01|10:00|None\n"
           "garbage line\n")
    jobs = parse_squeue(out, "chatai.")
    assert [(j.job_id, j.state, j.node, j.time_left, j.reason) for j in jobs] == [
        ("101", "RUNNING", "gpu07", 86350.0, ""), ("102", "PENDING", "", 86400.0, "Priority")]


def test_state_files_are_owner_only(tmp_path: Path) -> None:
    ensure_dirs(tmp_path / "state")
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    write_json(tmp_path / "state" / "routing.json", {"x": 1})
    assert stat.S_IMODE((tmp_path / "state" / "routing.json").stat().st_mode) == 0o600
    assert not list((tmp_path / "state").glob(".routing.json.*"))  # no temp file left


def test_scheduler_state_round_trips_and_ignores_unknown_versions() -> None:
    state = SchedulerState()
    assert SchedulerState.from_json(json.loads(json.dumps(state.to_json()))).to_json() == state.to_json()
    assert SchedulerState.from_json({"version": 99}).instances == {}


def test_malformed_endpoint_files_are_ignored(tmp_path: Path) -> None:
    ensure_dirs(tmp_path)
    (tmp_path / "endpoints" / "a.json").write_text('{"host": "n1; rm -rf /", "port": 80}')
    (tmp_path / "endpoints" / "b.json").write_text('{"host": "n1", "port": 70000}')
    (tmp_path / "endpoints" / "c.json").write_text('not json')
    (tmp_path / "endpoints" / "d.json").write_text('{"host": "gpu07.cluster", "port": 41234}')
    assert [read_endpoint(tmp_path, i) for i in "abc"] == [None, None, None]
    assert read_endpoint(tmp_path, "d") == {"host": "gpu07.cluster", "port": 41234}


def test_inflight_files_of_all_session_servers_are_summed(tmp_path: Path) -> None:
    ensure_dirs(tmp_path)
    now = time.time()
    publish_inflight(tmp_path, Load(models={"m": ModelLoad(2, 1, now - 5)}, instances={"i1": 2}), now)
    other = {"version": 1, "host": "login2", "pid": 1, "updated_at": now,
             "models": {"m": {"inflight": 3, "waiting": 0, "last_request_at": now}}, "instances": {"i1": 1, "i2": 2}}
    (tmp_path / "inflight" / "login2-1.json").write_text(json.dumps(other))
    load = read_inflight(tmp_path, now)
    assert load.models["m"].inflight == 5 and load.models["m"].waiting == 1
    assert load.models["m"].last_request_at == now
    assert load.instances == {"i1": 3, "i2": 2}


def test_inflight_files_of_dead_or_silent_session_servers_are_dropped(tmp_path: Path) -> None:
    ensure_dirs(tmp_path)
    now = time.time()
    silent = {"version": 1, "host": "login2", "pid": 1, "updated_at": now - 31,
              "models": {"m": {"inflight": 3}}, "instances": {}}
    (tmp_path / "inflight" / "login2-1.json").write_text(json.dumps(silent))
    import socket

    dead_pid = 2 ** 22 + 7
    dead = {**silent, "host": socket.gethostname(), "pid": dead_pid, "updated_at": now}
    (tmp_path / "inflight" / f"{socket.gethostname()}-{dead_pid}.json").write_text(json.dumps(dead))
    assert read_inflight(tmp_path, now).models == {}
    assert list((tmp_path / "inflight").iterdir()) == []


def test_hostile_inflight_values_count_as_zero(tmp_path: Path) -> None:
    ensure_dirs(tmp_path)
    now = time.time()
    bad = {"version": 1, "host": "h", "pid": os.getpid(), "updated_at": now,
           "models": {"m": {"inflight": -5, "waiting": "many"}, "n": "x"}, "instances": {"i": 10 ** 9}}
    (tmp_path / "inflight" / "h.json").write_text(json.dumps(bad))
    load = read_inflight(tmp_path, now)
    assert load.models["m"].inflight == 0 and load.models["m"].waiting == 0 and load.instances == {"i": 0}


def test_sbatch_test_only_gives_the_seconds_until_the_start() -> None:
    import datetime

    from hpcside.launchers import parse_test_only

    now = datetime.datetime(2026, 12, 2, 7, 0, 0).timestamp()
    text = "sbatch: Job 12 to start at 2026-12-02T07:10:00 using 1 processors on nodes n1 in partition debug\n"
    assert parse_test_only(text, now) == 600.0
    assert parse_test_only(text.replace("07:10:00", "06:59:00"), now) == 0.0  # can start now
    assert parse_test_only("sbatch: error: Batch job submission failed: Invalid account", now) is None
