"""Errors in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from typing import Optional

from django.http import JsonResponse

from common.upstream import UpstreamError

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
         429: "rate_limit_error", 500: "api_error", 502: "api_error", 503: "api_error", 504: "api_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: Optional[str] = None, param: Optional[str] = None,
                 retry_after: Optional[float] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.retry_after = retry_after

    @classmethod
    def from_upstream(cls, exc: UpstreamError) -> ApiError:
        """An upstream's failure (an HPC platform's, an external provider's) as the client sees it."""
        return cls(exc.status, exc.message, code=exc.code, retry_after=exc.retry_after)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "api_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JsonResponse:
        resp = JsonResponse(self.body(), status=self.status)
        if self.retry_after is not None:
            resp["Retry-After"] = str(max(1, int(round(self.retry_after))))
        return resp
