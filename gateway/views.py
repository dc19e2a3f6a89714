"""The OpenAI-compatible /v1 API. Thin async views: authenticate, validate, limit, forward, account.

Streaming replies are server-sent events forwarded event by event as they arrive; a
request held through a cold start gets SSE comment lines (``: queued (12s)``), which OpenAI
clients ignore; staff see the details (``: queued in Slurm (Priority) (12s)``, node names).
Every stream asks upstream (platform or external provider) for usage; the client gets the
usage chunk only if it asked. A stream that ends without one (the client left) is charged an
estimate. The stream logic itself (events, usage, what is charged) is pure: gateway/sse.py.
Request and response bodies live only in memory: they are never logged, cached or stored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse, StreamingHttpResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt

from common.upstream import Head, Progress, UpstreamError
from gateway import external, metrics, registry, sse
from gateway.budgets import Admission, budgets
from gateway.caller import Caller, caller_of
from gateway.errors import ApiError, upstream_error
from gateway.fairshare import RECORD_EVERY, fairshare
from gateway.limits import Bucket, limiter
from gateway.usage import writer
from hpcbridge import failover
from hpcbridge.registry import get_bridge

UTF8_OBJECT = re.compile(rb"[ \t\r\n]*\{")  # a body hpcside can put the priority into as it is
log = logging.getLogger("gateway.views")
ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "embeddings": "/v1/embeddings"}


def parse_body(request: HttpRequest, kind: str) -> dict[str, Any]:
    length = request.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > settings.GATEWAY_MAX_BODY:
        raise ApiError(413, f"Request body larger than {settings.GATEWAY_MAX_BODY} bytes.", code="payload_too_large")
    if len(request.body) > settings.GATEWAY_MAX_BODY:
        raise ApiError(413, f"Request body larger than {settings.GATEWAY_MAX_BODY} bytes.", code="payload_too_large")
    try:
        data = json.loads(request.body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "The request body is not valid JSON.", code="invalid_json") from None
    except RecursionError:  # arrays or objects nested about a thousand deep
        raise ApiError(400, "The request body is nested too deeply.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    model = data.get("model")
    if not isinstance(model, str) or not model or len(model) > 200:
        raise ApiError(400, "'model' is required and must be a string.", code="invalid_value", param="model")
    if "stream" in data and not isinstance(data["stream"], bool):
        raise ApiError(400, "'stream' must be true or false.", code="invalid_type", param="stream")
    if "stream_options" in data and data["stream_options"] is not None and not isinstance(data["stream_options"], dict):
        raise ApiError(400, "'stream_options' must be an object.", code="invalid_type", param="stream_options")
    if "priority" in data:  # vLLM's field: the service's fair share sets it (gateway/fairshare.py)
        raise ApiError(400, "'priority' is set by the service's fair share; leave it out.",
                       code="invalid_value", param="priority")
    if kind == "chat":
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty array.", code="invalid_value", param="messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ApiError(400, f"'messages[{i}]' must be an object with a 'role'.", code="invalid_value",
                               param=f"messages[{i}]")
    elif kind == "completions" and not isinstance(data.get("prompt"), (str, list)):
        raise ApiError(400, "'prompt' is required.", code="invalid_value", param="prompt")
    elif kind == "embeddings" and not isinstance(data.get("input"), (str, list)):
        raise ApiError(400, "'input' is required.", code="invalid_value", param="input")
    return data


class Accounting:
    """What one request leaves behind: a usage row (no content), its tokens counted, its slots released.

    What is charged is ``sse.charged_tokens`` of what the reply told (``tally``): its usage, or an
    estimate when a request the model accepted ends without one. Only counts are kept, never the text.
    """

    def __init__(self, caller: Caller, model: str, kind: str, stream: bool, slots: list[Bucket], lease: str,
                 prompt_estimate: int = 0) -> None:
        self.user, self.key, self.model, self.kind, self.stream = caller.user, caller.key, model, kind, stream
        self.project = caller.project
        self.platform = self.instance = ""  # who served it (the first answer's), for the charge-back
        self.slots, self.lease = slots, lease  # the (subject, limits) this request counts in; its parallel slot
        self.started = time.monotonic()
        self.prompt_estimate = prompt_estimate
        self.accepted = False  # the model answered 200: it has work to charge
        self.tally = sse.Tally()
        self.done = False
        self.budget = Admission()  # the budgets it counts against, and the prompt it holds in them
        self.priority = 0  # its fair-share priority (lower = earlier), sent to the platform
        self.fair_recorded = 0  # tokens already added to the fair-share usage while it streamed
        self.fair_due = self.started + RECORD_EVERY

    def served_by(self, head: Head) -> None:
        if not self.instance:
            self.platform, self.instance = head.platform, head.instance

    def first_byte(self) -> None:
        metrics.TTFB.labels(self.kind, self.model).observe(time.monotonic() - self.started)

    async def finish(self, status: int) -> None:
        """Charge, count and release, once, whichever way the request ended."""
        if self.done:
            return
        self.done = True
        prompt, completion = sse.charged_tokens(self.tally, self.accepted, self.prompt_estimate)
        metrics.REQUESTS.labels(self.kind, self.model, str(status)).inc()
        if prompt:
            metrics.TOKENS.labels(self.model, "prompt").inc(prompt)
        if completion:
            metrics.TOKENS.labels(self.model, "completion").inc(completion)
        # A client that leaves cancels the task running this, and cleanup that awaits can be cancelled
        # again half-way (its tokens in the budget but no usage row): the rest runs shielded.
        await asyncio.shield(asyncio.ensure_future(self._charge(status, prompt, completion)))

    async def _charge(self, status: int, prompt: int, completion: int) -> None:
        """Each step on its own: a cache that fails (Redis restarting) must not cost the usage row,
        which budgets, fair share and the charge-back are rebuilt from (and a parallel slot or hold
        that cannot be given back now expires by itself)."""
        try:
            await limiter.release_all(self.slots, prompt + completion, self.lease)
        except Exception as exc:  # noqa: BLE001 - logged, and the lease expires
            log.warning("accounting: parallel slot not released (%s)", type(exc).__name__)
        now = timezone.now()
        try:
            await budgets.settle(self.budget, prompt + completion, now)  # before its row is queued
        except Exception as exc:  # noqa: BLE001 - the row below is what the next rebuild counts
            log.warning("accounting: budget not counted in the cache (%s)", type(exc).__name__)
        writer.add({
            "user_id": self.user.pk, "api_key_id": self.key.pk if self.key is not None else None,
            "model": self.model, "endpoint": self.kind, "status": status, "prompt_tokens": prompt,
            "completion_tokens": completion, "streamed": self.stream,
            "duration_ms": int((time.monotonic() - self.started) * 1000), "created_at": now,
            "project_id": self.project.id if self.project is not None else None,
            "platform": self.platform[:100], "instance": self.instance[:100]})
        try:
            await self._fair_usage(prompt + completion)
        except Exception as exc:  # noqa: BLE001 - one request's weight in fair share, no more
            log.warning("accounting: fair-share usage not recorded (%s)", type(exc).__name__)

    def fair_share_due(self) -> bool:
        """Whether a running stream's tokens so far are due in the fair-share usage (every RECORD_EVERY s)."""
        return time.monotonic() >= self.fair_due

    async def streamed_so_far(self) -> None:
        """Add a running stream's tokens so far (the prompt's estimate and the chunks) to the fair-share
        usage, so a user's long streams weigh on their next requests' priority before they end."""
        self.fair_due = time.monotonic() + RECORD_EVERY
        await self._fair_usage(sum(sse.charged_tokens(self.tally, True, self.prompt_estimate)))

    async def _fair_usage(self, total: int) -> None:
        if total > self.fair_recorded:
            project = self.project.id if self.project is not None else None
            await fairshare.record(self.user.pk, project, total - self.fair_recorded)
            self.fair_recorded = total


