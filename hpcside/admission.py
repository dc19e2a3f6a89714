"""Admission: requests wait for a free slot on a model's instances in fair-share order.

Each request carries a priority (an int, lower = earlier, as vLLM's; the gateway computes it from
its user's and project's recent usage and sends it in ``x-chatai-priority``). A session's router
starts a request on an instance only while fewer than ``max_inflight`` of its requests with the
same or a better priority run there, and fewer than twice that in all (``fits``). Otherwise, or
when no instance is ready (a cold start), the request waits in the model's ``AdmissionQueue``;
whenever a request ends or an instance appears, the router admits the waiters in order: lowest
priority first, then first come, first served. Capping admission is what makes the order exact:
vLLM's own priority scheduling orders only what waits inside it, while the requests it already
runs keep sharing each step with a newcomer; counting only the same or better priorities is what
keeps a light request from waiting for a heavy stream to end (docs/hpcside.md).

Pure bookkeeping: no I/O, no clock, no event loop. The router wakes a waiter by completing the
``wake`` object it attached to the ticket (an asyncio future).
"""

from __future__ import annotations

import heapq
from typing import Any, Iterator, List, Optional, Sequence, Tuple

PRIORITY_HEADER = "x-chatai-priority"
PRIORITY_LIMIT = 100000  # priorities are clamped to -LIMIT..LIMIT
_MAX_DIGITS = 18  # a longer number is not a priority, it is noise


def parse_priority(value: Any) -> int:
    """A request's priority from its header value: an integer, clamped; anything else is 0."""
    if not isinstance(value, str):
        return 0
    text = value.strip()
    digits = text[1:] if text[:1] in "+-" else text
    if not digits or len(digits) > _MAX_DIGITS or not digits.isdigit() or not digits.isascii():
        return 0
    return max(-PRIORITY_LIMIT, min(PRIORITY_LIMIT, int(text)))


def fits(running: Sequence[int], priority: int, cap: int) -> bool:
    """Whether a request of this priority may start on an instance running requests of the
    ``running`` priorities: fewer than ``cap`` of those have the same or a better (lower) priority,
    and fewer than ``2 * cap`` run in all. Requests of a worse priority do not hold a better one
    back (up to the hard bound): a light user's request starts at once beside a heavy user's
    backlog instead of waiting for one of its streams to end. O(len(running)), kept small by the
    bound."""
    if len(running) >= 2 * cap:
        return False
    return sum(1 for p in running if p <= priority) < cap


class Ticket:
    """One waiting request. ``seq`` is its arrival number (kept across retries of one request, so a
    request that lost its instance does not go behind later arrivals of the same priority)."""

    __slots__ = ("priority", "seq", "wake", "queued")

    def __init__(self, priority: int, seq: int, wake: Any = None) -> None:
        self.priority = priority
        self.seq = seq
        self.wake = wake
        self.queued = False

    @property
    def key(self) -> Tuple[int, int]:
        return (self.priority, self.seq)

    def __repr__(self) -> str:
        return f"Ticket(priority={self.priority}, seq={self.seq})"


class AdmissionQueue:
    """Tickets in admission order. A ticket that leaves (its request was cancelled or timed out) is
    marked and skipped, not searched for: removal is O(1), and the heap is rebuilt when such
    marks outnumber the live tickets."""

    def __init__(self) -> None:
        self._heap: List[Tuple[int, int, Ticket]] = []
        self._live = 0

    def __len__(self) -> int:
        return self._live

    def __iter__(self) -> Iterator[Ticket]:
        """The live tickets, in no particular order."""
        return (t for _, _, t in self._heap if t.queued)

    def push(self, ticket: Ticket) -> None:
        if ticket.queued:
            raise ValueError(f"{ticket!r} is already queued")
        ticket.queued = True
        self._live += 1
        heapq.heappush(self._heap, (ticket.priority, ticket.seq, ticket))

    def first(self) -> Optional[Ticket]:
        """The ticket to admit next, or None."""
        heap = self._heap
        while heap and not heap[0][2].queued:
            heapq.heappop(heap)
        return heap[0][2] if heap else None

    def pop(self) -> Ticket:
        """Take the ticket to admit next (IndexError when none waits)."""
        ticket = self.first()
        if ticket is None:
            raise IndexError("no ticket waits")
        heapq.heappop(self._heap)
        ticket.queued = False
        self._live -= 1
        return ticket

    def discard(self, ticket: Ticket) -> bool:
        """Take a ticket out wherever it is; False if it was not waiting (already admitted)."""
        if not ticket.queued:
            return False
        ticket.queued = False
        self._live -= 1
        if len(self._heap) > 2 * self._live + 64:
            self._heap = [entry for entry in self._heap if entry[2].queued]
            heapq.heapify(self._heap)
        return True

    def ahead(self, ticket: Ticket) -> int:
        """How many waiting tickets go before this one (O(n): for progress messages only)."""
        key = ticket.key
        return sum(1 for p, s, t in self._heap if t.queued and (p, s) < key)
