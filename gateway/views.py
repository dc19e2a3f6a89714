"""The OpenAI-compatible /v1 API. Thin async views: authenticate, validate, limit, forward, account.

Streaming replies are server-sent events forwarded event by event as they arrive; a
request held through a cold start gets SSE comment lines (``: queued (12s)``), which OpenAI
clients ignore; staff see the details (``: queued in Slurm (Priority) (12s)``, node names).
Every stream asks upstream (platform or external provider) for usage; the client gets the
usage chunk only if it asked. A stream that ends without one (the client left) is charged an
estimate: see ``Accounting``. Request and response bodies live only in memory: they are
never logged, cached or stored.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator, Dict, List

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt

from gateway import external, metrics, registry
from gateway.caller import Caller, caller_of
from gateway.errors import ApiError
from gateway.limits import Bucket, limiter
from gateway.usage import writer
from hpcbridge import failover
from hpcbridge.client import BridgeError, Head, Progress
from hpcbridge.registry import get_bridge

DONE = b"data: [DONE]\n\n"
ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "embeddings": "/v1/embeddings"}
CHARS_PER_TOKEN = 4  # the usual rule of thumb for English text and BPE tokenizers


def parse_body(request: HttpRequest, kind: str) -> Dict[str, Any]:
    length = request.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > settings.GATEWAY_MAX_BODY:
        raise ApiError(413, f"Request body larger than {settings.GATEWAY_MAX_BODY} bytes.", code="payload_too_large")
    if len(request.body) > settings.GATEWAY_MAX_BODY:
        raise ApiError(413, f"Request body larger than {settings.GATEWAY_MAX_BODY} bytes.", code="payload_too_large")
    try:
        data = json.loads(request.body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    model = data.get("model")
    if not isinstance(model, str) or not model or len(model) > 200:
        raise ApiError(400, "'model' is required and must be a string.", code="invalid_value", param="model")
    if "stream" in data and not isinstance(data["stream"], bool):
        raise ApiError(400, "'stream' must be true or false.", code="invalid_type", param="stream")
    if "stream_options" in data and data["stream_options"] is not None and not isinstance(data["stream_options"], dict):
        raise ApiError(400, "'stream_options' must be an object.", code="invalid_type", param="stream_options")
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


def bridge_error(exc: BridgeError) -> ApiError:
    return ApiError(exc.status, exc.message, code=exc.code, retry_after=exc.retry_after)


def _text_size(value: Any) -> int:
    """Characters of prompt text in a message content, prompt or input (strings, parts, lists); a list
    of token ids counts CHARS_PER_TOKEN characters per token."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, int):
        return CHARS_PER_TOKEN
    if isinstance(value, list):
        return sum(_text_size(v) for v in value)
    if isinstance(value, dict):
        return _text_size(value.get("text") or value.get("content") or "")
    return 0


