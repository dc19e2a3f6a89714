"""One request over whichever platform can answer it, surviving a lost link.

A model may be offered by several HPC platforms. ``rank`` orders them for one request: a
platform whose link is up and that has a ready instance first (the fewest of our requests in
flight per ready instance), then one where the model is already starting or queued, then a cold
one, soonest estimated Slurm start first. ``stream`` sends the request to the first and, when a
platform is down or its link is lost before the response began, to the next (or to the same
one once its link is back), so the client never notices. When the link is lost mid-stream (the
SSH connection cut, the session server killed), the stream is continued over whatever link
comes back, with the text already sent as a partial assistant message (hpcside/resume.py, the
same code the router uses when an instance dies); what cannot be continued ends with one
OpenAI-shaped error event and ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace

from common.upstream import Event, Head, Progress
from hpcbridge.client import Bridge, BridgeError, Platform, PlatformUnavailable
from hpcside.resume import Transcript

CONTINUABLE = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
LINK_ERRORS = ("platform_link_lost", "platform_unavailable")
POLL = 0.25
# Links lost under one request before it gives up (a link that dies each time it comes back).
MAX_LINK_LOSSES = 8


@dataclass(frozen=True)
class Offer:
    """One platform's offer of a model, as its last /v1/models said."""

    platform: str
    status: str = "offline"  # ready, starting, queued, offline, failed
    instances: int = 0
    start_estimate: float | None = None  # seconds until Slurm could start an instance, if known


_TIER = {"ready": 0, "starting": 1, "queued": 2}


def rank(offers: Sequence[Offer], up: dict[str, bool], inflight: dict[str, int],
         avoid: AbstractSet[str] = frozenset()) -> list[str]:
    """Platforms in the order to try them. Pure."""
    def key(o: Offer) -> tuple:
        tier = 0 if o.instances > 0 else _TIER.get(o.status, 3)
        if not up.get(o.platform, False) or o.platform in avoid:
            tier += 10
        estimate = o.start_estimate if o.start_estimate is not None else math.inf
        load = inflight.get(o.platform, 0) / max(o.instances, 1)
        return (tier, estimate if tier % 10 >= 2 else 0.0, load, o.platform)

    return [o.platform for o in sorted(offers, key=key)]


async def stream(bridge: Bridge, offers: Sequence[Offer], method: str, path: str, model: str,
                 headers: dict[str, str], body: bytes, link_wait: float = 30.0) -> AsyncIterator[Event]:
    """Like ``Platform.stream``, over the best platform, failing over and continuing as above."""
    kind = CONTINUABLE.get(path)
    transcript: Transcript | None = None
    head_sent = False
    attempt = body
    avoid: set[str] = set()
    deadline = time.monotonic() + link_wait
    losses = 0
    while True:
        platform = await _choose(bridge, offers, avoid, deadline, patient=head_sent)
        if platform is None:
            if not head_sent:
                retry = min((bridge.platforms[o.platform].state()["retry_in"] for o in offers
                             if o.platform in bridge.platforms), default=10.0)
                raise PlatformUnavailable(503, "platform_unavailable",
                                          f"no HPC platform offering {model!r} is reachable; retry later",
                                          retry_after=max(1.0, retry))
            yield _ending(transcript, "the link to the HPC platform was lost and did not come back")
            return
        name = platform.cfg.name
        try:
            async for event in platform.stream(method, path, model, headers, attempt):
                if isinstance(event, Head):
                    if head_sent:
                        if event.status != 200:  # the continuation was refused
                            yield _ending(transcript, f"the reply could not be continued ({event.status})")
                            return
                        continue
                    head_sent = True
                    if kind and event.status == 200 and \
                            event.headers.get("content-type", "").startswith("text/event-stream"):
                        transcript = Transcript(kind)
                    yield replace(event, platform=name)
                elif isinstance(event, bytes):
                    out = transcript.feed(event) if transcript is not None else event
                    if out:
                        yield out
                else:
                    yield event
            if transcript is not None:
                rest = transcript.tail()
                if rest:
                    yield rest
            return
        except BridgeError as exc:
            if exc.code not in LINK_ERRORS:
                raise
            avoid.add(name)
            deadline = time.monotonic() + link_wait
            losses += 1
            if not head_sent:
                if losses > MAX_LINK_LOSSES:
                    raise
                continue  # nothing reached the client: try again elsewhere, or when the link is back
            if transcript is None or transcript.finished or losses > MAX_LINK_LOSSES:
                yield _ending(transcript, "the link to the HPC platform was lost during the reply")
                return
            following = transcript.continuation(body)
            if following is None:
                yield _ending(transcript, f"the link to the HPC platform was lost during the reply: "
                                          f"{transcript.why_not}")
                return
            attempt = following
            yield Progress("continuing", "the link to the HPC platform was lost; continuing the reply", 0.0)


async def _choose(bridge: Bridge, offers: Sequence[Offer], avoid: set[str], deadline: float,
                  patient: bool) -> Platform | None:
    """The best platform whose link is up, or None. Waits (without blocking the loop) for a link
    being re-opened after a loss; a platform whose reconnect already failed is down (its circuit
    is open), and only a stream that already began waits for it, up to ``deadline``."""
    while True:
        platforms = {o.platform: bridge.get(o.platform) for o in offers if o.platform in bridge.platforms}
        states = {name: p.state() for name, p in platforms.items()}
        up = {name: bool(st["up"]) for name, st in states.items()}
        order = rank(offers, up, {name: st["streams"] for name, st in states.items()}, avoid)
        for name in order:
            if up[name]:
                return platforms[name]
        # A platform that never connected yet gets its first chance through Platform.stream.
        for name in order:
            if not platforms[name].ever_connected.is_set() and name not in avoid:
                return platforms[name]
        coming_back = any(st["failures"] == 0 for st in states.values())
        if time.monotonic() >= deadline or not platforms or not (coming_back or patient):
            return None
        avoid.clear()  # everything is down: whichever comes back first is fine
        await asyncio.sleep(POLL)


def _ending(transcript: Transcript | None, message: str) -> bytes:
    if transcript is None:
        raise BridgeError(502, "platform_link_lost", message, retry_after=1.0)
    return transcript.ending(message)
