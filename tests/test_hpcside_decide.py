"""The scheduler's decision as a pure function: observed state in, actions out. No Slurm, no sleeping."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
from typing import Any

from hpcside.config import ServiceConfig, parse_capacity
from hpcside.decide import Observation, Plan, Probe, backoff_delay, decide, job_name, routing_table
from hpcside.launchers import Job
from hpcside.state import Instance, Load, ModelLoad, SchedulerState

T0 = 1_800_000_000.0
MONDAY_10 = dt.datetime(2026, 11, 23, 10, 0)  # a Monday morning
SATURDAY_10 = dt.datetime(2026, 11, 28, 10, 0)


def svc(**kw: Any) -> ServiceConfig:
    base: dict[str, Any] = dict(name="llm", model="org/llm", template="vllm-gpu", model_path="/m", gpus=1,
                                min_instances=0, max_instances=3, scale_up_inflight=4, scale_down_delay=60,
                                idle_timeout=600, walltime=3600, renewal_margin=300, readiness_timeout=120,
                                unhealthy_grace=20, drain_timeout=300)
    base.update(kw)
    return ServiceConfig(**base)


class World:
    """Feeds decide() one reconcile at a time, playing Slurm's part in memory (a fake for pure logic)."""

    def __init__(self, *services: ServiceConfig, local: dt.datetime = MONDAY_10) -> None:
        self.services = {s.name: s for s in services}
        self.state = SchedulerState()
        self.now = T0
        self.local = local
        self.jobs: dict[str, Job] = {}  # iid -> job
        self.healthy: dict[str, Probe] = {}
        self.load = Load()
        self.ids = (f"{n:012x}" for n in itertools.count(1))
        self.job_ids = itertools.count(100)
        self.slurm_down = False
        self.plans: list[Plan] = []

    def step(self, seconds: float = 5.0) -> Plan:
        self.now += seconds
        self.local += dt.timedelta(seconds=seconds)
        jobs = None if self.slurm_down else list(self.jobs.values())
        obs = Observation(jobs=jobs, slurm_error="squeue did not answer" if self.slurm_down else "",
                          endpoints={i: {"host": "node", "port": 9000} for i in self.jobs},
                          probes={i: p for i, p in self.healthy.items() if i in self.jobs},
                          load=self.load)
        plan = decide(self.now, self.local, self.services, self.state, obs, prefix="chatai",
                      backoff_base=30, backoff_max=600, make_iid=lambda: next(self.ids))
        self.state = plan.state
        for sub in plan.submits:  # sbatch
            self.jobs[sub.iid] = Job(str(next(self.job_ids)), job_name("chatai", sub.iid), "PENDING",
                                     time_left=self.services[sub.service].walltime)
            self.state.instances[sub.iid].job_id = self.jobs[sub.iid].job_id
        for cancel in plan.cancels:  # scancel
            self.jobs.pop(cancel.iid, None)
        self.plans.append(plan)
        return plan

    def run_all(self, *, healthy: bool = True) -> None:
        """Every job starts running (and answers /health if healthy)."""
        for iid, job in list(self.jobs.items()):
            self.jobs[iid] = dataclasses.replace(job, state="RUNNING", node="n1")
            self.healthy[iid] = Probe(True, "200") if healthy else Probe(False, "refused")

    def phases(self, service: str = "llm") -> list[str]:
        return sorted(i.phase for i in self.state.instances.values() if i.service == service)

    def ready(self) -> list[Instance]:
        return [i for i in self.state.instances.values() if i.phase == "ready"]

    def set_load(self, inflight: int = 0, waiting: int = 0, last: float | None = None,
                 per_instance: dict[str, int] | None = None, model: str = "org/llm") -> None:
        self.load = Load(models={model: ModelLoad(inflight, waiting, last)}, instances=per_instance or {})

    def bring_up(self) -> None:
        """Submit, run and probe until nothing more changes."""
        for _ in range(3):
            self.step()
            self.run_all()
        self.step()


