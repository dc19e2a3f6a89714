"""Node time from a REAL Slurm (with slurmdbd on MariaDB, and without) to NodeTime rows, through
the real sshd ForceCommand and ``manage.py collect_nodetime``."""

from __future__ import annotations

import io
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.core.management import call_command

from gateway.models import NodeTime, NodeTimeCollection
from tests.conftest import Hpcside
from tests.harness.slurm import SlurmCluster
from tests.harness.sshd import SSHServer

pytestmark = [pytest.mark.slurm, pytest.mark.sshd, pytest.mark.root, pytest.mark.django_db]

MakeHpcside = Callable[[SlurmCluster | None], Hpcside]


@contextmanager
def platform(h: Hpcside, settings: Any, cluster: SlurmCluster | None) -> Iterator[SSHServer]:
    """The login node's sshd with the web key locked to the ForceCommand, as HPC_PLATFORMS' "hpc"."""
    env_line = f"SLURM_CONF={cluster.conf}" if cluster else ""
    with SSHServer(h.account, h.deployment, h.config, slurm_env=env_line) as sshd:
        settings.HPC_PLATFORMS = [{"name": "hpc", "transport": "ssh", "host": "127.0.0.1", "port": sshd.port,
                                   "user": h.account.name, "key_file": str(sshd.client_key),
                                   "known_hosts": str(sshd.known_hosts)}]
        yield sshd


def collect() -> str:
    out = io.StringIO()
    call_command("collect_nodetime", stdout=out, stderr=out)
    return out.getvalue()


def sacct_row(cluster: SlurmCluster, job_id: str) -> list[str]:
    """The job as sacct prints it (epoch times): JobID|Start|End|ElapsedRaw|AllocTRES|State."""
    proc = subprocess.run(["sacct", "-X", "-P", "-n", "-j", job_id, "--format",
                           "JobID,Start,End,ElapsedRaw,AllocTRES,State"], capture_output=True, text=True,
                          env={**cluster.env, "SLURM_TIME_FORMAT": "%s"}, check=True, timeout=20)
    return proc.stdout.strip().split("|")


def wait_for_sacct(cluster: SlurmCluster, job_id: str, done: Callable[[list[str]], bool]) -> None:
    deadline = time.monotonic() + 20
    while not done(sacct_row(cluster, job_id)):
        assert time.monotonic() < deadline, f"sacct still says {sacct_row(cluster, job_id)}"
        time.sleep(0.3)


def scale_to_zero_and_wait(h: Hpcside, cluster: SlurmCluster | None, **service: Any) -> None:
    """The service is no longer wanted: the instance drains, is cancelled, and hpcside forgets it."""
    h.write_config(h.stub_service(min_instances=0, idle_timeout="0", **service))
    h.until(lambda: not h.status()["instances"], timeout=60, what="the instance to be drained and forgotten")
    if cluster is not None:
        assert cluster.jobs() == []


def test_a_jobs_sacct_record_reaches_nodetime_through_the_forcecommand(
        slurm1_acct: SlurmCluster, hpcside_on: MakeHpcside, settings: Any) -> None:
    h = hpcside_on(slurm1_acct)
    h.write_config(h.stub_service(min_instances=1, cpus=2))
    (inst,) = h.until(lambda: h.ready(), what="a ready instance")
    # slurmdbd hears of the start a moment after slurmctld (until then sacct says PENDING, and the
    # answer would carry hpcside's figures, replaced at the next collection).
    wait_for_sacct(slurm1_acct, inst["job_id"], lambda row: row[5] == "RUNNING")
    with platform(h, settings, slurm1_acct):
        text = collect()
        assert "hpc: 1 instance(s)" in text and "1 new" in text and "sacct used" in text, text
        row = NodeTime.objects.get(platform="hpc", instance=inst["id"])
        start = float(sacct_row(slurm1_acct, inst["job_id"])[1])
        assert (row.source, row.job_id, row.model, row.cpus, row.gpus, row.nodes) == (
            "sacct", inst["job_id"], "stub-model", 2, 0, 1)
        assert row.ended_at is None and row.started_at.timestamp() == start  # running: open

        scale_to_zero_and_wait(h, slurm1_acct, cpus=2)
        ledger = [json.loads(line) for line in (h.state / "nodetime.jsonl").read_text().splitlines()]
        assert [e["instance"] for e in ledger] == [inst["id"]]
        wait_for_sacct(slurm1_acct, inst["job_id"], lambda row: row[2] != "Unknown")  # the end, as for the start
        job_id, started, ended, elapsed, tres, state = sacct_row(slurm1_acct, inst["job_id"])
        assert state.startswith("CANCELLED") and "cpu=2" in tres, (state, tres)

        text = collect()
        assert "1 updated" in text and "incomplete" not in text, text
    row.refresh_from_db()
    assert row.source == "sacct" and row.cpus == 2
    assert row.started_at.timestamp() == float(started) and row.ended_at is not None
    assert row.ended_at.timestamp() == float(ended)
    assert (row.ended_at - row.started_at).total_seconds() == float(elapsed) > 5  # ready, then a 5 s drain
    cursor = NodeTimeCollection.objects.get(platform="hpc")
    assert cursor.until > ended_at_seconds(row) and cursor.last_error == ""


def ended_at_seconds(row: NodeTime) -> float:
    assert row.ended_at is not None
    return row.ended_at.timestamp()


def test_with_the_local_launcher_hpcsides_own_records_reach_nodetime(
        hpcside_on: MakeHpcside, settings: Any) -> None:
    h = hpcside_on(None)
    h.write_config(h.stub_service(min_instances=1, cpus=3))
    (inst,) = h.until(lambda: h.ready(), what="a ready instance")
    seen_running = time.time()
    with platform(h, settings, None):
        text = collect()
        assert "1 new" in text and "sacct not used" in text, text
        row = NodeTime.objects.get(platform="hpc", instance=inst["id"])
        assert (row.source, row.job_id, row.cpus, row.gpus, row.ended_at) == ("hpcside", inst["job_id"], 3, 0, None)
        assert row.started_at.timestamp() <= seen_running

        scale_to_zero_and_wait(h, None, cpus=3)
        gone = time.time()
        text = collect()
        assert "1 updated" in text, text
        assert collect().count("unchanged") == 1  # collecting again changes nothing
    row.refresh_from_db()
    assert row.source == "hpcside" and row.ended_at is not None
    assert seen_running < row.ended_at.timestamp() <= gone
    assert NodeTime.objects.count() == 1


def test_without_slurmdbd_the_answer_comes_from_hpcsides_records(slurm1: SlurmCluster, hpcside_on: MakeHpcside) -> None:
    h = hpcside_on(slurm1)
    h.write_config(h.stub_service(min_instances=1, cpus=2))
    (inst,) = h.until(lambda: h.ready(), what="a ready instance")
    answer = json.loads(h.run("nodetime").stdout)
    assert answer["complete"] is True
    assert answer["sacct"].startswith("unavailable: ") and "disabled" in answer["sacct"], answer["sacct"]
    (record,) = answer["data"]
    assert (record["instance"], record["job_id"], record["source"], record["cpus"], record["ended"]) == (
        inst["id"], inst["job_id"], "hpcside", 2, None)
