"""Errors in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import json
from typing import Any

from django.http import JsonResponse

from common.upstream import UpstreamError

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
         429: "rate_limit_error", 500: "api_error", 502: "api_error", 503: "api_error", 504: "api_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 retry_after: float | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.retry_after = retry_after
        self.kind = kind  # the error's type, where it is not the status's usual one (insufficient_quota)

    @classmethod
    def from_upstream(cls, exc: UpstreamError) -> ApiError:
        """An upstream's failure (an HPC platform's, an external provider's) as the client sees it."""
        return cls(exc.status, exc.message, code=exc.code, retry_after=exc.retry_after)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind or TYPES.get(self.status, "api_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JsonResponse:
        resp = JsonResponse(self.body(), status=self.status)
        if self.retry_after is not None:
            resp["Retry-After"] = str(max(1, int(round(self.retry_after))))
        return resp


def upstream_error(status: int, body: bytes) -> dict[str, Any]:
    """An upstream's error reply in OpenAI's shape, whatever shape it came in. An error already in that
    shape ({"error": {"message": ...}}) passes as it is (with a type if it had none); vLLM's older
    top-level one, FastAPI's ``{"detail": ...}``, ``{"error": "text"}`` or plain text are rewritten,
    so clients (and the OpenAPI schema) can rely on {"error": {"message", "type", ...}} on every error."""
    try:
        data: Any = json.loads(body)
    except ValueError:
        data = None
    inner = data.get("error") if isinstance(data, dict) else None
    if isinstance(inner, dict) and isinstance(inner.get("message"), str) and inner["message"]:
        if not isinstance(inner.get("type"), str):
            inner = {**inner, "type": TYPES.get(status, "api_error")}
        return {"error": inner}
    source: dict[str, Any] = inner if isinstance(inner, dict) else data if isinstance(data, dict) else {}
    message = source.get("message")
    if not isinstance(message, str) or not message:
        detail = inner if isinstance(inner, str) else source.get("detail")
        message = detail if isinstance(detail, str) and detail else body.decode(errors="replace").strip()[:500]
    kind, code, param = source.get("type"), source.get("code"), source.get("param")
    return {"error": {"message": message or f"The model server answered {status}.",
                      "type": kind if isinstance(kind, str) and kind else TYPES.get(status, "api_error"),
                      "param": param if isinstance(param, str) else None,
                      "code": code if isinstance(code, (str, int)) else None}}
