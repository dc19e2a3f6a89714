"""ASGI entry point for daphne: ``daphne chatai.asgi:application``.

HTTP and WebSockets are told apart by channels' ``ProtocolTypeRouter``; WebSockets carry the live
model status (gateway/live.py). HTTP keeps the routing below.

/v1, the OpenAI-compatible API, is served by ``ApiApp``: a lean ASGI front for the gateway's
async views, without Django's per-request machinery. On ASGI, Django's handler starts and
joins a thread for every request (request signals, response close) and every sync-style
middleware costs two more thread hops; measured, that was most of the gateway's added
latency. The API authenticates itself (API key, or the session plus a CSRF check: see
gateway.caller), manages its database connections in its worker threads, keeps request
bodies in memory only (never spooled to a temporary file) and sets its own headers.
Everything else (pages, admin, login, /metrics) goes through Django's full stack.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

from channels.routing import ProtocolTypeRouter
from django.conf import settings
from django.core.asgi import get_asgi_application
from django.core.exceptions import DisallowedHost
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpResponse, HttpResponseBase

from chatai.contenttype import speed_up_twisted_content_type
from chatai.graceful import draining
from chatai.requestbody import keep_request_bodies_in_memory
from gateway.errors import ApiError

log = logging.getLogger("chatai.api")
API_HEADERS = [(b"X-Content-Type-Options", b"nosniff"), (b"Referrer-Policy", b"same-origin")]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Route = Callable[[str], tuple[Callable[..., Any], dict[str, str]]]


class Disconnected(Exception):
    pass


class ApiApp:
    """/v1 only: read the body (bounded, in memory), call the view, send the response. ``route``
    (gateway.urls.route) names the view for a path; Django's resolver serves /v1 through it too."""

    def __init__(self, route: Route) -> None:
        self.route = route

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        try:
            body = await self.read_body(scope, receive)
        except Disconnected:
            return
        except ApiError as exc:
            await self.send_response(exc.response(), send, receive)
            return
        request = ASGIRequest(scope, io.BytesIO(body))  # in memory, never a temporary file
        request._body = body  # what request.body returns, no re-read
        try:
            request.get_host()  # ALLOWED_HOSTS, as Django's CommonMiddleware would check it
            view, kwargs = self.route(request.path_info[len("/v1/"):])
            response = await view(request, **kwargs)
        except DisallowedHost:
            response = ApiError(400, "Invalid Host header.", code="invalid_host").response()
        except Exception as exc:  # noqa: BLE001 - never a traceback, never a body to the client
            # Where it failed, but not the exception's message: that may quote the request.
            where = "; ".join(f"{f.filename}:{f.lineno} {f.name}" for f in traceback.extract_tb(exc.__traceback__))
            log.error("api: unhandled %s on %s at %s", type(exc).__name__, request.path, where)
            response = ApiError(500, "The server had an error while processing your request.",
                                code="internal_error").response()
        await self.send_response(response, send, receive)

    async def read_body(self, scope: dict[str, Any], receive: Receive) -> bytes:
        limit = settings.GATEWAY_MAX_BODY
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        too_large = ApiError(413, f"Request body larger than {limit} bytes.", code="payload_too_large")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    async def send_response(self, response: HttpResponseBase, send: Send, receive: Receive) -> None:
        headers: list[tuple[bytes, bytes]] = [(k.encode("ascii"), v.encode("latin1")) for k, v in response.items()]
        headers += [h for h in API_HEADERS if not response.has_header(h[0].decode())]
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        if isinstance(response, HttpResponse):
            await send({"type": "http.response.body", "body": response.content})
            return
        # Forward each part the moment it exists; a client that goes away cancels the stream
        # (and with it the upstream request) instead of leaving it to run.
        content = response.__aiter__()  # type: ignore[attr-defined]
        pump = asyncio.ensure_future(self.pump(content, send))
        watcher = asyncio.ensure_future(self.wait_disconnect(receive))
        try:
            await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, watcher):
                task.cancel()
            await asyncio.gather(pump, watcher, return_exceptions=True)
            close: Callable[[], Awaitable[None]] | None = getattr(content, "aclose", None)
            if close is not None:
                await close()

    async def pump(self, content: Any, send: Send) -> None:
        async for part in content:
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body"})

    async def wait_disconnect(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass


class StaticApp:
    """/static/: the app's own files (chat page, vendored libraries), so the embedded default
    needs no web server in front. A site's reverse proxy may serve ``collectstatic``'s output
    instead. Files are found with Django's static finders and kept in memory (they are few)."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, bytes]] = {}

    def load(self, rel: str) -> tuple[bytes, bytes] | None:
        import mimetypes
        from pathlib import Path

        from django.contrib.staticfiles import finders

        if rel not in self.files:
            found = finders.find(rel) if rel and ".." not in rel.split("/") and not rel.startswith("/") else None
            if not isinstance(found, str) or not Path(found).is_file():
                return None  # not cached: a file added later is found then
            kind = mimetypes.guess_type(found)[0] or "application/octet-stream"
            if kind.startswith("text/") or kind in ("application/javascript", "text/javascript"):
                kind += "; charset=utf-8"
            self.files[rel] = (Path(found).read_bytes(), kind.encode())
        return self.files[rel]

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        rel = scope["path"][len("/static/"):]
        item = self.load(rel) if scope.get("method") in ("GET", "HEAD") else None
        if item is None:
            body, headers = b"Not found", [(b"content-type", b"text/plain")]
            await send({"type": "http.response.start", "status": 404, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        body, kind = item
        headers = [(b"content-type", kind), (b"content-length", str(len(body)).encode()),
                   (b"cache-control", b"public, max-age=300"), (b"x-content-type-options", b"nosniff")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


def router(site: Any, api: Any, static: Any) -> Callable[..., Awaitable[None]]:
    async def application(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path == "/v1" or path.startswith("/v1/"):
            await api(scope, receive, send)
        elif path.startswith("/static/"):
            await static(scope, receive, send)
        else:
            await site(scope, receive, send)

    return application


def build() -> Callable[..., Awaitable[None]]:
    """The site's ASGI application. Django is set up first: the gateway's views import its models."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatai.settings")
    site = get_asgi_application()
    from gateway.urls import route  # needs the apps loaded

    speed_up_twisted_content_type()
    keep_request_bodies_in_memory(lambda: settings.GATEWAY_MAX_BODY)  # Twisted would spool them to /tmp
    http = draining.wrap(router(site, ApiApp(route), StaticApp()))
    draining.install()
    return ProtocolTypeRouter({"http": http, "websocket": websockets()})


def websockets() -> Any:
    """/ws/status/: live model status (gateway/live.py), for signed-in sessions from our own origin."""
    from channels.auth import AuthMiddlewareStack
    from channels.routing import URLRouter
    from channels.security.websocket import AllowedHostsOriginValidator
    from django.urls import path

    from gateway.live import StatusConsumer

    return AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter([
        path("ws/status/", StatusConsumer.as_asgi()),
    ])))


application = build()
