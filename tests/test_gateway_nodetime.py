"""The web side of node-time collection: records checked field by field, rows upserted once per
platform and instance, and the per-platform cursor that moves only on a complete answer. The
platform is a named fake here (pure logic); the real path (sshd, Slurm, sacct) is in
tests/test_nodetime_slurm.py."""

from __future__ import annotations

import datetime as dt
import io
import json
from typing import Any, cast

import pytest
from django.core.management import CommandError, call_command

from common.upstream import Head
from gateway.models import NodeTime, NodeTimeCollection
from gateway.nodetime import OVERLAP, NodeTimeError, nodetime_collect, parse_record
from hpcbridge.client import Bridge, PlatformUnavailable

pytestmark = pytest.mark.django_db

RUNNING = {"instance": "a1b2c3d4e5f6", "job_id": "41", "model": "m", "service": "s", "started": 1000.0,
           "ended": None, "nodes": 1, "cpus": 8, "gpus": 2, "source": "sacct"}


class FakePlatform:
    """Answers GET /hpcside/nodetime from a list of answers, recording the paths asked."""

    def __init__(self, answers: list[Any]) -> None:
        self.answers, self.asked = answers, []  # type: ignore[var-annotated]

    async def request(self, method: str, path: str) -> tuple[Head, bytes]:
        self.asked.append((method, path))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return Head(200, {"content-type": "application/json"}), json.dumps(answer).encode()


class FakeBridge:
    def __init__(self, platform: FakePlatform) -> None:
        self.platform = platform

    def get(self, name: str) -> FakePlatform:
        return self.platform


def answer(*records: dict[str, Any], now: float = 5000.0, complete: bool = True) -> dict[str, Any]:
    return {"object": "nodetime", "now": now, "since": 0, "complete": complete, "sacct": "used",
            "data": list(records)}


def run(platform: FakePlatform, since: float | None = None) -> Any:
    return nodetime_collect(cast(Bridge, FakeBridge(platform)), "hpc", since)


def test_a_running_instance_is_stored_open_and_closed_by_a_later_collection() -> None:
    plat = FakePlatform([answer(RUNNING, now=5000.0), answer({**RUNNING, "ended": 4000.0}, now=6000.0)])
    first = run(plat)
    assert (first.created, first.updated, first.complete) == (1, 0, True)
    row = NodeTime.objects.get(platform="hpc", instance=RUNNING["instance"])
    assert row.ended_at is None and row.started_at == dt.datetime.fromtimestamp(1000, tz=dt.UTC)
    assert (row.cpus, row.gpus, row.nodes, row.job_id, row.source) == (8, 2, 1, "41", "sacct")
    second = run(plat)
    assert (second.created, second.updated) == (0, 1)
    row.refresh_from_db()
    assert row.ended_at == dt.datetime.fromtimestamp(4000, tz=dt.UTC)
    # The second run asked from the first answer's clock, less the overlap.
    assert plat.asked == [("GET", "/hpcside/nodetime?since=0.000"),
                          ("GET", f"/hpcside/nodetime?since={5000.0 - OVERLAP:.3f}")]
    assert NodeTimeCollection.objects.get(platform="hpc").until == 6000.0


def test_a_running_instance_the_platform_no_longer_lists_is_closed_when_last_seen() -> None:
    other = {**RUNNING, "instance": "ffffeeeedddd", "job_id": "42"}
    plat = FakePlatform([answer(RUNNING, other, now=5000.0), answer(other, now=6000.0),
                         answer(other, now=7000.0, complete=False)])
    run(plat)
    second = run(plat)  # RUNNING's record is gone from the platform (state wiped, ledger unwritten)
    assert second.closed == 1
    row = NodeTime.objects.get(platform="hpc", instance=RUNNING["instance"])
    assert row.ended_at == dt.datetime.fromtimestamp(5000, tz=dt.UTC)  # when it was last listed running
    assert NodeTime.objects.get(platform="hpc", instance=other["instance"]).ended_at is None
    NodeTime.objects.filter(instance=RUNNING["instance"]).update(ended_at=None)
    assert run(plat).closed == 0  # an incomplete answer closes nothing


def test_an_incomplete_answer_is_stored_but_the_same_period_is_asked_again() -> None:
    plat = FakePlatform([answer(RUNNING, now=5000.0), answer(RUNNING, now=7000.0, complete=False),
                         answer(RUNNING, now=8000.0)])
    run(plat)
    done = run(plat)
    assert not done.complete and done.unchanged == 1
    cursor = NodeTimeCollection.objects.get(platform="hpc")
    assert cursor.until == 5000.0 and cursor.last_error.startswith("incomplete")
    run(plat)
    assert plat.asked[2] == plat.asked[1]


def test_a_row_closed_by_sacct_is_not_overwritten_by_hpcsides_estimate() -> None:
    closed = {**RUNNING, "ended": 4000.0}
    plat = FakePlatform([answer(closed), answer({**closed, "ended": 4005.0, "source": "hpcside", "cpus": 1})])
    run(plat)
    assert run(plat).unchanged == 1
    row = NodeTime.objects.get()
    assert (row.source, row.cpus, row.ended_at) == ("sacct", 8, dt.datetime.fromtimestamp(4000, tz=dt.UTC))


def test_an_unreachable_platform_keeps_the_cursor_and_says_why() -> None:
    down = PlatformUnavailable(503, "platform_unavailable", "HPC platform 'hpc' is unavailable; retry later")
    done = run(FakePlatform([down]))
    assert done.error.startswith("HPC platform 'hpc' is unavailable") and not done.complete
    cursor = NodeTimeCollection.objects.get(platform="hpc")
    assert cursor.until == 0.0 and "unavailable" in cursor.last_error


def test_a_bad_record_is_refused_with_its_field_named_and_the_others_are_kept() -> None:
    bad = {**RUNNING, "instance": "b" * 12, "cpus": -1}
    done = run(FakePlatform([answer(RUNNING, bad)]))
    assert done.created == 1 and done.skipped == ["cpus must be a whole number >= 0"]


@pytest.mark.parametrize("change,message", [
    ({"instance": ""}, "instance must not be empty"), ({"instance": 5}, "instance must be text"),
    ({"source": "guess"}, "source must be one of"), ({"started": None}, "started must be seconds"),
    ({"started": float("nan")}, "started must be seconds"), ({"ended": 10.0}, "ended is before started"),
    ({"gpus": True}, "gpus must be a whole number"), ({"model": "x" * 201}, "model must be text"),
])
def test_records_are_checked_field_by_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(NodeTimeError, match=message):
        parse_record({**RUNNING, **change})


def test_an_answer_that_is_not_a_node_time_list_is_an_error() -> None:
    done = run(FakePlatform([{"object": "list", "data": []}]))
    assert "not a node-time list" in done.error


def test_the_command_refuses_an_unknown_platform(settings: Any) -> None:
    settings.HPC_PLATFORMS = []
    with pytest.raises(CommandError, match="unknown platform 'nope'"):
        call_command("collect_nodetime", "--platform", "nope", stdout=io.StringIO())
