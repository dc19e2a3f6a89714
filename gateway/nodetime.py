"""Node time from the HPC platforms into ``NodeTime`` rows (``manage.py collect_nodetime``).

Each platform's session server answers ``GET /hpcside/nodetime?since=`` (docs/protocol.md) with
the instances that ended since then and those still running: from ``sacct`` when the cluster
keeps accounts, else from hpcside's own records. One row per platform and instance is created
or brought up to date (a running instance's row is closed by a later collection). The cursor
per platform (``NodeTimeCollection.until``) is on the platform's own clock and moves only when
the platform says its answer was complete; each run asks from ``OVERLAP`` before it, since a
reconcile on the login node may note an instance's end just after an answer was read.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
from dataclasses import dataclass, field
from typing import Any

from django.db import transaction
from django.utils import timezone

from gateway.models import NodeTime, NodeTimeCollection
from hpcbridge.client import Bridge, BridgeError

PATH = "/hpcside/nodetime"
OVERLAP = 600.0  # seconds asked again each time: rows are upserted, so overlap costs nothing
SOURCES = {s for s, _ in NodeTime.SOURCES}


class NodeTimeError(Exception):
    """The platform's answer could not be used; the message says why."""


@dataclass
class Collected:
    """What one collection did on one platform."""

    platform: str
    since: float = 0.0
    received: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    closed: int = 0  # open rows of instances the platform no longer lists
    skipped: list[str] = field(default_factory=list)  # why records were refused
    complete: bool = True
    sacct: str = ""
    error: str = ""


@dataclass(frozen=True)
class Record:
    instance: str
    job_id: str
    model: str
    started_at: dt.datetime
    ended_at: dt.datetime | None
    nodes: int
    cpus: int
    gpus: int
    source: str


async def nodetime_fetch(bridge: Bridge, platform: str, since: float) -> dict[str, Any]:
    """The platform's answer, parsed; raises BridgeError (platform down) or NodeTimeError."""
    head, body = await bridge.get(platform).request("GET", f"{PATH}?since={since:.3f}")
    if head.status != 200:
        raise NodeTimeError(f"the platform answered {head.status}: {body[:200].decode(errors='replace')}")
    try:
        answer = json.loads(body)
    except ValueError:
        raise NodeTimeError("the platform's answer is not JSON") from None
    if not isinstance(answer, dict) or answer.get("object") != "nodetime" or not isinstance(answer.get("data"), list):
        raise NodeTimeError("the platform's answer is not a node-time list (is hpcside older than the web side?)")
    if not _number(answer.get("now")):
        raise NodeTimeError("the platform's answer has no clock reading (now)")
    return answer


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _count(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1_000_000:
        raise NodeTimeError(f"{name} must be a whole number >= 0")
    return value


def _text(value: Any, name: str, limit: int) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise NodeTimeError(f"{name} must be text of at most {limit} characters")
    return value


def _when(value: Any, name: str) -> dt.datetime:
    if not _number(value):
        raise NodeTimeError(f"{name} must be seconds since the epoch")
    return dt.datetime.fromtimestamp(float(value), tz=dt.UTC)


def parse_record(raw: Any) -> Record:
    """One record of the answer, checked field by field (the message names the field)."""
    if not isinstance(raw, dict):
        raise NodeTimeError("a record must be an object")
    instance = _text(raw.get("instance"), "instance", 100)
    if not instance:
        raise NodeTimeError("instance must not be empty")
    source = raw.get("source")
    if source not in SOURCES:
        raise NodeTimeError(f"source must be one of {', '.join(sorted(SOURCES))}")
    started = _when(raw.get("started"), "started")
    ended = None if raw.get("ended") is None else _when(raw.get("ended"), "ended")
    if ended is not None and ended < started:
        raise NodeTimeError("ended is before started")
    return Record(instance, _text(raw.get("job_id", ""), "job_id", 50), _text(raw.get("model"), "model", 200),
                  started, ended, _count(raw.get("nodes"), "nodes"), _count(raw.get("cpus"), "cpus"),
                  _count(raw.get("gpus"), "gpus"), str(source))


def nodetime_upsert(platform: str, record: Record) -> str:
    """Create or update one row; returns "created", "updated" or "unchanged". A row that sacct
    closed is never overwritten by hpcside's estimate (sacct may have been down this time)."""
    values = {"job_id": record.job_id, "model": record.model, "started_at": record.started_at,
              "ended_at": record.ended_at, "nodes": record.nodes, "cpus": record.cpus, "gpus": record.gpus,
              "source": record.source}
    row = NodeTime.objects.select_for_update().filter(platform=platform, instance=record.instance).first()
    if row is None:
        NodeTime.objects.create(platform=platform, instance=record.instance, **values)
        return "created"
    if row.source == "sacct" and row.ended_at is not None and record.source != "sacct":
        return "unchanged"
    if all(getattr(row, k) == v for k, v in values.items()):
        return "unchanged"
    for key, value in values.items():
        setattr(row, key, value)
    row.save(update_fields=list(values))
    return "updated"


def close_lost(platform: str, listed: set[str], last_seen: dt.datetime) -> int:
    """Close the rows still open here of instances a complete answer no longer lists, neither running
    nor ended (the platform lost its record: its state directory was wiped, the ledger line could not
    be written). They end when they were last listed running, never later: else the charge-back would
    count them running to this day, every month after. Returns how many were closed."""
    closed = 0
    lost = NodeTime.objects.select_for_update().filter(platform=platform, ended_at__isnull=True)
    for row in lost.exclude(instance__in=listed):
        row.ended_at = max(row.started_at, last_seen)
        row.save(update_fields=["ended_at"])
        closed += 1
    return closed


def nodetime_collect(bridge: Bridge, platform: str, since: float | None = None) -> Collected:
    """Ask one platform and store what it says; the cursor moves on a complete answer only."""
    cursor, _ = NodeTimeCollection.objects.get_or_create(platform=platform)
    ask = max(0.0, cursor.until - OVERLAP) if since is None else max(0.0, since)
    done = Collected(platform, since=ask)
    try:
        answer = asyncio.run(nodetime_fetch(bridge, platform, ask))
    except (BridgeError, NodeTimeError) as exc:
        done.error, done.complete = str(exc), False
        cursor.last_error = done.error[:300]
        cursor.save(update_fields=["last_error"])
        return done
    done.complete = answer.get("complete") is True
    done.sacct = str(answer.get("sacct", ""))[:300]
    done.received = len(answer["data"])
    last_seen = cursor.until  # the platform's clock when it last listed what was running
    with transaction.atomic():
        listed: set[str] = set()
        for raw in answer["data"]:
            if isinstance(raw, dict) and isinstance(raw.get("instance"), str):
                listed.add(raw["instance"])  # a refused record is not taken for a lost one
            try:
                record = parse_record(raw)
            except NodeTimeError as exc:
                done.skipped.append(str(exc))
                continue
            outcome = nodetime_upsert(platform, record)
            setattr(done, outcome, getattr(done, outcome) + 1)
        if done.complete and last_seen > 0:
            done.closed = close_lost(platform, listed, dt.datetime.fromtimestamp(last_seen, tz=dt.UTC))
        if done.complete:
            cursor.until = max(cursor.until, float(answer["now"]))
        cursor.collected_at = timezone.now()
        cursor.records = done.received
        cursor.last_error = "" if done.complete else f"incomplete: {done.sacct}"[:300]
        cursor.save()
    return done
