"""The scheduler's decision: a pure function of the previous state and what was observed.

No I/O, no clock, no sleeping: ``decide`` gets ``now`` and returns the new state plus the
actions (submit, cancel) for the thin ``reconcile`` layer to carry out. Every behaviour the
operators rely on (min/max, scale on load, drain, scale to zero, windows, renewal before
walltime, readiness timeout, health, backoff, node loss, Slurm down) is decided here.
"""

from __future__ import annotations

import copy
import datetime as dt
import secrets
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional

from .config import ServiceConfig, gpus_of
from .launchers import Job
from .lifecycle import Phase
from .state import Instance, Load, ModelLoad, SchedulerState, ServiceState

# A drained instance gets this long for routers to re-read the routing table before it
# may be cancelled as idle (routers read it per request; in-flight counts publish each second).
DRAIN_SETTLE = 5.0
# A record submitted without a job id (crash between sbatch and saving state) is dropped
# when no job with its name shows up for this long.
ORPHAN_RECORD_AFTER = 120.0
# A cancel that Slurm did not act on is repeated after this long.
CANCEL_RETRY_AFTER = 30.0
ALIVE_STATES = ("PENDING", "CONFIGURING", "RUNNING", "SUSPENDED", "REQUEUED", "RESIZING", "SIGNALING")


@dataclass(frozen=True)
class Probe:
    """Result of ``GET /health`` on an instance."""

    ok: bool
    detail: str = ""  # "200", "503", "refused", "timeout", ...

    @property
    def dead(self) -> bool:
        """The engine is gone: nothing listens, or vLLM says its engine died (503)."""
        return self.detail in ("refused", "503")


@dataclass
class Observation:
    jobs: Optional[List[Job]]  # None: Slurm did not answer
    slurm_error: str = ""
    endpoints: Dict[str, Dict] = field(default_factory=dict)  # iid -> {host, port}
    probes: Dict[str, Probe] = field(default_factory=dict)  # iid -> result
    load: Load = field(default_factory=Load)


@dataclass(frozen=True)
class Submit:
    service: str
    iid: str
    replaces: Optional[str] = None


@dataclass(frozen=True)
class Cancel:
    job_id: str
    iid: str
    reason: str


@dataclass
class Plan:
    state: SchedulerState
    submits: List[Submit] = field(default_factory=list)
    cancels: List[Cancel] = field(default_factory=list)
    events: List[str] = field(default_factory=list)
    forget: List[str] = field(default_factory=list)  # iids whose files may be removed


def new_iid() -> str:
    return secrets.token_hex(6)


def job_name(prefix: str, iid: str) -> str:
    return f"{prefix}.{iid}"


def iid_of(prefix: str, name: str) -> Optional[str]:
    head, sep, iid = name.partition(".")
    return iid if sep and head == prefix and len(iid) == 12 else None


def backoff_delay(failures: int, base: float, cap: float) -> float:
    """Exponential: base, 2*base, 4*base, ... capped."""
    if failures <= 0:
        return 0.0
    return float(min(cap, base * (2 ** min(failures - 1, 30))))


def record_failure(ss: ServiceState, now: float, why: str, base: float, cap: float) -> None:
    """One more failed start in a row: remember why and back off exponentially."""
    ss.failures += 1
    ss.last_error = why
    ss.last_failure_at = now
    ss.backoff_until = now + backoff_delay(ss.failures, base, cap)


