"""Each instance's node time, for the web side's charge-back (docs/accounting.md).

Two sources. hpcside's own ledger: when the scheduler forgets an instance whose job ran, it
appends one JSON line to ``<state>/nodetime.jsonl`` (instance, job id, service, model, when
it was seen running and gone, cpus and gpus asked for); running instances come from
``scheduler.json``. Its times are as exact as the reconcile interval (a few seconds). When
Slurm keeps accounts (slurmdbd), ``sacct`` knows the exact start, end and allocation of each
job: its rows replace the ledger's for the jobs it knows. The ledger still says which job was
which instance of which model, which sacct cannot.

sacct may be slow or down. It runs with a time bound, never on the session server's event
loop (the caller uses an executor), and its answers are cached in the process: a finished
job's row never changes, a running job's is re-asked after ``RUNNING_TTL``. A cluster without
accounting is remembered for ``DISABLED_TTL``. When sacct fails for another reason, or lags
behind a job hpcside saw end, the answer says ``complete: false`` so that the web side asks
for the same period again next time instead of keeping the ledger's estimate for good.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .config import Config, ServiceConfig, gpus_of
from .state import Instance, SchedulerState, load_scheduler_state, write_atomic

LEDGER = "nodetime.jsonl"
# The ledger is bounded: past this size the older half is dropped (about 10,000 instances fit).
LEDGER_MAX_BYTES = 2 * 1024 * 1024
SACCT_FORMAT = "JobID,Start,End,Elapsed,AllocTRES,NNodes,State"
SACCT_BATCH = 200  # job ids per sacct call (one command line)
RUNNING_TTL = 30.0  # a running job's sacct row is re-asked after this long
DISABLED_TTL = 300.0  # "accounting storage is disabled" is believed this long
FINAL_CACHE = 20_000  # finished jobs' rows kept in memory
# A job that hpcside saw end this recently but sacct does not know yet may still reach slurmdbd.
SACCT_LAG = 600.0
PENDING_STATES = ("PENDING", "REQUEUED")
_JOB_ID_RE = re.compile(r"^\d+$")


@dataclass
class Usage:
    """One instance's node time as the web side receives it (times in seconds since the epoch)."""

    instance: str
    job_id: str
    model: str
    service: str
    started: Optional[float]
    ended: Optional[float]  # None while it runs
    nodes: int
    cpus: int
    gpus: int
    source: str  # "sacct" or "hpcside"

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)


# -- the ledger of ended instances ---------------------------------------------------------


def resources(inst: Instance, svc: Optional[ServiceConfig]) -> Tuple[int, int]:
    """(cpus, gpus) of an instance's job: as recorded at submission (cpus is at least 1 there), else
    as its service asks now (an instance submitted by an older hpcside)."""
    if inst.cpus:
        return inst.cpus, inst.gpus
    return (svc.cpus, gpus_of(svc)) if svc else (0, 0)


def ledger_entry(inst: Instance, svc: Optional[ServiceConfig], ended: float) -> Dict[str, Any]:
    cpus, gpus = resources(inst, svc)
    return {"v": 1, "instance": inst.iid, "job_id": inst.job_id or "", "service": inst.service,
            "model": inst.model, "started": inst.running_since, "ended": ended, "recorded": ended,
            "nodes": 1, "cpus": cpus, "gpus": gpus}


def record_ended(state_dir: Path, before: SchedulerState, after: SchedulerState,
                 services: Mapping[str, ServiceConfig], now: float) -> int:
    """Append the instances that left the scheduler's records in this reconcile and had a job.
    Called under the scheduler's lock, before scheduler.json is written: a crash in between
    repeats an entry (readers keep the last one per instance) rather than losing it."""
    gone = [inst for iid, inst in before.instances.items() if iid not in after.instances and inst.job_id]
    if not gone:
        return 0
    lines = "".join(json.dumps(ledger_entry(i, services.get(i.service), now), sort_keys=True) + "\n" for i in gone)
    path = state_dir / LEDGER
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, lines.encode())
    finally:
        os.close(fd)
    _compact(path)
    return len(gone)


