"""``status``: what the scheduler knows, as a table for people or JSON for machines."""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

from .config import Config
from .lifecycle import Phase, service_status
from .state import load_scheduler_state, read_json


def _ago(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def collect(config: Config, now: Optional[float] = None) -> Dict[str, Any]:
    now = time.time() if now is None else now
    state = load_scheduler_state(config.settings.state_dir)
    routing = read_json(config.settings.state_dir / "routing.json") or {}
    services = []
    for name, svc in config.services.items():
        ss = state.services.get(name)
        mine = [i for i in state.instances.values() if i.service == name]
        count = {p.value: sum(1 for i in mine if i.phase == p) for p in Phase}
        backoff = ss.backoff_until - now if ss and ss.backoff_until > now else 0.0
        words = service_status(mine, ss, routable=len((routing.get("models") or {}).get(svc.model) or ()),
                               slurm_ok=state.slurm_ok, now=now)
        services.append({
            "service": name, "model": svc.model,
            "status": words.status.value, "stage": words.stage.value, "message": words.message,
            "desired": ss.desired if ss else None,
            "bounds": ss.bounds if ss else [svc.min_instances, svc.max_instances],
            "instances": count,
            "inflight": ss.inflight if ss else 0, "waiting": ss.waiting if ss else 0,
            "failures": ss.failures if ss else 0,
            "backoff_seconds": round(backoff, 1),
            "last_error": ss.last_error if ss else "",
            "last_request_at": ss.last_request_at if ss else None,
        })
    instances = []
    for inst in sorted(state.instances.values(), key=lambda i: (i.service, i.submitted_at)):
        instances.append({
            "id": inst.iid, "service": inst.service, "model": inst.model, "job_id": inst.job_id,
            "phase": inst.phase, "slurm_state": inst.slurm_state, "node": inst.node,
            "endpoint": inst.url if inst.port else "", "age_seconds": round(now - inst.submitted_at, 1),
            "time_left_seconds": round(inst.expires_at - now, 1) if inst.expires_at else None,
            "note": inst.reason or inst.last_probe, "replaces": inst.replaces,
        })
    return {
        "config": str(config.path), "state_dir": str(config.settings.state_dir),
        "launcher": config.settings.launcher,
        "reconciled_at": state.reconciled_at,
        "reconciled_seconds_ago": round(now - state.reconciled_at, 1) if state.reconciled_at else None,
        "slurm_ok": state.slurm_ok, "slurm_error": state.slurm_error,
        "routable": {m: len(v) for m, v in (routing.get("models") or {}).items()},
        "services": services, "instances": instances,
    }


def _table(headers: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def render_text(info: Dict[str, Any]) -> str:
    out = [f"config {info['config']}", f"state  {info['state_dir']} (launcher: {info['launcher']})"]
    if info["reconciled_at"] is None:
        out.append("never reconciled: run `python3 -m hpcside schedule`")
    else:
        out.append(f"last reconcile {_ago(info['reconciled_seconds_ago'])} ago")
    if info["slurm_ok"]:
        out.append("slurm  ok")
    else:
        out.append(f"slurm  NOT ANSWERING: {info['slurm_error']} "
                   "(routing table of ready instances kept as it was; nothing started or stopped)")
    out.append("")
    rows = []
    for s in info["services"]:
        c = s["instances"]
        backoff = f"{s['backoff_seconds']:.0f}s ({s['failures']} failures)" if s["backoff_seconds"] else (
            f"- ({s['failures']} failures)" if s["failures"] else "-")
        rows.append([s["service"], s["model"], "-" if s["desired"] is None else str(s["desired"]),
                     f"{s['bounds'][0]}-{s['bounds'][1]}", str(c["ready"]),
                     str(c["pending"] + c["starting"]), str(c["draining"] + c["cancelling"]),
                     str(c["unhealthy"]), str(s["inflight"]), str(s["waiting"]), backoff,
                     s["last_error"] or "-"])
    out.append(_table(["SERVICE", "MODEL", "WANT", "MIN-MAX", "READY", "STARTING", "STOPPING",
                       "UNHEALTHY", "IN-FLIGHT", "WAITING", "BACKOFF", "LAST ERROR"], rows))
    if info["instances"]:
        out.append("")
        rows = [[i["id"], i["service"], i["job_id"] or "-", i["phase"], i["node"] or "-",
                 i["endpoint"] or "-", _ago(i["age_seconds"]), _ago(i["time_left_seconds"]),
                 i["note"] or ""] for i in info["instances"]]
        out.append(_table(["INSTANCE", "SERVICE", "JOB", "PHASE", "NODE", "ENDPOINT", "AGE",
                           "TIME LEFT", "NOTE"], rows))
    return "\n".join(out)