async def proxy(request: HttpRequest, kind: str) -> HttpResponseBase:
    rate_headers: dict[str, str] = {}
    caller: Caller | None = None
    admission: Admission | None = None
    try:
        if request.method != "POST":
            raise ApiError(405, f"{ENDPOINTS[kind]} takes POST.", code="method_not_allowed")
        caller = await caller_of(request)
        data = parse_body(request, kind)
        entry = await registry.resolve(data["model"], caller)
        # Token budgets first: a request refused for budget is forwarded nowhere and counts in no limit.
        estimate = sse.prompt_estimate(data, kind)
        admission = await budgets.admit(caller, estimate)
        if not admission.allowed:
            metrics.RATE_LIMITED.labels(kind).inc()
            raise admission.error()
        # The user's limits (all their keys and the chat page together), the key's own on top,
        # and the model's own, usually stricter, limits per user (an external provider's quota, say).
        buckets = caller.buckets()
        if entry.limits is not None:
            buckets.append((f"{caller.subject}:{entry.limits_id}", entry.limits))
        lease = uuid.uuid4().hex
        slots: list[Bucket] = []
        try:
            decision, slots = await limiter.acquire_all(buckets, lease)
            rate_headers = decision.headers
            if not decision.allowed:
                metrics.RATE_LIMITED.labels(kind).inc()
                where = (f" for {entry.id}" if entry.limits_id and decision.subject.endswith(f":{entry.limits_id}")
                         else " for this key" if decision.subject.startswith("k") else "")
                raise ApiError(429, f"Rate limit reached: {decision.reason}{where}. "
                                    f"Retry after {decision.retry_after:.0f}s.",
                               code="rate_limit_exceeded", retry_after=decision.retry_after)
            acct = Accounting(caller, entry.id, kind, bool(data.get("stream")), slots, lease, estimate)
            acct.budget = admission
            acct.priority = await fairshare.priority(caller)  # from recent usage: one cache read
        except BaseException:
            # Refused, failed (the cache down) or the client left before forward: what this request
            # holds (its prompt in the budget, its parallel slot) goes back now, not when it expires.
            await asyncio.shield(give_back(admission, slots, lease))
            raise
        response = await forward(entry, kind, data, request.body, acct)
    except ApiError as exc:
        if exc.status in (400, 401, 403, 404, 405, 413):
            metrics.REQUESTS.labels(kind, "-", str(exc.status)).inc()  # model label not trusted here
        response = exc.response()
        if exc.code == "insufficient_quota":
            response["x-should-retry"] = "false"  # OpenAI's clients would retry a 429: waiting will not help
    for name, value in rate_headers.items():
        response[name] = value
    # The tightest budget left (as admitted, this request's prompt not yet counted), on every response.
    budget_headers = admission.headers if admission is not None and admission.applied else (
        await budgets.headers_for(caller) if caller is not None else {})
    for name, value in budget_headers.items():
        response[name] = value
    return response