def prompt_estimate(data: Dict[str, Any], kind: str) -> int:
    """The prompt's tokens as estimated from its text, for a request that ends without usage."""
    if kind == "chat":
        size = sum(_text_size(m.get("content")) for m in data.get("messages") or [] if isinstance(m, dict))
    else:
        size = _text_size(data.get("prompt" if kind == "completions" else "input"))
    return -(-size // CHARS_PER_TOKEN)


class Accounting:
    """What one request leaves behind: a usage row (no content), its tokens counted, its slots released.

    Tokens come from the upstream's usage. A request the model accepted that ends without usage
    (the client left mid-stream, or the provider sent none) is charged an estimate: the prompt's
    characters / 4, plus for the completion the larger of the streamed chunks that carried text
    and the streamed characters / 4. Only counts are kept, never the text.
    """

    def __init__(self, caller: Caller, model: str, kind: str, stream: bool, slots: List[Bucket], lease: str,
                 prompt_estimate: int = 0) -> None:
        self.user, self.key, self.model, self.kind, self.stream = caller.user, caller.key, model, kind, stream
        self.slots, self.lease = slots, lease  # the (subject, limits) this request counts in; its parallel slot
        self.started = time.monotonic()
        self.status = 0
        self.prompt_tokens = self.completion_tokens = 0
        self.prompt_estimate = prompt_estimate
        self.accepted = False  # the model answered 200: it has work to charge
        self.usage_seen = False
        self.streamed_chunks = self.streamed_chars = 0
        self.done = False

    def take_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.usage_seen = True
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = int(usage.get("completion_tokens") or 0)

    def count_streamed(self, obj: Dict[str, Any]) -> None:
        """Count a streamed event's text (chat delta content or reasoning, completion text); keep no text."""
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            size = 0
            for piece in (choice.get("text"), *((delta.get("content"), delta.get("reasoning_content"))
                                                if isinstance(delta, dict) else ())):
                if isinstance(piece, str):
                    size += len(piece)
            if size:
                self.streamed_chunks += 1
                self.streamed_chars += size

    def first_byte(self) -> None:
        metrics.TTFB.labels(self.kind, self.model).observe(time.monotonic() - self.started)

    async def finish(self, status: int) -> None:
        if self.done:
            return
        self.done = True
        self.status = status
        if self.accepted and not self.usage_seen:
            self.prompt_tokens = self.prompt_estimate
            self.completion_tokens = max(self.streamed_chunks, -(-self.streamed_chars // CHARS_PER_TOKEN))
        metrics.REQUESTS.labels(self.kind, self.model, str(status)).inc()
        if self.prompt_tokens:
            metrics.TOKENS.labels(self.model, "prompt").inc(self.prompt_tokens)
        if self.completion_tokens:
            metrics.TOKENS.labels(self.model, "completion").inc(self.completion_tokens)
        await limiter.release_all(self.slots, self.prompt_tokens + self.completion_tokens, self.lease)
        writer.add({
            "user_id": self.user.pk, "api_key_id": self.key.pk if self.key is not None else None,
            "model": self.model, "endpoint": self.kind, "status": status, "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens, "streamed": self.stream,
            "duration_ms": int((time.monotonic() - self.started) * 1000), "created_at": timezone.now()})


async def proxy(request: HttpRequest, kind: str) -> HttpResponse:
    rate_headers: Dict[str, str] = {}
    try:
        if request.method != "POST":
            raise ApiError(405, f"{ENDPOINTS[kind]} takes POST.", code="method_not_allowed")
        caller = await caller_of(request)
        data = parse_body(request, kind)
        entry = await registry.resolve(data["model"], caller)
        # The user's limits (all their keys and the chat page together), the key's own on top,
        # and the model's own, usually stricter, limits per user (an external provider's quota, say).
        buckets = caller.buckets()
        if entry.limits is not None:
            buckets.append((f"{caller.subject}:{entry.limits_id}", entry.limits))
        lease = uuid.uuid4().hex
        decision, slots = await limiter.acquire_all(buckets, lease)
        rate_headers = decision.headers
        if not decision.allowed:
            metrics.RATE_LIMITED.labels(kind).inc()
            where = (f" for {entry.id}" if entry.limits_id and decision.subject.endswith(f":{entry.limits_id}")
                     else " for this key" if decision.subject.startswith("k") else "")
            raise ApiError(429, f"Rate limit reached: {decision.reason}{where}. "
                                f"Retry after {decision.retry_after:.0f}s.",
                           code="rate_limit_exceeded", retry_after=decision.retry_after)
        acct = Accounting(caller, entry.id, kind, bool(data.get("stream")), slots, lease,
                          prompt_estimate(data, kind))
        response = await forward(entry, kind, data, request.body, acct)
    except ApiError as exc:
        if exc.status in (400, 401, 403, 404, 405, 413):
            metrics.REQUESTS.labels(kind, "-", str(exc.status)).inc()  # model label not trusted here
        response = exc.response()
    for name, value in rate_headers.items():
        response[name] = value
    return response


def open_events(entry: registry.ModelEntry, kind: str, data: Dict[str, Any], raw: bytes,
                request_id: str) -> AsyncIterator[Any]:
    """The upstream's events (Head, Progress, bytes): an HPC platform, or an external provider."""
    if data.get("stream") and kind != "embeddings":
        # Ask upstream for usage to count tokens; the client gets it only if it asked.
        data = {**data, "stream_options": {**(data.get("stream_options") or {}), "include_usage": True}}
        raw = b""
    if entry.provider is not None:
        if entry.provider.model != data["model"]:
            data, raw = {**data, "model": entry.provider.model}, b""
        return external.stream(entry.provider, ENDPOINTS[kind], raw or json.dumps(data).encode(), request_id)
    headers = {"content-type": "application/json", "x-request-id": request_id}
    # Over the best platform offering the model; a lost link is survived (hpcbridge/failover.py).
    return failover.stream(get_bridge(), entry.offers, "POST", ENDPOINTS[kind], entry.id, headers,
                           raw or json.dumps(data).encode(), link_wait=settings.GATEWAY_LINK_WAIT)


async def forward(entry: registry.ModelEntry, kind: str, data: Dict[str, Any], raw: bytes,
                  acct: Accounting) -> HttpResponse:
    platform_name = entry.platform
    stream = bool(data.get("stream"))
    # The usage chunk we asked for goes to the client only if it asked too.
    wants_usage = bool((data.get("stream_options") or {}).get("include_usage"))
    request_id = uuid.uuid4().hex
    events = open_events(entry, kind, data, raw, request_id)
    try:
        first = await events.__anext__()
        if isinstance(first, Progress):
            metrics.HELD.labels(acct.model).inc()
        acct.first_byte()
        while isinstance(first, Progress) and not stream:
            metrics.observe_progress(acct.model, first.stage, first.elapsed)
            first = await events.__anext__()  # a plain request simply waits through a cold start
        if isinstance(first, Head) and first.status == 200:
            acct.accepted = True
            registry.note_ready(platform_name, acct.model)
        if isinstance(first, Head) and (first.status != 200 or not stream):
            body = b"".join([chunk async for chunk in events if isinstance(chunk, bytes)])
            if first.status == 200:
                try:
                    acct.take_usage(json.loads(body).get("usage"))
                except (ValueError, AttributeError):
                    pass
            await acct.finish(first.status)
            resp = HttpResponse(body, status=first.status,
                                content_type=first.headers.get("content-type", "application/json"))
            resp["x-request-id"] = request_id
            if "retry-after" in first.headers:
                resp["Retry-After"] = first.headers["retry-after"]
            return resp
    except BridgeError as exc:
        await acct.finish(exc.status)
        raise bridge_error(exc) from None
    except StopAsyncIteration:
        await acct.finish(502)
        raise ApiError(502, "The model server closed the response without answering.", code="upstream_error") from None
    except BaseException:
        await events.aclose()  # type: ignore[attr-defined]
        await acct.finish(499)
        raise
    resp = StreamingHttpResponse(sse(first, events, acct, wants_usage, platform_name),
                                 content_type="text/event-stream")
    resp["Cache-Control"] = "no-cache"
    resp["X-Accel-Buffering"] = "no"  # tell a reverse proxy not to buffer
    resp["x-request-id"] = request_id
    return resp


async def sse(first: Any, events: AsyncIterator[Any], acct: Accounting, wants_usage: bool,
              platform_name: str) -> AsyncIterator[bytes]:
    """Forward SSE events as they complete; progress as comments; drop the usage chunk if not asked for."""
    status = 200
    pending = b""
    try:
        event: Any = first
        while True:
            if isinstance(event, Progress):
                metrics.observe_progress(acct.model, event.stage, event.elapsed)
                yield progress_comment(event, acct.user)
            elif isinstance(event, Head) and event.status != 200:
                status = event.status
                body = b"".join([c async for c in events if isinstance(c, bytes)])
                try:
                    error = json.loads(body)
                except ValueError:
                    error = {"error": {"message": body.decode(errors="replace")[:500], "type": "api_error"}}
                yield b"data: " + json.dumps(error).encode() + b"\n\n" + DONE
                return
            elif isinstance(event, Head):
                acct.accepted = True
                registry.note_ready(platform_name, acct.model)
            elif isinstance(event, bytes):
                pending += event
                out = []
                while b"\n\n" in pending:
                    block, pending = pending.split(b"\n\n", 1)
                    if block.startswith(b"data: {"):
                        try:
                            obj = json.loads(block[6:])
                        except ValueError:
                            obj = {}
                        if isinstance(obj, dict):
                            acct.count_streamed(obj)
                            if obj.get("usage"):
                                acct.take_usage(obj["usage"])
                                if not obj.get("choices") and not wants_usage:
                                    continue
                    out.append(block + b"\n\n")
                if out:
                    yield b"".join(out)
            try:
                event = await events.__anext__()
            except StopAsyncIteration:
                if pending:
                    yield pending
                return
    except BridgeError as exc:
        status = exc.status
        yield b"data: " + json.dumps(bridge_error(exc).body()).encode() + b"\n\n" + DONE
    except BaseException:
        status = 499  # the client went away
        raise
    finally:
        await events.aclose()  # type: ignore[attr-defined]  # cancels upstream if unfinished
        await acct.finish(status)


def progress_comment(event: Progress, user: Any) -> bytes:
    """A cold start's progress as an SSE comment. The message names nodes and Slurm's reasons: staff
    see it; everybody else sees the stage word only (queued, starting, ...)."""
    text = (event.message or event.stage) if user.is_staff else (event.stage or "waiting")
    return f": {' '.join(text.split())} ({event.elapsed:.0f}s)\n\n".encode()


@csrf_exempt
async def chat_completions(request: HttpRequest) -> HttpResponse:
    return await proxy(request, "chat")


@csrf_exempt
async def completions(request: HttpRequest) -> HttpResponse:
    return await proxy(request, "completions")


@csrf_exempt
async def embeddings(request: HttpRequest) -> HttpResponse:
    return await proxy(request, "embeddings")


async def models(request: HttpRequest) -> HttpResponse:
    try:
        data = [e.as_openai() for e in await registry.visible_models(await caller_of(request))]
    except ApiError as exc:
        return exc.response()
    return JsonResponse({"object": "list", "data": data})


async def model_detail(request: HttpRequest, model: str) -> HttpResponse:
    try:
        entry = await registry.resolve(model, await caller_of(request))
    except ApiError as exc:
        return exc.response()
    return JsonResponse(entry.as_openai())


async def not_found(request: HttpRequest, rest: str = "") -> HttpResponse:
    return ApiError(404, f"Unknown endpoint /v1/{rest}.", code="unknown_url").response()
