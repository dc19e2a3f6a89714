"""One vocabulary for an instance's life and a service's state.

``Phase`` is where the scheduler has an instance (the words in scheduler.json). ``service_status``
is the one place that turns a service's instances into the words people see: the ``status`` of a
model in ``/v1/models`` and ``hpcside status --json``, and the ``stage`` and message of a request
held through a cold start (the progress frames, and ``manage.py embedded warm``). Pure: no I/O,
no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Iterable, Optional

from .state import Instance, ServiceState


class Phase(str, Enum):
    """An instance's phase. A ``str``: it compares equal to, and is written to JSON as, its value."""

    PENDING = "pending"  # submitted; queued in Slurm
    STARTING = "starting"  # the job runs; the model is loading
    READY = "ready"  # answers its health check; in the routing table
    UNHEALTHY = "unhealthy"  # was ready, fails its health check; out of routing
    DRAINING = "draining"  # takes no new request; ends when its last one has
    CANCELLING = "cancelling"  # scancel sent

    def __str__(self) -> str:
        return self.value


NOT_YET_READY = (Phase.PENDING, Phase.STARTING)
SERVING = (Phase.READY, Phase.UNHEALTHY)
STOPPING = (Phase.DRAINING, Phase.CANCELLING)


class Status(str, Enum):
    """A model's state as ``/v1/models`` shows it."""

    READY = "ready"  # an instance is in the routing table
    STARTING = "starting"  # loading
    QUEUED = "queued"  # waiting in Slurm
    FAILED = "failed"  # recent starts failed; backing off
    OFFLINE = "offline"  # no instance (it starts on the first request)

    def __str__(self) -> str:
        return self.value


class Stage(str, Enum):
    """Where a request held through a cold start, or waiting for a free slot, is (progress frames)."""

    WAITING = "waiting"  # the batch system does not answer
    STARTING = "starting"
    QUEUED = "queued"
    BACKOFF = "backoff"
    REQUESTED = "requested"
    READY = "ready"  # sent once, when the request goes to an instance
    CONTINUING = "continuing"  # the instance failed mid-stream; the reply goes on from another
    BUSY = "busy"  # every ready instance is at its admission cap: waiting for a free slot, in priority order

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ServiceStatus:
    status: Status
    stage: Stage
    message: str  # the stage in words, for a person waiting


def service_status(instances: Iterable[Instance], ss: Optional[ServiceState], *, routable: int,
                   slurm_ok: bool, now: float) -> ServiceStatus:
    """The words for one service, from its instances (in the scheduler's order), its state,
    how many of its instances the routers may use, and whether Slurm answered."""
    mine = list(instances)
    starting = [i for i in mine if i.phase == Phase.STARTING]
    pending = [i for i in mine if i.phase == Phase.PENDING]
    backing_off = ss is not None and ss.backoff_until > now

    if routable:
        status = Status.READY
    elif starting:
        status = Status.STARTING
    elif pending:
        status = Status.QUEUED
    elif ss is not None and ss.failures and backing_off:
        status = Status.FAILED
    else:
        status = Status.OFFLINE

    if not slurm_ok:
        stage, message = Stage.WAITING, "the batch system is not answering"
    elif starting:
        stage, message = Stage.STARTING, f"loading the model on {starting[0].node or 'a node'}"
    elif pending:
        stage, message = Stage.QUEUED, f"queued in Slurm ({pending[0].reason or 'waiting for resources'})"
    elif ss is not None and backing_off:
        stage, message = Stage.BACKOFF, f"recent starts failed; retrying in {ss.backoff_until - now:.0f}s"
    else:
        stage, message = Stage.REQUESTED, "an instance was requested"
    return ServiceStatus(status, stage, message)
