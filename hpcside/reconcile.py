"""One reconcile: observe, decide (pure), act. Guarded by flock and a minimum interval.

The lock is a ``flock`` on ``scheduler.lock``: the kernel drops it when the process dies,
so a crash can never block scheduling (the reference's O_EXCL lock file could). Triggers
that find it taken return at once; a burst of pings inside ``min_interval`` runs one
reconcile. Probes run concurrently with a per-probe timeout, so the lock is held for at
most one squeue call plus one probe timeout plus the submissions.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import http.client
import logging
import os
import secrets
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from .config import Config
from .decide import Observation, Plan, Probe, decide, job_name, record_failure, routing_table
from .launchers import Launcher, LauncherError, make_launcher
from .lifecycle import Phase
from .nodetime import record_ended
from .state import (
    SchedulerState,
    ServiceState,
    ensure_dirs,
    load_scheduler_state,
    read_endpoint,
    read_inflight,
    read_json,
    write_atomic,
    write_json,
)
from .templates import JobFiles, TemplateError, install_guard, render

log = logging.getLogger("hpcside.scheduler")
# How often a service without instances asks Slurm when one could start (sbatch --test-only).
ESTIMATE_EVERY = 60.0


@dataclass
class Outcome:
    ran: bool
    why_skipped: str = ""
    submitted: List[str] = field(default_factory=list)
    cancelled: List[str] = field(default_factory=list)
    events: List[str] = field(default_factory=list)
    slurm_ok: bool = True
    seconds: float = 0.0


def probe_health(host: str, port: int, timeout: float, token: str = "") -> Probe:
    """``GET /health`` with the instance's token (its guard answers 401 to anything without it)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/health", headers={"Authorization": f"Bearer {token}"} if token else {})
        status = conn.getresponse().status
        return Probe(ok=status == 200, detail=str(status))
    except ConnectionRefusedError:
        return Probe(ok=False, detail="refused")
    except socket.timeout:
        return Probe(ok=False, detail="timeout")
    except (OSError, http.client.HTTPException) as exc:
        return Probe(ok=False, detail=type(exc).__name__)
    finally:
        conn.close()