async def give_back(admission: Admission, slots: list[Bucket], lease: str) -> None:
    """Release a request that ends before it is forwarded: its budget hold and its parallel slot."""
    await budgets.release(admission)
    if slots:
        await limiter.release_all(slots, 0, lease)


def open_events(entry: registry.ModelEntry, kind: str, data: dict[str, Any], raw: bytes,
                request_id: str, priority: int = 0) -> AsyncIterator[Any]:
    """The upstream's events (Head, Progress, bytes): an HPC platform (told the request's fair-share
    priority, which orders its admission queue and vLLM's), or an external provider."""
    if data.get("stream") and kind != "embeddings":
        # Ask upstream for usage to count tokens; the client gets it only if it asked.
        data = {**data, "stream_options": {**(data.get("stream_options") or {}), "include_usage": True}}
        raw = b""
    if entry.provider is not None:
        if entry.provider.model != data["model"]:
            data, raw = {**data, "model": entry.provider.model}, b""
        return external.stream(entry.provider, ENDPOINTS[kind], raw or json.dumps(data).encode(), request_id)
    headers = {"content-type": "application/json", "x-request-id": request_id, "x-chatai-priority": str(priority)}
    if raw and not UTF8_OBJECT.match(raw):
        raw = b""  # a BOM or UTF-16/32 (json.loads took it): sent as plain UTF-8 JSON, which hpcside edits
    # Over the best platform offering the model; a lost link is survived (hpcbridge/failover.py).
    return failover.stream(get_bridge(), entry.offers, "POST", ENDPOINTS[kind], entry.id, headers,
                           raw or json.dumps(data).encode(), link_wait=settings.GATEWAY_LINK_WAIT)


