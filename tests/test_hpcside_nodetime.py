"""Node time on the HPC side: sacct's output parsed, the ledger of ended instances, and the answer
that merges them (hpcside/nodetime.py). Pure logic and files; the real sacct is in
tests/test_nodetime_slurm.py."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from hpcside.config import Config, ServiceConfig, Settings, gpus_of
from hpcside.lifecycle import Phase
from hpcside.nodetime import (
    LEDGER,
    Sacct,
    SacctRow,
    SacctUnavailable,
    collect,
    parse_elapsed,
    parse_sacct,
    parse_sacct_time,
    parse_tres,
    read_ledger,
    record_ended,
)
from hpcside.serve import StreamError, nodetime_since
from hpcside.state import Instance, SchedulerState, ensure_dirs, write_json

# -- sacct's output ------------------------------------------------------------------------------


def test_alloc_tres_without_gpus_gives_cpus_and_nodes() -> None:
    assert parse_tres("billing=2,cpu=2,mem=2000M,node=1") == (2, 0, 1)


def test_alloc_tres_with_gpus_counts_the_untyped_total_once() -> None:
    assert parse_tres("billing=16,cpu=16,gres/gpu:a100=4,gres/gpu=4,mem=128G,node=2") == (16, 4, 2)


def test_alloc_tres_with_only_typed_gpus_sums_them() -> None:
    assert parse_tres("cpu=8,gres/gpu:a100=2,gres/gpu:h100=1,node=1") == (8, 3, 1)


def test_alloc_tres_of_a_pending_job_is_empty() -> None:
    assert parse_tres("") == (0, 0, 0)


@pytest.mark.parametrize("text,seconds", [
    ("00:00:05", 5), ("01:02:03", 3723), ("1-00:00:00", 86400), ("3-04:05:06", 273906), ("12:34", 754),
    ("00:01.500", 1), ("INVALID", None), ("", None),
])
def test_elapsed_including_more_than_a_day(text: str, seconds: float | None) -> None:
    assert parse_elapsed(text) == seconds


def test_sacct_times_as_epoch_iso_or_unknown() -> None:
    assert parse_sacct_time("1796216802") == 1796216802.0
    assert parse_sacct_time("Unknown") is None and parse_sacct_time("None") is None and parse_sacct_time("") is None
    local = time.mktime(time.strptime("2026-12-02T13:05:00", "%Y-%m-%dT%H:%M:%S"))
    assert parse_sacct_time("2026-12-02T13:05:00") == local  # sacct's default is local time


def test_sacct_rows_running_finished_pending_and_foreign_lines() -> None:
    out = ("41|1796216802|Unknown|00:00:02|billing=1,cpu=1,node=1|1|RUNNING\n"
           "42|1796100000|1796193906|1-02:05:06|billing=8,cpu=8,gres/gpu=2,mem=64G,node=1|1|COMPLETED\n"
           "43|1796216900|Unknown|00:00:00||0|PENDING\n"
           "44|1796000000|1796000100|00:01:40|cpu=4,node=2|2|CANCELLED by 1001\n"
           "44.batch|1796000000|1796000100|00:01:40|cpu=4,node=1|1|CANCELLED\n"
           "sacct: warning: something\n")
    rows = parse_sacct(out)
    assert sorted(rows) == ["41", "42", "43", "44"]
    assert rows["41"] == SacctRow("41", 1796216802.0, None, 2.0, 1, 1, 0, "RUNNING")
    assert not rows["41"].final
    assert rows["42"] == SacctRow("42", 1796100000.0, 1796193906.0, 93906.0, 1, 8, 2, "COMPLETED")
    assert rows["42"].final and rows["42"].ended - rows["42"].started == rows["42"].elapsed  # type: ignore[operator]
    assert rows["43"].state == "PENDING" and rows["43"].cpus == 0
    assert rows["44"].state == "CANCELLED" and rows["44"].nodes == 2 and rows["44"].final


def test_gpus_per_job_from_gpus_or_gres() -> None:
    base = ServiceConfig("s", "m", "vllm-gpu", "/m", gpus=2)
    assert gpus_of(base) == 2
    for gres, count in (("gpu:4", 4), ("gpu:a100:3", 3), ("gpu", 1), ("gpu:a100", 1), ("nvme:1", 0),
                        ("gpu:a100:2,nvme:1", 2)):
        assert gpus_of(ServiceConfig("s", "m", "vllm-gpu", "/m", gpus=2, gres=gres)) == count, gres


# -- the ledger and the answer --------------------------------------------------------------------


def config(tmp_path: Path, launcher: str = "slurm") -> Config:
    svc = ServiceConfig("chat", "chat-model", "vllm-cpu", "/m", cpus=4, gpus=1)
    settings = Settings(state_dir=tmp_path / "state", launcher=launcher)
    ensure_dirs(settings.state_dir)
    return Config(tmp_path / "services.ini", settings, {"chat": svc})


def instance(iid: str, job_id: str | None, running_since: float | None, **kw: Any) -> Instance:
    return Instance(iid=iid, service="chat", model="chat-model", submitted_at=(running_since or 1000.0) - 5,
                    job_id=job_id, phase=Phase.READY, running_since=running_since, **kw)


def test_an_instance_that_leaves_the_records_is_written_to_the_ledger_once_with_its_resources(
        tmp_path: Path) -> None:
    cfg = config(tmp_path)
    before = SchedulerState(instances={
        "a" * 12: instance("a" * 12, "101", 1000.0, cpus=4, gpus=1),
        "b" * 12: instance("b" * 12, "102", 1100.0, cpus=4, gpus=1),
        "c" * 12: instance("c" * 12, None, None),  # sbatch failed: no job, no node time
    })
    after = SchedulerState(instances={"b" * 12: before.instances["b" * 12]})
    assert record_ended(cfg.settings.state_dir, before, after, cfg.services, now=2000.0) == 1
    assert record_ended(cfg.settings.state_dir, after, after, cfg.services, now=2005.0) == 0
    path = cfg.settings.state_dir / LEDGER
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    (line,) = path.read_text().splitlines()
    assert json.loads(line) == {"v": 1, "instance": "a" * 12, "job_id": "101", "service": "chat",
                                "model": "chat-model", "started": 1000.0, "ended": 2000.0, "recorded": 2000.0,
                                "nodes": 1, "cpus": 4, "gpus": 1}


def test_without_sacct_the_answer_has_ended_and_running_instances_from_hpcsides_records(tmp_path: Path) -> None:
    cfg = config(tmp_path, launcher="local")
    ended = instance("a" * 12, "L1", 1000.0, cpus=4, gpus=1)
    running = instance("b" * 12, "L2", 1500.0)  # submitted by an older hpcside: resources from the config
    queued = instance("c" * 12, "L3", None)  # not running yet: no node time
    record_ended(cfg.settings.state_dir, SchedulerState(instances={"a" * 12: ended}), SchedulerState(),
                 cfg.services, now=2000.0)
    write_json(cfg.settings.state_dir / "scheduler.json",
               SchedulerState(instances={"b" * 12: running, "c" * 12: queued}).to_json())
    answer = collect(cfg, since=0.0, sacct=None, now=2100.0)
    assert answer["complete"] is True and answer["sacct"] == "not used" and answer["now"] == 2100.0
    assert answer["data"] == [
        {"instance": "a" * 12, "job_id": "L1", "model": "chat-model", "service": "chat", "started": 1000.0,
         "ended": 2000.0, "nodes": 1, "cpus": 4, "gpus": 1, "source": "hpcside"},
        {"instance": "b" * 12, "job_id": "L2", "model": "chat-model", "service": "chat", "started": 1500.0,
         "ended": None, "nodes": 1, "cpus": 4, "gpus": 1, "source": "hpcside"},
    ]
    # since: instances that ended before it are left out; running ones are always in.
    later = collect(cfg, since=2000.5, sacct=None, now=2100.0)
    assert [r["instance"] for r in later["data"]] == ["b" * 12]


class FakeSacct(Sacct):
    """Answers from a dict instead of running sacct (the real one is in test_nodetime_slurm.py)."""

    def __init__(self, rows: dict[str, SacctRow] | None = None, error: SacctUnavailable | None = None) -> None:
        super().__init__()
        self.answer, self.error = rows or {}, error

    def _run(self, job_ids: Any) -> dict[str, SacctRow]:
        if self.error is not None:
            raise self.error
        return {j: r for j, r in self.answer.items() if j in job_ids}


def ended_and_running(tmp_path: Path, recorded: float) -> Config:
    cfg = config(tmp_path)
    record_ended(cfg.settings.state_dir, SchedulerState(instances={"a" * 12: instance("a" * 12, "101", 1000.0)}),
                 SchedulerState(), cfg.services, now=recorded)
    write_json(cfg.settings.state_dir / "scheduler.json",
               SchedulerState(instances={"b" * 12: instance("b" * 12, "102", 1500.0)}).to_json())
    return cfg


def test_sacct_figures_replace_hpcsides_for_the_jobs_it_knows(tmp_path: Path) -> None:
    cfg = ended_and_running(tmp_path, recorded=2000.0)
    sacct = FakeSacct({"101": SacctRow("101", 998.0, 1996.0, 998.0, 1, 8, 2, "COMPLETED"),
                       "102": SacctRow("102", 1497.0, None, 600.0, 1, 8, 2, "RUNNING")})
    answer = collect(cfg, since=0.0, sacct=sacct, now=2100.0)
    assert answer["complete"] is True and answer["sacct"] == "used"
    assert [(r["instance"], r["started"], r["ended"], r["cpus"], r["gpus"], r["source"]) for r in answer["data"]] == [
        ("a" * 12, 998.0, 1996.0, 8, 2, "sacct"), ("b" * 12, 1497.0, None, 8, 2, "sacct")]


def test_a_job_sacct_has_not_seen_end_yet_makes_the_answer_incomplete(tmp_path: Path) -> None:
    cfg = ended_and_running(tmp_path, recorded=2000.0)
    sacct = FakeSacct({"101": SacctRow("101", 998.0, None, 1000.0, 1, 8, 2, "RUNNING")})
    answer = collect(cfg, since=0.0, sacct=sacct, now=2010.0)
    assert answer["complete"] is False  # the web side asks for this period again
    assert answer["data"][0]["source"] == "hpcside" and answer["data"][0]["ended"] == 2000.0
    # Long after: sacct will not catch up (the job was purged, say); hpcside's figures stand.
    assert collect(cfg, since=0.0, sacct=FakeSacct(), now=2000.0 + 3600)["complete"] is True


def test_accounting_switched_off_is_complete_but_a_failing_sacct_is_not(tmp_path: Path) -> None:
    cfg = ended_and_running(tmp_path, recorded=2000.0)
    off = collect(cfg, 0.0, FakeSacct(error=SacctUnavailable("Slurm accounting storage is disabled", True)), 9999.0)
    assert off["complete"] is True and off["sacct"].startswith("unavailable: Slurm accounting storage is disabled")
    assert {r["source"] for r in off["data"]} == {"hpcside"} and len(off["data"]) == 2
    down = collect(cfg, 0.0, FakeSacct(error=SacctUnavailable("sacct did not answer within 20s")), 9999.0)
    assert down["complete"] is False and {r["source"] for r in down["data"]} == {"hpcside"}


def test_the_ledger_stays_bounded_and_skips_damaged_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(tmp_path)
    monkeypatch.setattr("hpcside.nodetime.LEDGER_MAX_BYTES", 4000)
    for n in range(60):
        iid = f"{n:012x}"
        record_ended(cfg.settings.state_dir, SchedulerState(instances={iid: instance(iid, str(n + 1), 1000.0)}),
                     SchedulerState(), cfg.services, now=2000.0 + n)
    path = cfg.settings.state_dir / LEDGER
    assert path.stat().st_size <= 4000
    with path.open("a") as fh:
        fh.write("not json\n{\"v\": 2}\n")
    kept = read_ledger(cfg.settings.state_dir)
    assert f"{59:012x}" in kept and f"{0:012x}" not in kept  # the newest kept, the oldest dropped
    assert all(e["v"] == 1 for e in kept.values())


# -- sacct itself, through a fake CLI: the time bound, the cache, accounting switched off ---------


def fake_sacct(tmp_path: Path, body: str) -> dict[str, str]:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    script = bindir / "sacct"
    script.write_text("#!/bin/sh\n" + f"echo \"$@\" >> {tmp_path}/calls\n" + body)
    script.chmod(0o755)
    return {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}


def test_finished_rows_are_cached_and_running_ones_asked_again(tmp_path: Path) -> None:
    env = fake_sacct(tmp_path, "echo '7|100|200|00:01:40|cpu=2,node=1|1|COMPLETED'\n"
                               "echo '8|150|Unknown|00:00:50|cpu=2,node=1|1|RUNNING'\n")
    clock = [0.0]
    sacct = Sacct(timeout=5, env=env, clock=lambda: clock[0])
    assert set(sacct.rows(["7", "8"])) == {"7", "8"}
    assert sacct.rows(["7", "8"])["7"].ended == 200.0 and sacct.calls == 1  # both cached
    clock[0] = 31.0
    sacct.rows(["7", "8"])
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 2 and "-j 8 " in calls[1] + " "  # only the running job is asked again
    assert "-X -P -n -j 7,8 --format JobID,Start,End,Elapsed,AllocTRES,NNodes,State" in calls[0]


def test_sacct_is_time_bounded(tmp_path: Path) -> None:
    sacct = Sacct(timeout=0.5, env=fake_sacct(tmp_path, "sleep 5\n"))
    started = time.monotonic()
    with pytest.raises(SacctUnavailable, match="did not answer within 0.5s") as info:
        sacct.rows(["7"])
    assert time.monotonic() - started < 3 and not info.value.disabled


def test_accounting_switched_off_is_remembered(tmp_path: Path) -> None:
    env = fake_sacct(tmp_path, "echo 'sacct: error: Slurm accounting storage is disabled' >&2; exit 1\n")
    sacct = Sacct(timeout=5, env=env)
    for _ in range(3):
        with pytest.raises(SacctUnavailable) as info:
            sacct.rows(["7"])
        assert info.value.disabled
    assert sacct.calls == 1


# -- the request's query ----------------------------------------------------------------------------


def test_since_is_read_from_the_query_and_bad_queries_are_refused() -> None:
    assert nodetime_since("/hpcside/nodetime") == 0.0
    assert nodetime_since("/hpcside/nodetime?since=1764662400.5") == 1764662400.5
    for bad in ("?since=-1", "?since=nan", "?since=inf", "?since=abc", "?since=1&since=2", "?until=5", "?since",
                "?since=1&x=2", "?" + "since=1&" * 10):
        with pytest.raises(StreamError) as info:
            nodetime_since("/hpcside/nodetime" + bad)
        assert info.value.status == 400, bad


# -- the session server: sacct runs beside the requests, never in their way -----------------------


def test_a_slow_sacct_does_not_hold_other_requests_on_the_session(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from hpcbridge.client import BridgeError, Platform
    from hpcbridge.config import PlatformConfig

    state = tmp_path / "state"
    ensure_dirs(state)
    write_json(state / "last-reconcile", {"started_at": time.time()})  # the scheduler stays out of the way
    running = SchedulerState(instances={"a" * 12: instance("a" * 12, "7", 1000.0)})
    write_json(state / "scheduler.json", running.to_json())
    (tmp_path / "services.ini").write_text(
        f"[hpcside]\nstate_dir = {state}\nlauncher = slurm\nmin_interval = 1h\n\n"
        "[service:chat]\nmodel = chat-model\ntemplate = vllm-cpu\nmodel_path = /nonexistent\ncpus = 4\n")
    env = fake_sacct(tmp_path, "sleep 2\necho '7|1000|Unknown|00:10:00|cpu=4,gres/gpu=1,node=1|1|RUNNING'\n")
    monkeypatch.setenv("PATH", env["PATH"])  # the session server (a subprocess) finds the fake sacct
    plat = Platform(PlatformConfig(name="local", transport="local", hpcside_config=str(tmp_path / "services.ini")))
    plat.start()

    async def both() -> tuple[dict[str, Any], list[float], float]:
        started = time.monotonic()
        slow = asyncio.ensure_future(plat.request("GET", "/hpcside/nodetime?since=0"))
        await asyncio.sleep(0.2)
        quick = []
        for _ in range(5):
            t = time.monotonic()
            head, _body = await plat.request("GET", "/health")
            assert head.status == 200
            quick.append(time.monotonic() - t)
        head, body = await slow
        assert head.status == 200
        return json.loads(body), quick, time.monotonic() - started

    try:
        answer, quick, total = asyncio.run(both())
        with pytest.raises(BridgeError) as refused:
            asyncio.run(plat.request("GET", "/hpcside/nodetime?since=-5"))
        with pytest.raises(BridgeError) as posted:
            asyncio.run(plat.request("POST", "/hpcside/nodetime"))
    finally:
        plat.stop()
    assert total >= 2.0 and max(quick) < 0.5, (total, quick)
    assert answer["complete"] is True and answer["sacct"] == "used"
    (record,) = answer["data"]
    assert (record["job_id"], record["started"], record["ended"], record["cpus"], record["gpus"], record["source"]) \
        == ("7", 1000.0, None, 4, 1, "sacct")
    assert (refused.value.status, posted.value.status) == (400, 405)
