"""Files in the state directory, all written atomically and readable by the owner only.

Layout (documented in docs/hpcside.md):
    scheduler.json      the scheduler's bookkeeping: instances and per-service state
    routing.json        ready instances per model, read by the session servers' routers
    scheduler.lock      flock'ed during one reconcile (released by the kernel on a crash)
    last-reconcile      when the last reconcile started (minimum interval)
    inflight/<host>-<pid>.json   load published by each session server
    endpoints/<iid>.json         host and port, written by the job once it picked its port
    secrets/<iid>.token          the instance's own API token (0600)
    jobs/<iid>.sh                the rendered job script
    logs/<iid>.out               the job's output (vLLM logs; request logging is off)
    nodetime.jsonl      one line per ended instance: its node time (hpcside/nodetime.py)
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

SUBDIRS = ("inflight", "endpoints", "secrets", "jobs", "logs")
INFLIGHT_STALE_AFTER = 30.0
_HOST_RE = re.compile(r"^[A-Za-z0-9.:-]{1,253}$")
_IID_RE = re.compile(r"^[a-f0-9]{12}$")


def ensure_dirs(state_dir: Path) -> None:
    old = os.umask(0o077)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        for sub in SUBDIRS:
            (state_dir / sub).mkdir(exist_ok=True)
    finally:
        os.umask(old)


def write_atomic(path: Path, data: str, mode: int = 0o600) -> None:
    """Write to a temp file in the same directory, fsync, then rename over the target."""
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_json(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None


def valid_iid(iid: str) -> bool:
    return bool(_IID_RE.fullmatch(iid))


# -- the scheduler's bookkeeping ------------------------------------------------------


@dataclass
class Instance:
    iid: str
    service: str
    model: str
    submitted_at: float
    job_id: Optional[str] = None
    phase: str = "pending"  # a hpcside.lifecycle.Phase (a str: the file keeps the same words)
    slurm_state: str = ""
    reason: str = ""  # Slurm's pending reason, or why we drain / cancel
    node: str = ""
    host: str = ""
    port: int = 0
    running_since: Optional[float] = None
    ready_at: Optional[float] = None
    unhealthy_since: Optional[float] = None
    drain_since: Optional[float] = None
    cancel_requested: Optional[float] = None
    expires_at: Optional[float] = None
    replaces: Optional[str] = None
    renewed_by: Optional[str] = None
    last_probe: str = ""
    # What the job asked for (for node time when sacct cannot tell); 0: submitted by an older hpcside.
    cpus: int = 0
    gpus: int = 0

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@dataclass
class ServiceState:
    failures: int = 0  # consecutive; reset when an instance becomes ready
    backoff_until: float = 0.0
    last_error: str = ""
    last_failure_at: Optional[float] = None
    low_since: Optional[float] = None  # since when fewer instances would do
    last_request_at: Optional[float] = None
    desired: int = 0
    bounds: List[int] = field(default_factory=lambda: [0, 0])
    inflight: int = 0
    waiting: int = 0
    # While the service has no instance: seconds until Slurm could start one (sbatch --test-only),
    # and when that was asked; the gateway starts a cold model where it starts soonest.
    start_estimate: Optional[float] = None
    estimated_at: float = 0.0


@dataclass
class SchedulerState:
    instances: Dict[str, Instance] = field(default_factory=dict)
    services: Dict[str, ServiceState] = field(default_factory=dict)
    slurm_ok: bool = True
    slurm_error: str = ""
    reconciled_at: Optional[float] = None

    def to_json(self) -> Dict[str, Any]:
        return {
            "version": 1,
            "instances": {k: asdict(v) for k, v in self.instances.items()},
            "services": {k: asdict(v) for k, v in self.services.items()},
            "slurm_ok": self.slurm_ok,
            "slurm_error": self.slurm_error,
            "reconciled_at": self.reconciled_at,
        }

    @classmethod
    def from_json(cls, data: Optional[Dict[str, Any]]) -> SchedulerState:
        if not isinstance(data, dict) or data.get("version") != 1:
            return cls()
        return cls(
            instances={k: _build(Instance, v) for k, v in data.get("instances", {}).items()},
            services={k: _build(ServiceState, v) for k, v in data.get("services", {}).items()},
            slurm_ok=bool(data.get("slurm_ok", True)),
            slurm_error=str(data.get("slurm_error", "")),
            reconciled_at=data.get("reconciled_at"),
        )


def _build(cls: Any, data: Dict[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def load_scheduler_state(state_dir: Path) -> SchedulerState:
    return SchedulerState.from_json(read_json(state_dir / "scheduler.json"))


# -- files written by others: endpoints (by jobs) and in-flight counts (by routers) -----


def read_endpoint(state_dir: Path, iid: str) -> Optional[Dict[str, Any]]:
    """Host and port published by the job; anything malformed is ignored."""
    data = read_json(state_dir / "endpoints" / f"{iid}.json")
    if not isinstance(data, dict):
        return None
    host, port = data.get("host"), data.get("port")
    if not isinstance(host, str) or not _HOST_RE.fullmatch(host):
        return None
    if not isinstance(port, int) or not 0 < port < 65536:
        return None
    return {"host": host, "port": port}


@dataclass
class ModelLoad:
    inflight: int = 0  # requests being answered by an instance
    waiting: int = 0  # requests held because no instance is ready
    last_request_at: Optional[float] = None


@dataclass
class Load:
    models: Dict[str, ModelLoad] = field(default_factory=dict)
    instances: Dict[str, int] = field(default_factory=dict)


def inflight_path(state_dir: Path, pid: Optional[int] = None) -> Path:
    return state_dir / "inflight" / f"{socket.gethostname()}-{pid or os.getpid()}.json"


def publish_inflight(state_dir: Path, load: Load, now: Optional[float] = None) -> None:
    """What a session server writes, at most once a second and on every change of state."""
    write_json(
        inflight_path(state_dir),
        {
            "version": 1,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "updated_at": time.time() if now is None else now,
            "models": {m: asdict(v) for m, v in load.models.items()},
            "instances": load.instances,
        },
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_inflight(state_dir: Path, now: float) -> Load:
    """Sum the load of all live session servers; remove files of dead or silent ones."""
    total = Load()
    here = socket.gethostname()
    for path in sorted((state_dir / "inflight").glob("*.json")):
        data = read_json(path)
        if not isinstance(data, dict) or data.get("version") != 1:
            continue
        updated = data.get("updated_at")
        pid = data.get("pid")
        stale = not isinstance(updated, (int, float)) or now - updated > INFLIGHT_STALE_AFTER
        dead = data.get("host") == here and isinstance(pid, int) and not _pid_alive(pid)
        if stale or dead:
            try:
                path.unlink()
            except OSError:
                pass
            continue
        for model, entry in (data.get("models") or {}).items():
            if not isinstance(entry, dict):
                continue
            agg = total.models.setdefault(str(model), ModelLoad())
            agg.inflight += _count(entry.get("inflight"))
            agg.waiting += _count(entry.get("waiting"))
            last = entry.get("last_request_at")
            if isinstance(last, (int, float)) and (agg.last_request_at is None or last > agg.last_request_at):
                agg.last_request_at = float(last)
        for iid, count in (data.get("instances") or {}).items():
            total.instances[str(iid)] = total.instances.get(str(iid), 0) + _count(count)
    return total


def _count(value: Any) -> int:
    return value if isinstance(value, int) and 0 <= value < 1_000_000 else 0