class _Decider:
    def __init__(self, now: float, local_now: dt.datetime, services: Mapping[str, ServiceConfig],
                 state: SchedulerState, obs: Observation, prefix: str, backoff_base: float,
                 backoff_max: float, make_iid: Callable[[], str]) -> None:
        self.now, self.local_now, self.services, self.obs = now, local_now, services, obs
        self.prefix, self.base, self.cap, self.make_iid = prefix, backoff_base, backoff_max, make_iid
        self.plan = Plan(state=copy.deepcopy(state))
        self.st = self.plan.state

    # -- helpers ---------------------------------------------------------------

    def event(self, text: str) -> None:
        self.plan.events.append(text)

    def svc_state(self, name: str) -> ServiceState:
        return self.st.services.setdefault(name, ServiceState())

    def lost(self, inst: Instance, why: str) -> None:
        """A serving instance died. Replace it at once: backoff is for jobs that never start."""
        ss = self.svc_state(inst.service)
        ss.last_error, ss.last_failure_at = why, self.now
        self.event(f"{inst.service}: instance {inst.iid} (job {inst.job_id}) lost: {why}")

    def fail(self, inst: Instance, why: str) -> None:
        """A job that never became ready: count it and back off exponentially."""
        ss = self.svc_state(inst.service)
        record_failure(ss, self.now, why, self.base, self.cap)
        self.event(f"{inst.service}: instance {inst.iid} (job {inst.job_id}) failed: {why}; "
                   f"failure {ss.failures}, next start not before +{ss.backoff_until - self.now:.0f}s")

    def cancel(self, inst: Instance, reason: str) -> None:
        if inst.job_id is not None:
            self.plan.cancels.append(Cancel(inst.job_id, inst.iid, reason))
        inst.phase = Phase.CANCELLING
        inst.reason = reason
        inst.cancel_requested = self.now
        self.event(f"{inst.service}: cancel instance {inst.iid} (job {inst.job_id}): {reason}")

    def drain(self, inst: Instance, reason: str) -> None:
        inst.phase = Phase.DRAINING
        inst.reason = reason
        inst.drain_since = self.now
        self.event(f"{inst.service}: drain instance {inst.iid} (job {inst.job_id}): {reason}")

    def forget(self, inst: Instance) -> None:
        del self.st.instances[inst.iid]
        self.plan.forget.append(inst.iid)

    # -- the decision ----------------------------------------------------------

    def run(self) -> Plan:
        self.st.reconciled_at = self.now
        if self.obs.jobs is None:
            self.slurm_unreachable()
            return self.plan
        self.st.slurm_ok, self.st.slurm_error = True, ""
        by_iid = self.match_jobs(self.obs.jobs)
        for inst in list(self.st.instances.values()):
            self.follow(inst, by_iid.get(inst.iid))
        self.record_load()
        for svc in self.services.values():
            self.scale(svc)
        for inst in list(self.st.instances.values()):
            if inst.service not in self.services and inst.phase != Phase.CANCELLING:
                self.cancel(inst, "service removed from the configuration")
        for name in list(self.st.services):
            if name not in self.services:
                del self.st.services[name]
        return self.plan

    def slurm_unreachable(self) -> None:
        """Slurm did not answer: start and stop nothing; keep ready instances that answer."""
        self.st.slurm_ok, self.st.slurm_error = False, self.obs.slurm_error or "no answer"
        for inst in self.st.instances.values():
            probe = self.obs.probes.get(inst.iid)
            if inst.phase in (Phase.READY, Phase.UNHEALTHY) and probe is not None:
                self.health(inst, probe, may_cancel=False)
        self.record_load()

    def match_jobs(self, jobs: List[Job]) -> Dict[str, Job]:
        by_iid: Dict[str, Job] = {}
        for job in jobs:
            iid = iid_of(self.prefix, job.name)
            if iid is None:
                continue
            inst = self.st.instances.get(iid)
            if inst is None:
                # Ours by name, unknown to our records: nobody routes to it; stop it.
                if job.state in ALIVE_STATES:
                    self.plan.cancels.append(Cancel(job.job_id, iid, "orphan job"))
                    self.event(f"cancel orphan job {job.job_id} ({job.name})")
                continue
            if inst.job_id is None:
                inst.job_id = job.job_id  # adopted after a crash between sbatch and save
            if job.job_id == inst.job_id:
                by_iid[iid] = job
        return by_iid

    def follow(self, inst: Instance, job: Optional[Job]) -> None:
        """Move one instance along its life cycle given its job and probe."""
        if job is None or job.state not in ALIVE_STATES:
            self.job_gone(inst, job)
            return
        inst.slurm_state, inst.node = job.state, job.node
        if job.time_left is not None:
            inst.expires_at = self.now + job.time_left
        if inst.phase == Phase.CANCELLING:
            if inst.cancel_requested and self.now - inst.cancel_requested > CANCEL_RETRY_AFTER:
                self.plan.cancels.append(Cancel(job.job_id, inst.iid, "cancel repeated"))
                inst.cancel_requested = self.now
            return
        if job.state != "RUNNING":
            inst.reason = job.reason if inst.phase in (Phase.PENDING, Phase.STARTING) else inst.reason
            if inst.phase == Phase.PENDING:
                return
        elif inst.phase == Phase.PENDING:
            inst.phase, inst.running_since, inst.reason = Phase.STARTING, self.now, ""
        endpoint = self.obs.endpoints.get(inst.iid)
        if endpoint:
            inst.host, inst.port = endpoint["host"], endpoint["port"]
        probe = self.obs.probes.get(inst.iid)
        if probe is not None:
            inst.last_probe = probe.detail
        if inst.phase == Phase.STARTING:
            if probe is not None and probe.ok:
                inst.phase, inst.ready_at = Phase.READY, self.now
                ss = self.svc_state(inst.service)
                ss.failures, ss.backoff_until, ss.last_error = 0, 0.0, ""
                self.event(f"{inst.service}: instance {inst.iid} (job {inst.job_id}) ready on "
                           f"{inst.node or inst.host} after {self.now - inst.submitted_at:.1f}s")
                self.retire_replaced(inst)
            else:
                svc = self.services.get(inst.service)
                started = inst.running_since or inst.submitted_at
                if svc is not None and self.now - started > svc.readiness_timeout:
                    self.fail(inst, f"not ready {svc.readiness_timeout:.0f}s after starting")
                    self.cancel(inst, "stuck starting past the readiness timeout")
        elif inst.phase in (Phase.READY, Phase.UNHEALTHY):
            if probe is not None:
                self.health(inst, probe, may_cancel=True)
        elif inst.phase == Phase.DRAINING:
            self.follow_drain(inst)

    def health(self, inst: Instance, probe: Probe, may_cancel: bool) -> None:
        if probe.ok:
            if inst.phase == Phase.UNHEALTHY:
                self.event(f"{inst.service}: instance {inst.iid} healthy again")
            inst.phase, inst.unhealthy_since = Phase.READY, None
            return
        if inst.phase == Phase.READY:
            # Out of routing at once; replaced by scale() since it no longer counts.
            inst.phase, inst.unhealthy_since = Phase.UNHEALTHY, self.now
            self.event(f"{inst.service}: instance {inst.iid} unhealthy ({probe.detail}), out of routing")
        svc = self.services.get(inst.service)
        grace = svc.unhealthy_grace if svc else 0.0
        if may_cancel and (probe.dead or self.now - (inst.unhealthy_since or self.now) >= grace):
            self.lost(inst, f"health check failed ({probe.detail})")
            self.cancel(inst, f"unhealthy ({probe.detail})")

    def follow_drain(self, inst: Instance) -> None:
        svc = self.services.get(inst.service)
        busy = self.obs.load.instances.get(inst.iid, 0)
        since = inst.drain_since or self.now
        if busy == 0 and self.now - since >= DRAIN_SETTLE:
            self.cancel(inst, "drained and idle")
        elif svc is not None and svc.drain_timeout and self.now - since >= svc.drain_timeout:
            self.cancel(inst, f"drain timeout with {busy} requests in flight")
        elif inst.expires_at is not None and inst.expires_at - self.now <= 60:
            self.cancel(inst, "walltime ends")

    def job_gone(self, inst: Instance, job: Optional[Job]) -> None:
        if inst.job_id is None and self.now - inst.submitted_at < ORPHAN_RECORD_AFTER:
            return  # sbatch may still be on its way
        if inst.phase in (Phase.CANCELLING, Phase.DRAINING):
            pass
        elif inst.phase in (Phase.PENDING, Phase.STARTING):
            state = job.state if job else "left the queue"
            self.fail(inst, f"job ended before the instance was ready ({state})")
        elif inst.phase in (Phase.READY, Phase.UNHEALTHY):
            near_end = inst.expires_at is not None and inst.expires_at - self.now <= 90
            if not near_end:
                self.lost(inst, "job ended unexpectedly (node failure, crash or cancelled outside hpcside)")
            else:
                self.event(f"{inst.service}: instance {inst.iid} reached its walltime")
        self.forget(inst)

    def retire_replaced(self, inst: Instance) -> None:
        """A renewal is ready: its predecessor stops taking requests and drains."""
        old = self.st.instances.get(inst.replaces or "")
        if old is not None and old.phase in (Phase.READY, Phase.UNHEALTHY):
            self.drain(old, f"replaced by {inst.iid} before walltime")

    # -- capacity --------------------------------------------------------------

    def record_load(self) -> None:
        for name, svc in self.services.items():
            ss = self.svc_state(name)
            load = self.obs.load.models.get(svc.model, ModelLoad())
            ss.inflight, ss.waiting = load.inflight, load.waiting
            if load.last_request_at is not None:
                ss.last_request_at = max(ss.last_request_at or 0.0, load.last_request_at)
            if load.inflight or load.waiting:
                ss.last_request_at = max(ss.last_request_at or 0.0, self.now)

    def scale(self, svc: ServiceConfig) -> None:
        ss = self.svc_state(svc.name)
        mine = [i for i in self.st.instances.values() if i.service == svc.name]
        ready = [i for i in mine if i.phase == Phase.READY]
        live_ids = {i.iid for i in mine if i.phase in (Phase.READY, Phase.UNHEALTHY)}
        # A renewal does not add capacity while the instance it replaces still serves.
        starting = [i for i in mine if i.phase in (Phase.PENDING, Phase.STARTING)
                    and not (i.replaces and i.replaces in live_ids)]
        low, high = svc.bounds_at(self.local_now)
        load = ss.inflight + ss.waiting
        want_load = load // svc.scale_up_inflight + 1 if load else 0
        recently_used = (ss.last_request_at is not None
                         and self.now - ss.last_request_at < svc.idle_timeout)
        have = len(ready) + len(starting)
        keep_warm = 1 if recently_used and have else 0
        want = min(max(low, want_load, keep_warm), high)
        ss.desired, ss.bounds = want, [low, high]

        self.renew(svc, ready)
        if want > have:
            ss.low_since = None
            if self.now < ss.backoff_until:
                return
            count = want - have
            if ss.failures:
                count = 1  # after failures, probe with one job instead of flooding Slurm
            for _ in range(count):
                self.submit(svc, None)
        elif want < have:
            if ss.low_since is None:
                ss.low_since = self.now
            if self.now - ss.low_since >= svc.scale_down_delay:
                self.shrink(svc, starting, ready, have - want)
        else:
            ss.low_since = None

    def submit(self, svc: ServiceConfig, replaces: Optional[str]) -> str:
        iid = self.make_iid()
        self.st.instances[iid] = Instance(iid=iid, service=svc.name, model=svc.model,
                                          submitted_at=self.now, replaces=replaces,
                                          cpus=svc.cpus, gpus=gpus_of(svc))
        self.plan.submits.append(Submit(svc.name, iid, replaces))
        what = f"renewal of {replaces}" if replaces else "new instance"
        self.event(f"{svc.name}: submit {what} {iid}")
        return iid

    def renew(self, svc: ServiceConfig, ready: List[Instance]) -> None:
        for inst in ready:
            if inst.expires_at is None or inst.expires_at - self.now > svc.renewal_margin:
                continue
            successor = self.st.instances.get(inst.renewed_by or "")
            if successor is not None and successor.phase in (Phase.PENDING, Phase.STARTING, Phase.READY):
                continue
            if self.now < self.svc_state(svc.name).backoff_until:
                continue
            inst.renewed_by = self.submit(svc, inst.iid)

    def shrink(self, svc: ServiceConfig, starting: List[Instance], ready: List[Instance], excess: int) -> None:
        # Queued or loading jobs first (newest first): they serve nobody yet.
        for inst in sorted(starting, key=lambda i: i.submitted_at, reverse=True):
            if excess == 0:
                return
            self.cancel(inst, "scale down (not needed any more)")
            excess -= 1
        # Then drain the least-loaded ready instance; on a tie, the one that ends first.
        def key(i: Instance) -> tuple:
            return (self.obs.load.instances.get(i.iid, 0), i.expires_at or float("inf"))

        for inst in sorted(ready, key=key)[:excess]:
            self.drain(inst, "scale down")


def decide(now: float, local_now: dt.datetime, services: Mapping[str, ServiceConfig],
           state: SchedulerState, obs: Observation, *, prefix: str = "chatai",
           backoff_base: float = 30.0, backoff_max: float = 1800.0,
           make_iid: Callable[[], str] = new_iid) -> Plan:
    """The new state and the actions that bring Slurm towards it. Pure: no I/O, no clock."""
    return _Decider(now, local_now, services, state, obs, prefix, backoff_base, backoff_max, make_iid).run()


def routing_table(state: SchedulerState) -> Dict[str, List[Instance]]:
    """Ready instances per model: the only ones that get new requests."""
    table: Dict[str, List[Instance]] = {}
    for inst in sorted(state.instances.values(), key=lambda i: i.iid):
        if inst.phase == Phase.READY and inst.port:
            table.setdefault(inst.model, []).append(inst)
    return table