async def forward(entry: registry.ModelEntry, kind: str, data: dict[str, Any], raw: bytes,
                  acct: Accounting) -> HttpResponseBase:
    """The upstream's answer: a whole response, or a stream handed to ``relay``. The request is
    accounted here when it ends here (refused, failed, not streamed), else when the stream ends."""
    stream = bool(data.get("stream"))
    request_id = uuid.uuid4().hex
    events: Any = None
    first: Any = None
    ended: int | None = 499  # the status to account if the request ends here (499: the client left)
    try:
        events = open_events(entry, kind, data, raw, request_id, acct.priority)
        first = await events.__anext__()
        if isinstance(first, Progress):
            metrics.HELD.labels(acct.model).inc()
        acct.first_byte()
        while isinstance(first, Progress) and not stream:
            metrics.observe_progress(acct.model, first.stage, first.elapsed)
            first = await events.__anext__()  # a plain request simply waits through a cold start
        if isinstance(first, Head) and first.status == 200:
            acct.accepted = True
            acct.served_by(first)
            registry.note_ready(entry.platform, acct.model)
        if isinstance(first, Head) and (first.status != 200 or not stream):
            body = b"".join([chunk async for chunk in events if isinstance(chunk, bytes)])
            if first.status == 200:
                acct.tally.take_usage(sse.usage_in_body(body))
            ended = first.status
            if first.status == 200:
                kind = first.headers.get("content-type", "application/json")
                resp = HttpResponse(body, status=200, content_type=kind)
            else:  # every error in one shape, whatever the upstream's was
                resp = JsonResponse(upstream_error(first.status, body), status=first.status)
            resp["x-request-id"] = request_id
            if "retry-after" in first.headers:
                resp["Retry-After"] = first.headers["retry-after"]
            return resp
        ended = None  # the stream goes on: relay accounts for it
    except UpstreamError as exc:
        ended = exc.status
        raise ApiError.from_upstream(exc) from None
    except StopAsyncIteration:
        ended = 502
        raise ApiError(502, "The model server closed the response without answering.", code="upstream_error") from None
    except BaseException as exc:
        if events is None:  # not even opened (the platforms' settings are broken): nothing was sent
            ended = 500
        else:
            if entry.provider is not None and isinstance(exc, asyncio.CancelledError) and not isinstance(first, Head):
                # The client left before the answer began (a plain request's timeout, say): an external
                # provider does, and bills, the work all the same. Its prompt is charged (the reply's
                # length is unknown); a platform's vLLM stops at the cancel.
                acct.accepted = True
            await events.aclose()
        raise
    finally:
        if ended is not None:
            await acct.finish(ended)
    # The usage chunk we asked for goes to the client only if it asked too.
    wants_usage = bool((data.get("stream_options") or {}).get("include_usage"))
    streamed = StreamingHttpResponse(relay(first, events, acct, wants_usage, entry.platform),
                                     content_type="text/event-stream")
    streamed["Cache-Control"] = "no-cache"
    streamed["X-Accel-Buffering"] = "no"  # tell a reverse proxy not to buffer
    streamed["x-request-id"] = request_id
    return streamed


async def relay(first: Any, events: AsyncIterator[Any], acct: Accounting, wants_usage: bool,
                platform_name: str) -> AsyncIterator[bytes]:
    """Forward SSE events as they complete (``sse.Relay``), progress as comments; account at the end."""
    status = 200
    events_out = sse.Relay(wants_usage)
    acct.tally = events_out.tally
    try:
        event: Any = first
        while True:
            if isinstance(event, bytes):
                out = events_out.feed(event)
                if out:
                    yield out
                if acct.fair_share_due():
                    await acct.streamed_so_far()
            elif isinstance(event, Progress):
                metrics.observe_progress(acct.model, event.stage, event.elapsed)
                yield sse.progress_comment(event.stage, event.message, event.elapsed, acct.user.is_staff)
            elif isinstance(event, Head) and event.status != 200:
                status = event.status
                body = b"".join([c async for c in events if isinstance(c, bytes)])
                yield sse.error_ending(sse.error_object(body, status))
                return
            elif isinstance(event, Head):
                acct.accepted = True
                acct.served_by(event)
                registry.note_ready(platform_name, acct.model)
            try:
                event = await events.__anext__()
            except StopAsyncIteration:
                rest = events_out.tail()
                if rest:
                    yield rest
                return
    except UpstreamError as exc:
        status = exc.status
        yield sse.error_ending(ApiError.from_upstream(exc).body())
    except BaseException:
        # The client went away: before the end of the answer (499), or after [DONE] had been sent,
        # which a client may read and hang up without waiting for the connection to close.
        status = 200 if events_out.done else 499
        raise
    finally:
        await events.aclose()  # type: ignore[attr-defined]  # cancels upstream if unfinished
        await acct.finish(status)


@csrf_exempt
async def chat_completions(request: HttpRequest) -> HttpResponseBase:
    return await proxy(request, "chat")


@csrf_exempt
async def completions(request: HttpRequest) -> HttpResponseBase:
    return await proxy(request, "completions")


@csrf_exempt
async def embeddings(request: HttpRequest) -> HttpResponseBase:
    return await proxy(request, "embeddings")


async def models(request: HttpRequest) -> HttpResponse:
    try:
        caller = await caller_of(request)
        data = [e.as_openai() for e in await registry.visible_models(caller)]
    except ApiError as exc:
        return exc.response()
    return with_budget(JsonResponse({"object": "list", "data": data}), await budgets.headers_for(caller))


async def model_detail(request: HttpRequest, model: str) -> HttpResponse:
    try:
        caller = await caller_of(request)
    except ApiError as exc:
        return exc.response()
    try:
        response = JsonResponse((await registry.resolve(model, caller)).as_openai())
    except ApiError as exc:
        response = exc.response()
    return with_budget(response, await budgets.headers_for(caller))


def with_budget(response: HttpResponse, headers: dict[str, str]) -> HttpResponse:
    for name, value in headers.items():
        response[name] = value
    return response


async def not_found(request: HttpRequest, rest: str = "") -> HttpResponse:
    return ApiError(404, f"Unknown endpoint /v1/{rest}.", code="unknown_url").response()
