"""Admission in fair-share order: the queue (pure), the priority header and body field, and the
router's slots (a routing table on disk, no instance: the slot logic is pure bookkeeping).

What happens with real processes (session server, stand-in vLLM) is in tests/test_router_priority.py."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from hpcside.admission import PRIORITY_LIMIT, AdmissionQueue, Ticket, fits, parse_priority
from hpcside.config import load
from hpcside.serve import Router, with_priority
from hpcside.state import ensure_dirs, write_json


def order(queue: AdmissionQueue) -> list[tuple[int, int]]:
    out = []
    while queue:
        t = queue.pop()
        out.append(t.key)
    return out


def test_the_lowest_priority_number_goes_first_and_equal_priorities_keep_their_arrival_order() -> None:
    queue = AdmissionQueue()
    for seq, priority in enumerate([10, 10, 0, 10, -5, 0, 10]):
        queue.push(Ticket(priority, seq))
    assert order(queue) == [(-5, 4), (0, 2), (0, 5), (10, 0), (10, 1), (10, 3), (10, 6)]


def test_a_ticket_that_leaves_is_skipped_and_counted_out() -> None:
    queue = AdmissionQueue()
    tickets = [Ticket(p, s) for s, p in enumerate([3, 1, 2, 1])]
    for t in tickets:
        queue.push(t)
    assert queue.discard(tickets[1]) is True
    assert queue.discard(tickets[1]) is False  # only once
    assert len(queue) == 3
    assert queue.first() is tickets[3]
    assert queue.ahead(tickets[0]) == 2 and queue.ahead(tickets[3]) == 0
    assert sorted(t.seq for t in queue) == [0, 2, 3]
    assert order(queue) == [(1, 3), (2, 2), (3, 0)]
    with pytest.raises(IndexError):
        queue.pop()


def test_an_admitted_ticket_cannot_be_discarded_and_a_queued_one_not_pushed_twice() -> None:
    queue = AdmissionQueue()
    t = Ticket(0, 1)
    queue.push(t)
    with pytest.raises(ValueError):
        queue.push(t)
    assert queue.pop() is t
    assert queue.discard(t) is False
    queue.push(t)  # a retry of the same request queues again, with its first arrival number
    assert queue.first() is t


def test_many_departures_do_not_grow_the_heap() -> None:
    queue = AdmissionQueue()
    keep = Ticket(5, 0)
    queue.push(keep)
    for seq in range(1, 5000):
        t = Ticket(0, seq)
        queue.push(t)
        queue.discard(t)
    assert len(queue) == 1 and len(queue._heap) < 200
    assert queue.pop() is keep


@pytest.mark.parametrize("value, expected", [
    ("5", 5), ("-17", -17), ("+3", 3), (" 42 ", 42), ("0", 0),
    ("999999999", PRIORITY_LIMIT), ("-999999999", -PRIORITY_LIMIT),
    ("", 0), ("high", 0), ("1.5", 0), ("1e3", 0), ("--1", 0), ("٣", 0), ("1" * 19, 0), (None, 0), (7, 0),
])
def test_the_priority_header_is_an_integer_clamped_else_zero(value: object, expected: int) -> None:
    assert parse_priority(value) == expected


def test_the_body_gets_the_priority_and_loses_any_the_client_chose() -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    assert with_priority(body, 0) is body  # the common case costs a scan, no copy
    assert json.loads(with_priority(body, 7)) == {"priority": 7, **json.loads(body)}
    assert json.loads(with_priority(b' {"model": "m"}', -3)) == {"model": "m", "priority": -3}
    assert json.loads(with_priority(b"{ }", 4)) == {"priority": 4}
    client = json.dumps({"model": "m", "priority": -100000}).encode()
    assert json.loads(with_priority(client, 10)) == {"model": "m", "priority": 10}
    assert json.loads(with_priority(client, 0)) == {"model": "m"}  # fcfs, or no header: no field at all
    nested = json.dumps({"model": "m", "tools": [{"parameters": {"priority": {"type": "integer"}}}]}).encode()
    assert json.loads(with_priority(nested, 2))["tools"] == json.loads(nested)["tools"]
    assert json.loads(with_priority(nested, 2))["priority"] == 2
    assert with_priority(b"[1, 2]", 5) == b"[1, 2]"  # not an object: left for vLLM to refuse
    assert with_priority(b"", 5) == b""


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-32"])
def test_a_body_with_a_bom_or_in_utf16_cannot_slip_past_its_priority(encoding: str) -> None:
    # vLLM's JSON parser takes these too: left as they were, the request would run at priority 0,
    # the best there is, whatever the gateway said (found in review).
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode(encoding)
    assert json.loads(with_priority(body, 1100))["priority"] == 1100
    sneaky = json.dumps({"model": "m", "priority": -5}).encode(encoding)
    assert "priority" not in json.loads(with_priority(sneaky, 0))


# -- the router's slots ---------------------------------------------------------------------


def router(tmp_path: Path, cap: int, instances: int) -> Router:
    state = tmp_path / "state"
    ensure_dirs(state)
    write_json(state / "routing.json", {"version": 1, "generated_at": time.time(), "slurm_ok": True, "models": {
        "m": [{"id": f"i{n}", "url": f"http://127.0.0.1:{9000 + n}", "token": "t"} for n in range(instances)]}})
    (tmp_path / "services.ini").write_text(f"[hpcside]\nstate_dir = {state}\nlauncher = local\n\n"
                                           f"[service:m]\ntemplate = vllm-cpu\nmodel_path = /m\nmax_inflight = {cap}\n")
    return Router(load(tmp_path / "services.ini"))


def test_slots_go_to_waiting_requests_in_priority_order_as_they_free(tmp_path: Path) -> None:
    async def run() -> None:
        r = router(tmp_path, cap=2, instances=1)
        loop = asyncio.get_running_loop()
        for seq in range(2):
            assert r.admit("m", Ticket(10, seq, loop.create_future())) is not None
        assert r.inflight == {"i0": 2}
        heavy = [Ticket(10, s, loop.create_future()) for s in (2, 3)]
        for t in heavy:
            assert r.admit("m", t) is None  # the heavy user's cap is reached: they wait
        # A better priority does not wait for the heavy streams to end: two start at once beside them.
        light = [Ticket(0, s, loop.create_future()) for s in (4, 5, 6)]
        assert r.admit("m", light[0]) is not None and r.admit("m", light[1]) is not None
        assert r.admit("m", light[2]) is None  # two of priority 0 or better run: the third waits
        assert r.inflight == {"i0": 4} and len(r.queues["m"]) == 3
        r.end("m", "i0", 10)  # a heavy stream ends: the first in line is light[2], which still does not fit,
        assert not any(t.wake.done() for t in heavy + light[2:])  # and nobody behind it jumps the line
        r.end("m", "i0", 0)  # a light one ends: light[2] goes
        assert light[2].wake.done() and not heavy[0].wake.done()
        r.end("m", "i0", 0)
        r.end("m", "i0", 0)  # the light ones are done: the heavy ones go in their order
        assert heavy[0].wake.done() and not heavy[1].wake.done()
        assert r.inflight == {"i0": 2} and len(r.queues["m"]) == 1
        r.end("m", "i0", 10)
        assert heavy[1].wake.done() and not r.queues["m"]

    asyncio.run(run())


@pytest.mark.parametrize("running, priority, fit", [
    ([], 5, True),
    ([10, 10], 10, False),  # the cap (2) counts the same priority
    ([10, 10], 0, True),  # a better one starts beside them
    ([10, 10, 0], 0, True),
    ([10, 10, 0, 0], -5, False),  # twice the cap in all: nothing more, whatever the priority
    ([0, 0], 10, False),  # a worse one counts the better ones too
    ([0, 10], 10, False),
    ([0, 10], 5, True),
])
def test_a_request_fits_while_fewer_than_the_cap_as_good_or_better_run_and_twice_the_cap_in_all(
        running: list[int], priority: int, fit: bool) -> None:
    assert fits(running, priority, 2) is fit


def test_a_request_that_leaves_the_queue_frees_nothing_and_one_that_leaves_after_admission_gives_its_slot_on(
        tmp_path: Path) -> None:
    async def run() -> None:
        r = router(tmp_path, cap=1, instances=1)
        loop = asyncio.get_running_loop()
        assert r.admit("m", Ticket(0, 0, loop.create_future())) is not None
        gone, late, last = (Ticket(0, s, loop.create_future()) for s in (1, 2, 3))
        for t in (gone, late, last):
            r.admit("m", t)
        r.leave("m", gone)  # cancelled while waiting: out of the queue, the running one keeps its slot
        assert r.inflight == {"i0": 1} and len(r.queues["m"]) == 2
        r.end("m", "i0")
        assert late.wake.done() and r.inflight == {"i0": 1}
        r.leave("m", late)  # admitted, then cancelled before it used the slot: the slot goes on
        assert last.wake.done() and r.inflight == {"i0": 1} and not r.queues["m"]
        r.end("m", "i0")
        assert r.inflight == {} and r.models["m"].inflight == 0

    asyncio.run(run())


def test_requests_go_to_the_least_loaded_instance_and_wait_only_when_all_are_full(tmp_path: Path) -> None:
    async def run() -> None:
        r = router(tmp_path, cap=2, instances=2)
        loop = asyncio.get_running_loop()
        got = [r.admit("m", Ticket(0, s, loop.create_future())) for s in range(5)]
        assert [i.iid if i else None for i in got] == ["i0", "i1", "i0", "i1", None]
        r.mark_failed("i1")  # failed here: its slots are not used until the scheduler clears it
        r.end("m", "i1")
        assert len(r.queues["m"]) == 1  # the suspect's free slot is not given out
        r.end("m", "i0")
        assert r.inflight == {"i0": 2, "i1": 1} and not r.queues["m"]

    asyncio.run(run())