class Scheduler:
    def __init__(self, config: Config, launcher: Optional[Launcher] = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.settings = config.settings
        self.dir = self.settings.state_dir
        ensure_dirs(self.dir)
        self.launcher = launcher or make_launcher(self.settings.launcher, self.dir, self.settings.command_timeout)
        self.clock = clock

    # -- the guarded entry -------------------------------------------------------

    def reconcile(self, force: bool = False) -> Outcome:
        fd = os.open(self.dir / "scheduler.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return Outcome(ran=False, why_skipped="another reconcile is running")
            now = self.clock()
            last = read_json(self.dir / "last-reconcile")
            if (not force and isinstance(last, dict) and isinstance(last.get("started_at"), (int, float))
                    and 0 <= now - last["started_at"] < self.settings.min_interval):
                return Outcome(ran=False, why_skipped="ran less than min_interval ago")
            write_json(self.dir / "last-reconcile", {"started_at": now, "pid": os.getpid()})
            return self._reconcile(now)
        finally:
            os.close(fd)  # releases the flock

    # -- observe, decide, act ----------------------------------------------------

    def _reconcile(self, now: float) -> Outcome:
        started = time.monotonic()
        state = load_scheduler_state(self.dir)
        obs = self.observe(state, now)
        plan = decide(now, self.local_time(now), self.config.services, state, obs,
                      prefix=self.settings.job_prefix, backoff_base=self.settings.backoff_base,
                      backoff_max=self.settings.backoff_max)
        outcome = self.act(plan, now)
        self.estimate_cold_starts(plan.state, now)
        try:  # the node-time ledger first: a crash before scheduler.json repeats an entry, never loses one
            record_ended(self.dir, state, plan.state, self.config.services, now)
        except OSError as exc:
            log.warning("node-time ledger not written: %s", exc)
        write_json(self.dir / "scheduler.json", plan.state.to_json())
        self.write_routing(plan.state, now)
        outcome.seconds = time.monotonic() - started
        outcome.slurm_ok = plan.state.slurm_ok
        return outcome

    def local_time(self, now: float) -> dt.datetime:
        if self.settings.timezone:
            from zoneinfo import ZoneInfo

            return dt.datetime.fromtimestamp(now, ZoneInfo(self.settings.timezone))
        return dt.datetime.fromtimestamp(now)

    def observe(self, state: SchedulerState, now: float) -> Observation:
        try:
            jobs = self.launcher.list_jobs(self.settings.job_prefix + ".")
            obs = Observation(jobs=jobs)
        except LauncherError as exc:
            obs = Observation(jobs=None, slurm_error=str(exc))
        running = {j.name for j in obs.jobs or [] if j.state == "RUNNING"}
        targets: Dict[str, Dict] = {}
        for inst in state.instances.values():
            is_running = job_name(self.settings.job_prefix, inst.iid) in running
            # Only running jobs are probed; a job pending at the last reconcile may run now.
            if inst.phase == Phase.CANCELLING or (inst.phase == Phase.PENDING and not is_running):
                continue
            endpoint = read_endpoint(self.dir, inst.iid)
            if endpoint is None:
                continue
            obs.endpoints[inst.iid] = endpoint
            if obs.jobs is None or is_running:  # Slurm silent: still check the ready ones
                targets[inst.iid] = endpoint
        obs.probes = self.probe_all(targets)
        obs.load = read_inflight(self.dir, now)
        return obs

    def probe_all(self, targets: Dict[str, Dict]) -> Dict[str, Probe]:
        if not targets:
            return {}
        timeout = self.settings.probe_timeout
        with ThreadPoolExecutor(max_workers=min(32, len(targets))) as pool:
            futures = {iid: pool.submit(probe_health, t["host"], t["port"], timeout, self.token(iid))
                       for iid, t in targets.items()}
            return {iid: f.result() for iid, f in futures.items()}

    def token(self, iid: str) -> str:
        try:
            return JobFiles(self.dir, iid).token.read_text().strip()
        except OSError:
            return ""

    def act(self, plan: Plan, now: float) -> Outcome:
        outcome = Outcome(ran=True, events=list(plan.events))
        cancel_ids = [c.job_id for c in plan.cancels]
        if cancel_ids:
            try:
                self.launcher.cancel(cancel_ids)
                outcome.cancelled = cancel_ids
            except LauncherError as exc:
                # The records stay "cancelling"; the cancel is repeated next time.
                outcome.events.append(f"cancel failed, will retry: {exc}")
        old = os.umask(0o077)
        try:
            for sub in plan.submits:
                inst = plan.state.instances[sub.iid]
                try:
                    inst.job_id = self.submit_one(sub.service, sub.iid)
                    outcome.submitted.append(inst.job_id)
                except (LauncherError, TemplateError, OSError) as exc:
                    record_failure(plan.state.services[sub.service], now, f"submission failed: {exc}",
                                   self.settings.backoff_base, self.settings.backoff_max)
                    del plan.state.instances[sub.iid]
                    plan.forget.append(sub.iid)
                    outcome.events.append(f"{sub.service}: submission failed: {exc}")
        finally:
            os.umask(old)
        for iid in plan.forget:
            self.forget_files(iid)
        if plan.forget:
            self.prune_logs()
        for line in outcome.events:
            log.info("%s", line)
        return outcome

    def estimate_cold_starts(self, state: SchedulerState, now: float) -> None:
        """For each service without an instance, ask (at most once a minute) when Slurm could start
        one; the gateway starts a cold model on the platform that can start it soonest."""
        if not state.slurm_ok:
            return  # sbatch would only wait for its timeout
        busy = {i.service for i in state.instances.values()}
        for name, svc in self.config.services.items():
            ss = state.services.setdefault(name, ServiceState())
            if name in busy:
                ss.start_estimate = None
                continue
            if now - ss.estimated_at < ESTIMATE_EVERY:
                continue
            ss.estimated_at = now
            files = JobFiles(self.dir, "e" * 12)  # never a real instance (iids are hex)
            try:
                write_atomic(files.script, render(svc, self.settings, files), mode=0o700)
                ss.start_estimate = self.launcher.start_estimate(files.script, now)
            except (LauncherError, TemplateError, OSError):
                ss.start_estimate = None

    def submit_one(self, service: str, iid: str) -> str:
        svc = self.config.services[service]
        files = JobFiles(self.dir, iid)
        install_guard(self.dir)
        write_atomic(files.token, secrets.token_urlsafe(32) + "\n")
        write_atomic(files.script, render(svc, self.settings, files), mode=0o700)
        return self.launcher.submit(files.script, job_name(self.settings.job_prefix, iid), files.output, svc.walltime)

    def forget_files(self, iid: str) -> None:
        files = JobFiles(self.dir, iid)
        for path in (files.token, files.endpoint, files.script):
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def prune_logs(self, keep_days: float = 7.0) -> None:
        cutoff = time.time() - keep_days * 86400
        for path in (self.dir / "logs").glob("*.out"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
            except OSError:
                pass

    def write_routing(self, state: SchedulerState, now: float) -> None:
        models = {}
        for model, instances in routing_table(state).items():
            entries = []
            for inst in instances:
                try:
                    token = JobFiles(self.dir, inst.iid).token.read_text().strip()
                except OSError:
                    continue  # no token, no route
                entries.append({"id": inst.iid, "url": inst.url, "token": token,
                                "job_id": inst.job_id, "node": inst.node, "service": inst.service})
            if entries:
                models[model] = entries
        write_json(self.dir / "routing.json", {
            "version": 1, "generated_at": now, "slurm_ok": state.slurm_ok,
            "slurm_error": state.slurm_error, "models": models,
        })
