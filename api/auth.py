"""Who calls /api: the same API keys as /v1 (gateway.caller's lookup, failure counting and checks),
or the signed-in session with DRF's CSRF check. ``request.auth`` is the gateway's Caller either way."""

from __future__ import annotations

from typing import Any

from rest_framework.authentication import BaseAuthentication, SessionAuthentication
from rest_framework.exceptions import AuthenticationFailed, Throttled
from rest_framework.request import Request

from chatai.netaddr import client_address
from chatai.oidc import session_is_current
from gateway.caller import Caller, caller_by_key, caller_by_user
from gateway.errors import ApiError


class ApiKeyAuthentication(BaseAuthentication):
    """``Authorization: Bearer cai-...``: the key's user, with the key's own restrictions."""

    def authenticate(self, request: Request) -> tuple[Any, Caller] | None:
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationFailed("The Authorization header must be 'Bearer <API key>'.", code="invalid_api_key")
        try:
            caller = caller_by_key(token.strip(), client_address(request.META) or "unknown")
        except ApiError as exc:
            if exc.status == 429:
                raise Throttled(wait=exc.retry_after, detail=exc.message, code="rate_limit_exceeded") from None
            raise AuthenticationFailed(exc.message, code=exc.code) from None
        return caller.user, caller

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="api"'  # makes DRF answer 401 (not 403) to a request without credentials


class ChatSessionAuthentication(SessionAuthentication):
    """The chat and keys pages' session, CSRF-checked for unsafe methods (DRF's own check). A single
    sign-on session whose check with the provider is due counts as signed out, as on /v1."""

    def authenticate(self, request: Request) -> tuple[Any, Caller] | None:
        result = super().authenticate(request)
        if result is None or not session_is_current(request._request.session):
            return None
        return result[0], caller_by_user(result[0], request._request.session)
