"""Request bodies stay in memory: no prompt ever touches a disk on the web side.

Twisted's HTTP server (daphne's) decides where a body goes before the application sees it:
``twisted.web.http._getContentFile``, called from ``Request.gotLength``, returns a BytesIO below
100,000 bytes and ``tempfile.TemporaryFile()`` otherwise, including every chunked body (no
Content-Length). On Linux that file is unlinked at once (O_TMPFILE), but its pages are a file on
the temporary filesystem all the same. Here every body is kept in memory, at most
``GATEWAY_MAX_BODY`` bytes: beyond that nothing more is kept, the application is never called
and the client gets 413 in OpenAI's error shape (the same answer /v1 gives for a too-large
Content-Length). Memory per request is therefore bounded by GATEWAY_MAX_BODY.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any


class MemoryBody(io.BytesIO):
    """A request body in memory, at most ``limit`` bytes; past that it drops everything and
    remembers that it overflowed."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.overflowed = False

    def write(self, data: Any) -> int:
        size = len(data)
        if self.overflowed:
            return size
        if self.tell() + size > self.limit:
            self.overflowed = True
            self.seek(0)
            self.truncate()  # what was received so far is not kept either
            return size
        return super().write(data)


def _too_large(request: Any, limit: int) -> None:
    """Answer 413 instead of handing the request (without its body) to the application."""
    from gateway.errors import ApiError

    body = json.dumps(ApiError(413, f"Request body larger than {limit} bytes.", code="payload_too_large")
                      .body()).encode()
    request.setResponseCode(413)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", str(len(body)).encode())
    request.write(body)
    request.finish()


def keep_request_bodies_in_memory(limit: Callable[[], int]) -> None:
    """Patch Twisted once: bodies in ``MemoryBody`` of ``limit()`` bytes, 413 past it."""
    try:
        from twisted.web import http
    except ImportError:
        return
    if getattr(http._getContentFile, "chatai_memory", False):
        return

    def content_file(length: Any) -> MemoryBody:
        body = MemoryBody(limit())
        body.overflowed = length is not None and length > body.limit  # declared too large: keep nothing
        return body

    content_file.chatai_memory = True  # type: ignore[attr-defined]
    http._getContentFile = content_file
    received = http.Request.requestReceived

    def request_received(self: Any, command: bytes, path: bytes, version: bytes) -> None:
        content = getattr(self, "content", None)
        if isinstance(content, MemoryBody) and content.overflowed:
            self.process = lambda: _too_large(self, content.limit)
        received(self, command, path, version)

    http.Request.requestReceived = request_received  # type: ignore[method-assign]