def test_it_keeps_min_instances() -> None:
    w = World(svc(min_instances=2))
    plan = w.step()
    assert len(plan.submits) == 2
    w.run_all()
    w.step()
    assert w.phases() == ["ready", "ready"]
    assert [len(p.submits) for p in w.plans] == [2, 0]
    assert len(routing_table(w.state)["org/llm"]) == 2


def test_a_starting_instance_is_not_routed_until_its_health_check_passes() -> None:
    w = World(svc(min_instances=1))
    w.step()
    w.run_all(healthy=False)
    w.step()
    assert w.phases() == ["starting"] and routing_table(w.state) == {}


def test_it_scales_up_on_load_up_to_max() -> None:
    w = World(svc(min_instances=1, max_instances=3, scale_up_inflight=4))
    w.bring_up()
    w.set_load(inflight=4)  # 4 per instance on 1 instance: one more
    assert len(w.step().submits) == 1
    w.set_load(inflight=100)
    plan = w.step()
    assert len(plan.submits) == 1  # 3 max: 2 exist, one more
    w.run_all()
    w.step()
    assert len(w.step().submits) == 0
    assert w.phases() == ["ready"] * 3


def test_load_below_the_threshold_adds_nothing() -> None:
    w = World(svc(min_instances=1, scale_up_inflight=4))
    w.bring_up()
    w.set_load(inflight=3)
    assert w.step().submits == []


def test_held_requests_start_a_model_from_zero_at_once() -> None:
    w = World(svc(min_instances=0))
    assert w.step().submits == []
    w.set_load(waiting=1)
    assert len(w.step().submits) == 1


def test_it_scales_down_by_draining_the_least_loaded_instance_after_the_delay() -> None:
    w = World(svc(min_instances=0, max_instances=3, scale_up_inflight=4, scale_down_delay=60))
    w.set_load(inflight=9)
    w.bring_up()
    a, b, c = sorted(w.ready(), key=lambda i: i.iid)
    w.set_load(inflight=5, per_instance={a.iid: 3, b.iid: 0, c.iid: 2})  # 5 in flight: 2 instances do
    assert w.step().cancels == []  # low load, but the delay has not passed
    w.step(30)
    plan = w.step(31)
    assert [i.iid for i in w.state.instances.values() if i.phase == "draining"] == [b.iid]
    assert b.iid not in {i.iid for i in routing_table(w.state)["org/llm"]}  # no new requests
    assert plan.cancels == []  # drained, not killed
    assert w.step(10).cancels[0].iid == b.iid  # idle and settled: cancelled


def test_a_draining_instance_with_requests_in_flight_is_kept_until_the_drain_timeout() -> None:
    w = World(svc(min_instances=1, scale_down_delay=0, drain_timeout=300))
    w.bring_up()
    (inst,) = w.ready()
    w.state.instances[inst.iid].phase = "draining"
    w.state.instances[inst.iid].drain_since = w.now
    w.set_load(inflight=1, per_instance={inst.iid: 1})
    assert not any(c.iid == inst.iid for c in w.step(100).cancels)
    assert any(c.iid == inst.iid for c in w.step(201).cancels)


def test_by_default_a_draining_instance_waits_for_its_last_stream_or_its_walltime() -> None:
    w = World(svc(min_instances=1, scale_down_delay=0, drain_timeout=0, walltime=7200))
    w.bring_up()
    (inst,) = w.ready()
    w.state.instances[inst.iid].phase = "draining"
    w.state.instances[inst.iid].drain_since = w.now
    w.set_load(inflight=1, per_instance={inst.iid: 1})
    assert not any(c.iid == inst.iid for c in w.step(3000).cancels)  # a long stream, still served
    w.jobs[inst.iid] = dataclasses.replace(w.jobs[inst.iid], time_left=50)  # Slurm: under a minute left
    plan = w.step()
    assert [c.reason for c in plan.cancels if c.iid == inst.iid] == ["walltime ends"]


def test_it_cancels_queued_jobs_before_draining_ready_ones() -> None:
    w = World(svc(min_instances=1, max_instances=3, scale_up_inflight=1, scale_down_delay=0))
    w.bring_up()
    w.set_load(inflight=5)
    w.step()  # two more submitted, stay PENDING
    w.set_load(inflight=0, last=w.now)
    plan = w.step()
    assert len(plan.cancels) == 2 and w.phases().count("ready") == 1


