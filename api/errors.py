"""Every /api error in the same shape as /v1's (OpenAI's): {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging
import traceback
from typing import Any

from django.http import Http404
from rest_framework import exceptions
from rest_framework.response import Response

from gateway.errors import TYPES

log = logging.getLogger("chatai.api")


class WiderKey(exceptions.PermissionDenied):
    """A request authenticated by a key asked for a key with more rights than that key."""

    default_code = "key_wider_than_caller"

    def __init__(self, detail: str, param: str) -> None:
        super().__init__(detail, self.default_code)
        self.param = param


def _first(detail: Any, field: str | None = None) -> tuple[str | None, str, str]:
    """The first message of a (nested) validation error: (field, message, code)."""
    if isinstance(detail, dict):
        name, value = next(iter(detail.items()))
        inner = name if name != "non_field_errors" else None
        return _first(value, inner if field is None else f"{field}.{inner}" if inner else field)
    if isinstance(detail, list) and detail:
        return _first(detail[0], field)
    return field, str(detail), getattr(detail, "code", None) or "invalid"


def body(status: int, message: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": TYPES.get(status, "api_error" if status >= 500 else
                                                          "invalid_request_error"),
                      "param": param, "code": code}}


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's errors in the /v1 shape; anything unexpected becomes a 500 in that shape, logged without
    the exception's message (it may quote the request)."""
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    if isinstance(exc, exceptions.ValidationError):
        param, message, code = _first(exc.detail)
        response = Response(body(400, message, code, param), status=400)
    elif isinstance(exc, exceptions.APIException):
        detail = exc.detail
        message = str(detail if not isinstance(detail, (list, dict)) else _first(detail)[1])
        code = getattr(detail, "code", None) or exc.default_code
        response = Response(body(exc.status_code, message, code, getattr(exc, "param", None)),
                            status=exc.status_code)
        auth_header, wait = getattr(exc, "auth_header", None), getattr(exc, "wait", None)
        if auth_header:
            response["WWW-Authenticate"] = auth_header
        if wait:
            response["Retry-After"] = str(max(1, int(round(wait))))
    else:
        where = "; ".join(f"{f.filename}:{f.lineno} {f.name}" for f in traceback.extract_tb(exc.__traceback__))
        request = context.get("request")
        log.error("api: unhandled %s on %s at %s", type(exc).__name__, getattr(request, "path", "?"), where)
        response = Response(body(500, "The server had an error while processing your request.", "internal_error"),
                            status=500)
    return response