def _compact(path: Path) -> None:
    try:
        size = path.stat().st_size
    except OSError:
        return
    if size <= LEDGER_MAX_BYTES:
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    write_atomic(path, "".join(lines[len(lines) // 2:]))


def read_ledger(state_dir: Path) -> Dict[str, Dict[str, Any]]:
    """Ended instances by id (the last entry of an instance wins); malformed lines are skipped."""
    out: Dict[str, Dict[str, Any]] = {}
    try:
        text = (state_dir / LEDGER).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("v") == 1 and isinstance(entry.get("instance"), str) \
                and isinstance(entry.get("recorded"), (int, float)):
            out[entry["instance"]] = entry
    return out


@dataclass
class Known:
    """One instance as hpcside's own records know it."""

    usage: Usage
    recorded: Optional[float]  # when hpcside saw it end; None while it runs


def own_records(config: Config, since: float) -> List[Known]:
    """Instances that ended (as hpcside learnt) at or after ``since``, and those running now."""
    out = []
    for entry in read_ledger(config.settings.state_dir).values():
        if entry["recorded"] < since:
            continue
        out.append(Known(Usage(entry["instance"], str(entry.get("job_id") or ""), str(entry.get("model", "")),
                               str(entry.get("service", "")), _num(entry.get("started")), _num(entry.get("ended")),
                               _int(entry.get("nodes"), 1), _int(entry.get("cpus")), _int(entry.get("gpus")),
                               "hpcside"), float(entry["recorded"])))
    state = load_scheduler_state(config.settings.state_dir)
    for inst in state.instances.values():
        if not inst.job_id:
            continue  # not submitted yet
        cpus, gpus = resources(inst, config.services.get(inst.service))
        out.append(Known(Usage(inst.iid, inst.job_id, inst.model, inst.service, inst.running_since, None,
                               1, cpus, gpus, "hpcside"), None))
    return out


def _num(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _int(value: Any, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


# -- sacct: pure parsers ----------------------------------------------------------------------


@dataclass(frozen=True)
class SacctRow:
    job_id: str
    started: Optional[float]
    ended: Optional[float]
    elapsed: Optional[float]
    nodes: int
    cpus: int
    gpus: int
    state: str

    @property
    def final(self) -> bool:
        """Ended for good: the row will not change any more."""
        return self.ended is not None and self.state not in ("RUNNING", "COMPLETING", *PENDING_STATES)


def parse_sacct_time(text: str) -> Optional[float]:
    """Seconds since the epoch from sacct's Start/End: ``SLURM_TIME_FORMAT=%s`` gives digits (what
    we ask for); the default ``2026-12-02T13:05:00`` is local time. Unknown/None/empty: None."""
    text = text.strip()
    if text.isdigit():
        return float(text)
    try:
        return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:
        return None


def parse_elapsed(text: str) -> Optional[float]:
    """sacct's Elapsed: ``[D-]HH:MM:SS`` (or ``MM:SS``, or ``MM:SS.mmm`` for short steps)."""
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)(?:\.\d+)?", text.strip())
    if not m:
        return None
    days, hours, mins, secs = (int(g or 0) for g in m.groups())
    return float(days * 86400 + hours * 3600 + mins * 60 + secs)


def parse_tres(text: str) -> Tuple[int, int, int]:
    """(cpus, gpus, nodes) from AllocTRES, e.g. ``billing=8,cpu=8,gres/gpu:a100=2,gres/gpu=2,mem=64G,node=1``.
    The untyped ``gres/gpu`` is the total; typed entries are summed only when it is missing."""
    values: Dict[str, str] = {}
    for part in text.strip().split(","):
        key, sep, value = part.partition("=")
        if sep:
            values[key.strip()] = value.strip()

    def count(key: str) -> int:
        value = values.get(key, "")
        return int(value) if value.isdigit() else 0

    gpus = count("gres/gpu")
    if "gres/gpu" not in values:
        gpus = sum(int(v) for k, v in values.items() if k.startswith("gres/gpu:") and v.isdigit())
    return count("cpu"), gpus, count("node")


def parse_sacct(stdout: str) -> Dict[str, SacctRow]:
    """Rows of ``sacct -X -P -n --format SACCT_FORMAT`` by job id; other lines are skipped."""
    rows: Dict[str, SacctRow] = {}
    for line in stdout.splitlines():
        parts = line.split("|")
        if len(parts) != 7:
            continue
        job_id, start, end, elapsed, tres, nnodes, state = (p.strip() for p in parts)
        if not _JOB_ID_RE.fullmatch(job_id):
            continue
        cpus, gpus, tres_nodes = parse_tres(tres)
        nodes = int(nnodes) if nnodes.isdigit() else tres_nodes
        # "CANCELLED by 1001" -> CANCELLED
        rows[job_id] = SacctRow(job_id, parse_sacct_time(start), parse_sacct_time(end), parse_elapsed(elapsed),
                                nodes, cpus, gpus, state.split(" ", 1)[0])
    return rows


# -- sacct: the thin call, cached ---------------------------------------------------------------


class SacctUnavailable(Exception):
    """sacct gave no answer; ``disabled`` when the cluster keeps no accounts at all."""

    def __init__(self, message: str, disabled: bool = False) -> None:
        super().__init__(message)
        self.disabled = disabled


class Sacct:
    """sacct with a time bound and a cache; one per process, safe to call from threads."""

    def __init__(self, timeout: float = 20.0, env: Optional[Mapping[str, str]] = None,
                 clock: Any = time.monotonic) -> None:
        self.timeout = timeout
        self.env = env
        self.clock = clock
        self.lock = threading.Lock()
        self.final: OrderedDict[str, SacctRow] = OrderedDict()
        self.recent: Dict[str, Tuple[float, SacctRow]] = {}
        self.disabled_until = 0.0
        self.disabled_why = ""
        self.calls = 0  # sacct runs, for tests and the log

    def rows(self, job_ids: Iterable[str]) -> Dict[str, SacctRow]:
        wanted = sorted({j for j in job_ids if _JOB_ID_RE.fullmatch(j)}, key=int)
        now = self.clock()
        with self.lock:
            if now < self.disabled_until:
                raise SacctUnavailable(self.disabled_why, disabled=True)
            out = {j: self.final[j] for j in wanted if j in self.final}
            for j in wanted:
                hit = self.recent.get(j)
                if j not in out and hit is not None and now - hit[0] < RUNNING_TTL:
                    out[j] = hit[1]
        ask = [j for j in wanted if j not in out]
        for i in range(0, len(ask), SACCT_BATCH):
            fresh = self._run(ask[i:i + SACCT_BATCH])
            with self.lock:
                for job_id, row in fresh.items():
                    if row.final:
                        self.final[job_id] = row
                        self.recent.pop(job_id, None)
                        while len(self.final) > FINAL_CACHE:
                            self.final.popitem(last=False)
                    else:
                        self.recent[job_id] = (now, row)
            out.update(fresh)
        return out

    def _run(self, job_ids: Sequence[str]) -> Dict[str, SacctRow]:
        env = dict(self.env if self.env is not None else os.environ)
        env["SLURM_TIME_FORMAT"] = "%s"  # epoch seconds: no time zone to guess
        argv = ["sacct", "-X", "-P", "-n", "-j", ",".join(job_ids), "--format", SACCT_FORMAT]
        self.calls += 1
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout, check=False, env=env)
        except FileNotFoundError:
            self._disable("sacct not found")
            raise SacctUnavailable("sacct not found", disabled=True) from None
        except subprocess.TimeoutExpired:
            raise SacctUnavailable(f"sacct did not answer within {self.timeout:g}s") from None
        if proc.returncode != 0:
            message = _first_line(proc.stderr)
            if "accounting storage is disabled" in proc.stderr.lower():
                self._disable(message)
                raise SacctUnavailable(message, disabled=True)
            raise SacctUnavailable(f"sacct failed: {message}")
        return parse_sacct(proc.stdout)

    def _disable(self, why: str) -> None:
        with self.lock:
            self.disabled_until = self.clock() + DISABLED_TTL
            self.disabled_why = why


def _first_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[0][:300] if lines else "(no message)"


# -- the answer ----------------------------------------------------------------------------------


def collect(config: Config, since: float, sacct: Optional[Sacct], now: Optional[float] = None) -> Dict[str, Any]:
    """The answer to ``GET /hpcside/nodetime?since=``: instances that ran at or after ``since``
    (as hpcside learnt of their end) and those running now, with sacct's figures where it has them.
    ``sacct`` is None for the local launcher."""
    now = time.time() if now is None else now
    known = own_records(config, since)
    complete, note = True, ""
    rows: Dict[str, SacctRow] = {}
    if sacct is not None:
        try:
            rows = sacct.rows(k.usage.job_id for k in known)
        except SacctUnavailable as exc:
            note = str(exc)
            complete = exc.disabled  # accounting off: the ledger is all there is, for good
            sacct = None
    data = []
    for k in known:
        u = k.usage
        row = rows.get(u.job_id)
        usable = row is not None and row.started is not None and row.state not in PENDING_STATES
        if row is not None and usable and not (u.ended is not None and row.ended is None):
            data.append(Usage(u.instance, u.job_id, u.model, u.service, row.started, row.ended,
                              max(row.nodes, 1), row.cpus, row.gpus, "sacct"))
            continue
        if sacct is not None and k.recorded is not None and now - k.recorded < SACCT_LAG:
            complete = False  # slurmdbd has not caught up with this job yet: ask again later
        if u.started is not None:
            data.append(u)
    data.sort(key=lambda u: (u.started or 0.0, u.instance))
    return {"object": "nodetime", "now": now, "since": since, "complete": complete,
            "sacct": "unavailable: " + note if note else ("used" if sacct is not None else "not used"),
            "data": [u.to_json() for u in data]}


_shared: Optional[Sacct] = None
_shared_lock = threading.Lock()


def shared_sacct(config: Config) -> Optional[Sacct]:
    """The process's sacct (its cache lives as long as the session server), None for the local launcher."""
    global _shared
    if config.settings.launcher != "slurm":
        return None
    with _shared_lock:
        if _shared is None:
            _shared = Sacct(timeout=config.settings.command_timeout)
        return _shared
