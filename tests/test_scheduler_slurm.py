"""The scheduler on a REAL Slurm: jobs of the functional account, a stand-in HTTP server for vLLM.

Every test drives ``python3 -m hpcside schedule`` as the functional account, the way the
bridge's ping or cron does, and observes Slurm, the routing table and ``status``.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import Hpcside
from tests.harness.slurm import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.root]

MakeHpcside = Callable[[SlurmCluster | None], Hpcside]


def get(url: str, path: str, token: str | None = None) -> int:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        return conn.getresponse().status
    finally:
        conn.close()


def routed(h: Hpcside, model: str = "stub-model") -> list[dict[str, Any]]:
    return list(h.routing()["models"].get(model, []))


def test_it_keeps_min_instances_on_a_single_node_cluster(slurm1: SlurmCluster, hpcside_on: MakeHpcside) -> None:
    h = hpcside_on(slurm1)
    h.write_config(h.stub_service(min_instances=1))
    started = time.monotonic()
    h.until(lambda: h.ready(), what="one ready instance")
    elapsed = time.monotonic() - started
    print(f"sbatch to ready instance: {elapsed:.2f}s")
    (entry,) = routed(h)
    assert [j["state"] for j in slurm1.jobs()] == ["RUNNING"]
    assert slurm1.jobs()[0]["name"] == f"{h.prefix}.{entry['id']}"
    # The instance is protected by its own token: nobody else on the cluster can use it.
    assert get(entry["url"], "/v1/models", entry["token"]) == 200
    assert get(entry["url"], "/v1/models") == 401
    assert get(entry["url"], "/v1/models", "wrong") == 401
    for _ in range(3):
        h.schedule()
    assert len(slurm1.jobs()) == 1  # steady state: nothing more submitted
    assert oct((h.state / "routing.json").stat().st_mode & 0o777) == "0o600"


def test_it_scales_up_on_load_up_to_max(slurm3: SlurmCluster, hpcside_on: MakeHpcside) -> None:
    h = hpcside_on(slurm3)
    h.write_config(h.stub_service(min_instances=1, max_instances=2, scale_up_inflight=2))
    h.until(lambda: h.ready(), what="the first instance")
    h.publish_load("stub-model", inflight=7)
    h.until(lambda: len(h.ready()) == 2, what="two ready instances")
    for _ in range(3):
        h.schedule()
    assert len(slurm3.jobs()) == 2  # 7 in flight would want 4; max is 2
    assert len(routed(h)) == 2
    assert h.service()["desired"] == 2


def test_it_scales_down_by_draining_the_least_loaded_instance(slurm3: SlurmCluster, hpcside_on: MakeHpcside) -> None:
    h = hpcside_on(slurm3)
    h.write_config(h.stub_service(min_instances=2, max_instances=2))
    h.until(lambda: len(h.ready()) == 2, what="two ready instances")
    busy, idle = (i["id"] for i in h.ready())
    h.write_config(h.stub_service(min_instances=1, max_instances=2))
    h.publish_load("stub-model", inflight=1, instances={busy: 1, idle: 0})
    h.schedule()
    phases = {i["id"]: i["phase"] for i in h.status()["instances"]}
    assert phases == {busy: "ready", idle: "draining"}
    assert [e["id"] for e in routed(h)] == [busy]  # no new requests to the drained one
    h.until(lambda: all(j["name"] != f"{h.prefix}.{idle}" for j in slurm3.jobs()),
            what="the idle drained instance to be cancelled")
    assert [e["id"] for e in routed(h)] == [busy]
    assert len(slurm3.jobs()) == 1


def test_it_scales_to_zero_after_the_idle_timeout(slurm3: SlurmCluster, hpcside_on: MakeHpcside) -> None:
    h = hpcside_on(slurm3)
    h.write_config(h.stub_service(min_instances=0, idle_timeout="4s"))
    h.schedule()
    assert slurm3.jobs() == []  # nobody asked: nothing runs
    h.publish_load("stub-model", waiting=1)  # a request held by a router
    h.until(lambda: h.ready(), what="a ready instance for the held request")
    h.publish_load("stub-model", inflight=0, last_request_at=time.time())
    h.schedule()
    assert len(h.ready()) == 1  # just used: kept warm
    h.until(lambda: not slurm3.jobs(), timeout=30, what="scale to zero")
    assert routed(h) == []
    assert h.service()["desired"] == 0


def test_it_follows_capacity_windows(slurm3: SlurmCluster, hpcside_on: MakeHpcside) -> None:
    h = hpcside_on(slurm3)
    today = time.strftime("%a").lower()
    other = {"mon": "wed", "tue": "thu", "wed": "fri", "thu": "sat", "fri": "sun", "sat": "mon", "sun": "tue"}[today]
    inside = h.stub_service(min_instances=0, max_instances=3, idle_timeout="0",
                            capacity=f"{today} 00:00-24:00 min=2")
    h.write_config(inside)
    h.until(lambda: len(h.ready()) == 2, what="the window's two instances")
    assert h.service()["bounds"] == [2, 3]
    h.write_config(inside.replace(f"{today} 00:00", f"{other} 00:00"))  # the window is over
    h.until(lambda: not slurm3.jobs(), timeout=30, what="scale down outside the window")
    assert h.service()["bounds"] == [0, 3]


def test_it_renews_an_instance_before_walltime_and_drains_the_old_one_when_the_new_is_ready(
        slurm3: SlurmCluster, hpcside_on: MakeHpcside) -> None:
    h = hpcside_on(slurm3)
    # A 2-minute job renewed when less than 115 s are left: a few seconds after it is ready.
    h.write_config(h.stub_service(min_instances=1, walltime="2m", renewal_margin="115s"))
    (old,) = h.until(lambda: h.ready(), what="the first instance")
    new = h.until(lambda: [i for i in h.status()["instances"] if i["replaces"] == old["id"]],
                  what="a renewal to be submitted")[0]
    # Until the renewal is ready, the old instance keeps serving.
    states = {i["id"]: i["phase"] for i in h.status()["instances"]}
    if states[new["id"]] != "ready":
        assert states[old["id"]] == "ready" and [e["id"] for e in routed(h)] == [old["id"]]
    h.until(lambda: [e["id"] for e in routed(h)] == [new["id"]], what="the renewal to take over")
    # With a 115 s margin the renewal would itself be renewed soon: relax it to watch the drain.
    h.write_config(h.stub_service(min_instances=1, walltime="2m", renewal_margin="10s"))
    h.until(lambda: [j["name"] for j in slurm3.jobs()] == [f"{h.prefix}.{new['id']}"],
            what="the old job to be cancelled once drained")
    for _ in range(3):
        h.schedule()
    assert len(slurm3.jobs()) == 1  # exactly one renewal, not one per reconcile


def test_it_cancels_a_job_stuck_starting_past_its_readiness_timeout(
        slurm3: SlurmCluster, hpcside_on: MakeHpcside) -> None:
    h = hpcside_on(slurm3)
    h.write_config(h.stub_service(min_instances=1, readiness_timeout="3s", env="STUB_MODE=never-ready"),
                   backoff_base="60s", backoff_max="10m")
    h.until(lambda: any(i["phase"] == "starting" for i in h.status()["instances"]), what="a starting job")
    h.until(lambda: h.service()["failures"] == 1, timeout=30, what="the readiness timeout")
    assert "not ready 3s after starting" in h.service()["last_error"]
    h.until(lambda: not slurm3.jobs(), timeout=20, what="the stuck job to be cancelled")
    assert h.service()["backoff_seconds"] > 50  # 60 s after the first failure
    assert routed(h) == []


def test_it_backs_off_exponentially_when_jobs_keep_failing(slurm3: SlurmCluster, hpcside_on: MakeHpcside) -> None:
    h = hpcside_on(slurm3)
    h.write_config(h.stub_service(min_instances=1, env="STUB_MODE=crash"), backoff_base="2s", backoff_max="60s")
    submitted = set()
    deadline = time.monotonic() + 14
    while time.monotonic() < deadline:
        out = h.schedule().stdout
        submitted |= {line.split()[-1] for line in out.splitlines() if "submit new instance" in line}
        time.sleep(0.25)
    # Without backoff a crashing job would be resubmitted on every one of ~40 reconciles.
    assert 2 <= len(submitted) <= 5, submitted
    svc = h.service()
    assert svc["failures"] >= 2 and "before the instance was ready" in svc["last_error"]
    text = h.run("status").stdout
    assert f"({svc['failures']} failures)" in text


def test_a_dead_instance_leaves_routing_at_once_and_is_replaced(slurm3: SlurmCluster, hpcside_on: MakeHpcside) -> None:
    h = hpcside_on(slurm3)
    h.write_config(h.stub_service(min_instances=1))
    (first,) = h.until(lambda: h.ready(), what="a ready instance")
    assert slurm3.kill_job_processes(first["job_id"]) >= 1  # vLLM crashed
    h.schedule()
    assert first["id"] not in [e["id"] for e in routed(h)]
    (second,) = h.until(lambda: h.ready(), what="a replacement")
    assert second["id"] != first["id"]
    assert h.service()["failures"] == 0  # a lost instance is replaced without backoff


def test_instances_lost_to_a_node_failure_are_replaced_on_the_other_nodes(
        account: Any, hpcside_on: MakeHpcside) -> None:
    with SlurmCluster(["n1", "n2", "n3"], account) as cluster:  # its own: a node dies here
        h = hpcside_on(cluster)
        h.write_config(h.stub_service(min_instances=2, max_instances=2))
        h.until(lambda: len(h.ready()) == 2, what="two ready instances")
        victim = h.ready()[0]
        cluster.kill_node(victim["node"])
        h.schedule()
        assert victim["id"] not in [e["id"] for e in routed(h)]  # out of routing at once
        h.until(lambda: len(h.ready()) == 2 and all(i["node"] != victim["node"] for i in h.ready()),
                timeout=120, what="two ready instances on live nodes")
        assert all(e["node"] != victim["node"] for e in routed(h))
        assert h.service()["failures"] == 0  # replaced at once, no backoff
        log = (h.state / "hpcside.log").read_text()
        assert f"instance {victim['id']} (job {victim['job_id']}) lost" in log


def test_a_burst_of_triggers_runs_one_reconcile(slurm1: SlurmCluster, hpcside_on: MakeHpcside) -> None:
    import concurrent.futures

    h = hpcside_on(slurm1)
    h.write_config(h.stub_service(min_instances=1), min_interval="30s")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda _: h.run("schedule").stdout, range(8)))
    ran = [o for o in outs if "reconciled in" in o]
    assert len(ran) == 1, outs
    assert all("skipped" in o for o in outs if o not in ran)
    time.sleep(1)
    assert len(slurm1.jobs()) == 1


def test_when_slurm_does_not_answer_the_routing_table_is_kept_and_status_says_so(
        account: Any, hpcside_on: MakeHpcside) -> None:
    with SlurmCluster(["n1"], account) as cluster:
        h = hpcside_on(cluster)
        h.write_config(h.stub_service(min_instances=1), command_timeout="3s")
        h.until(lambda: h.ready(), what="a ready instance")
        before = routed(h)
        cluster.stop_controller()
        proc = h.schedule()
        assert proc.returncode == 1 and "Slurm is not answering" in proc.stderr
        assert routed(h) == before
        routing = h.routing()
        assert routing["slurm_ok"] is False
        status = h.status()
        assert status["slurm_ok"] is False and "squeue" in status["slurm_error"]
        assert "NOT ANSWERING" in h.run("status").stdout
        assert get(before[0]["url"], "/health") == 200


def test_status_json_is_machine_readable(slurm1: SlurmCluster, hpcside_on: MakeHpcside) -> None:
    h = hpcside_on(slurm1)
    h.write_config(h.stub_service(min_instances=1))
    h.until(lambda: h.ready(), what="a ready instance")
    info = json.loads(h.run("status", "--json").stdout)
    assert info["services"][0]["instances"]["ready"] == 1
    assert info["instances"][0]["endpoint"].startswith("http://127.0.0.1:")
    assert info["routable"] == {"stub-model": 1}
    # Tokens are for routers only: never printed by status.
    token = routed(h)[0]["token"]
    assert token not in h.run("status", "--json").stdout and token not in h.run("status").stdout


def test_a_submission_slurm_refuses_is_reported_and_backed_off(slurm1: SlurmCluster, hpcside_on: MakeHpcside) -> None:
    h = hpcside_on(slurm1)
    h.write_config(h.stub_service(min_instances=1, partition="nosuchpartition"), backoff_base="60s",
                   backoff_max="10m")
    proc = h.schedule()
    assert "submission failed: sbatch failed" in proc.stdout
    svc = h.service()
    assert svc["failures"] == 1 and "invalid partition" in svc["last_error"].lower()
    assert svc["backoff_seconds"] > 50
    h.schedule()
    assert h.service()["failures"] == 1  # backing off: not resubmitted on the next trigger
    assert slurm1.jobs() == [] and h.status()["instances"] == []


def test_the_harness_leaves_no_daemon_or_job_behind_even_after_faults(account: Any) -> None:
    import subprocess

    cluster = SlurmCluster(["n1", "n2"], account).start()
    try:
        script = cluster.root / "job.sh"
        script.write_text("#!/bin/bash\nsleep 300\n")
        script.chmod(0o755)
        out = cluster.root / "out"
        out.mkdir(mode=0o777)
        for _ in range(2):
            subprocess.run(["runuser", "-u", account.name, "--", "sbatch", "-o", str(out / "%j"), str(script)],
                           env=cluster.env, check=True, capture_output=True)
        deadline = time.monotonic() + 20
        while sum(j["state"] == "RUNNING" for j in cluster.jobs()) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        cluster.kill_node("n2")
        cluster.stop_controller()  # the worst case: nobody left to cancel the jobs
    finally:
        cluster.stop()  # also when a step above failed
    assert cluster.leftover_processes() == []
    assert subprocess.run(["pgrep", "-u", account.name], capture_output=True).stdout == b""


def test_a_cold_service_knows_when_slurm_could_start_it(slurm1: SlurmCluster, hpcside_on: MakeHpcside) -> None:
    h = hpcside_on(slurm1)
    h.write_config(h.stub_service(min_instances=0))
    h.schedule()
    state = json.loads((h.state / "scheduler.json").read_text())
    assert state["services"]["stub"]["start_estimate"] == 0.0  # an idle cluster starts it now
    assert not slurm1.jobs(), "--test-only submitted a job"
    # Every CPU taken by a 10-minute job: the next start is when it ends.
    blocker = subprocess.run(["runuser", "-u", h.account.name, "--", "sbatch", "--parsable", "--exclusive",
                              "--time=10", "--output=/dev/null", "--wrap", "sleep 600"],
                             env=slurm1.env, capture_output=True, text=True, check=True).stdout.strip()
    try:
        deadline = time.monotonic() + 20
        while not any(j["state"] == "RUNNING" for j in slurm1.jobs()) and time.monotonic() < deadline:
            time.sleep(0.2)
        state["services"]["stub"]["estimated_at"] = 0  # due again
        (h.state / "scheduler.json").write_text(json.dumps(state))
        h.schedule()
        estimate = json.loads((h.state / "scheduler.json").read_text())["services"]["stub"]["start_estimate"]
        assert estimate is not None and 500 < estimate <= 600
    finally:
        subprocess.run(["scancel", blocker], env=slurm1.env, check=False)