def test_it_scales_to_zero_after_the_idle_timeout() -> None:
    w = World(svc(min_instances=0, idle_timeout=600, scale_down_delay=0))
    w.set_load(waiting=1)
    w.bring_up()
    w.set_load(inflight=0, last=w.now)
    w.step(300)
    assert w.phases() == ["ready"]  # used 5 minutes ago: kept warm
    w.step(301)
    assert w.phases() == ["draining"]
    w.step(10)
    assert w.phases() == ["cancelling"] and w.jobs == {}


def test_it_follows_capacity_windows() -> None:
    windows = tuple(parse_capacity("mon-fri 08:00-18:00 min=2"))
    w = World(svc(min_instances=0, capacity=windows, scale_down_delay=0, idle_timeout=0), local=MONDAY_10)
    assert len(w.step().submits) == 2
    assert w.state.services["llm"].bounds == [2, 3]
    w.run_all()
    w.step()
    w.local = dt.datetime(2026, 11, 23, 18, 0)  # the window ends
    w.step()
    assert w.phases() == ["draining", "draining"]
    w2 = World(svc(min_instances=0, capacity=windows), local=SATURDAY_10)
    assert w2.step().submits == []


def test_a_window_can_cap_capacity() -> None:
    windows = tuple(parse_capacity("sat-sun 00:00-24:00 min=0 max=1"))
    w = World(svc(min_instances=0, max_instances=3, capacity=windows), local=SATURDAY_10)
    w.set_load(inflight=50)
    assert len(w.step().submits) == 1


def test_it_submits_a_replacement_before_walltime_and_drains_the_old_one_only_when_ready() -> None:
    w = World(svc(min_instances=1, walltime=3600, renewal_margin=300))
    w.bring_up()
    (old,) = w.ready()
    w.jobs[old.iid] = dataclasses.replace(w.jobs[old.iid], time_left=299)
    plan = w.step()
    assert [s.replaces for s in plan.submits] == [old.iid]
    assert w.step().submits == []  # one renewal, not one per reconcile
    new_iid = plan.submits[0].iid
    w.jobs[new_iid] = dataclasses.replace(w.jobs[new_iid], state="RUNNING")
    w.healthy[new_iid] = Probe(False, "refused")  # loading
    w.step()
    assert w.state.instances[old.iid].phase == "ready"  # still serving
    w.healthy[new_iid] = Probe(True, "200")
    w.step()
    assert w.state.instances[old.iid].phase == "draining"
    assert [i.iid for i in routing_table(w.state)["org/llm"]] == [new_iid]


def test_it_cancels_a_job_stuck_starting_past_the_readiness_timeout() -> None:
    w = World(svc(min_instances=1, readiness_timeout=120))
    w.step()
    w.run_all(healthy=False)
    w.step()
    assert w.step(100).cancels == []
    plan = w.step(30)
    assert [c.reason for c in plan.cancels] == ["stuck starting past the readiness timeout"]
    assert w.state.services["llm"].failures == 1


def test_a_dead_instance_leaves_routing_at_once_and_is_replaced() -> None:
    w = World(svc(min_instances=1))
    w.bring_up()
    (inst,) = w.ready()
    w.healthy[inst.iid] = Probe(False, "refused")
    plan = w.step()
    assert routing_table(w.state) == {}
    assert [c.iid for c in plan.cancels] == [inst.iid]
    assert len(plan.submits) == 1  # replaced in the same reconcile, no backoff


def test_an_unhealthy_instance_leaves_routing_at_once_and_may_recover_within_its_grace() -> None:
    w = World(svc(min_instances=1, unhealthy_grace=20))
    w.bring_up()
    (inst,) = w.ready()
    w.healthy[inst.iid] = Probe(False, "timeout")
    w.step()
    assert routing_table(w.state) == {} and w.phases().count("unhealthy") == 1
    w.healthy[inst.iid] = Probe(True, "200")
    w.step()
    assert inst.iid in {i.iid for i in routing_table(w.state)["org/llm"]}


def test_an_instance_unhealthy_past_its_grace_is_cancelled() -> None:
    w = World(svc(min_instances=1, unhealthy_grace=20))
    w.bring_up()
    (inst,) = w.ready()
    w.healthy[inst.iid] = Probe(False, "timeout")
    w.step()
    assert any(c.iid == inst.iid for c in w.step(25).cancels)


def test_it_backs_off_exponentially_when_jobs_keep_failing() -> None:
    w = World(svc(min_instances=1))
    submits_at = []
    for _ in range(200):  # 1000 simulated seconds of a job that dies at once
        plan = w.step(5)
        if plan.submits:
            submits_at.append(w.now - T0)
        for s in plan.submits:
            del w.jobs[s.iid]  # it fails before the next look
    gaps = [b - a for a, b in zip(submits_at, submits_at[1:], strict=False)]
    assert len(submits_at) <= 7, submits_at  # not 200
    assert all(b >= a for a, b in zip(gaps, gaps[1:], strict=False)), gaps  # growing gaps
    assert w.state.services["llm"].failures >= 5
    assert "before the instance was ready" in w.state.services["llm"].last_error


def test_backoff_delay_doubles_and_is_capped() -> None:
    assert [backoff_delay(n, 30, 600) for n in range(7)] == [0, 30, 60, 120, 240, 480, 600]


def test_a_success_resets_the_backoff() -> None:
    w = World(svc(min_instances=1))
    w.step()
    w.jobs.clear()
    w.step()
    assert w.state.services["llm"].failures == 1
    w.step(31)
    w.run_all()
    w.step()
    assert w.state.services["llm"].failures == 0 and w.state.services["llm"].backoff_until == 0


def test_an_instance_lost_with_its_node_is_replaced_without_backoff() -> None:
    w = World(svc(min_instances=2))
    w.bring_up()
    lost = w.ready()[0]
    del w.jobs[lost.iid]  # the node died and Slurm dropped the job
    plan = w.step()
    assert len(plan.submits) == 1
    assert "ended unexpectedly" in w.state.services["llm"].last_error


def test_when_slurm_does_not_answer_ready_instances_stay_routed_and_nothing_is_started() -> None:
    w = World(svc(min_instances=2))
    w.bring_up()
    before = routing_table(w.state)
    w.slurm_down = True
    w.set_load(inflight=100)
    plan = w.step()
    assert plan.submits == [] and plan.cancels == []
    assert routing_table(w.state) == before
    assert not w.state.slurm_ok and "did not answer" in w.state.slurm_error
    w.slurm_down = False
    w.step()
    assert w.state.slurm_ok


def test_an_orphan_job_with_our_prefix_is_cancelled() -> None:
    w = World(svc(min_instances=0))
    w.jobs["ffffffffffff"] = Job("999", "chatai.ffffffffffff", "RUNNING", "n1", 100)
    plan = w.step()
    assert [c.job_id for c in plan.cancels] == ["999"]


def test_other_jobs_of_the_account_are_left_alone() -> None:
    w = World(svc(min_instances=0))
    w.jobs["x"] = Job("998", "someone-elses-job", "RUNNING", "n1", 100)
    assert w.step().cancels == []


def test_a_record_saved_before_sbatch_returned_adopts_its_job() -> None:
    w = World(svc(min_instances=1))
    w.step()
    (iid,) = w.jobs
    w.state.instances[iid].job_id = None  # crashed before saving the job id
    w.step()
    assert w.state.instances[iid].job_id == w.jobs[iid].job_id


def test_a_removed_service_is_cancelled() -> None:
    w = World(svc(min_instances=1))
    w.bring_up()
    w.services = {}
    plan = w.step()
    assert len(plan.cancels) == 1 and "removed" in plan.cancels[0].reason


def test_decide_does_not_modify_its_input_state() -> None:
    w = World(svc(min_instances=1))
    w.bring_up()
    before = w.state.to_json()
    decide(w.now + 5, w.local, w.services, w.state, Observation(jobs=[]), prefix="chatai")
    assert w.state.to_json() == before
