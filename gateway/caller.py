"""Who is calling: an API key, or a logged-in session (with a CSRF check), resolved in one thread hop.

Everything the database knows about the caller (key and user, groups, rate limits) is read
by one sync function in a worker thread, instead of one thread hop per query: on ASGI each
hop costs more than the query itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any, FrozenSet, Optional

from django.conf import settings
from django.contrib.auth import get_user
from django.db import close_old_connections
from django.http import HttpRequest, HttpResponse
from django.middleware.csrf import CsrfViewMiddleware

from gateway.errors import ApiError
from gateway.keys import api_key_authenticate, api_key_touch
from gateway.limits import Limits, group_ids_of, limits_for
from gateway.models import ApiKey
from gateway.threads import in_thread

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


@dataclass(frozen=True)
class Caller:
    user: Any
    key: Optional[ApiKey]
    group_ids: FrozenSet[int]
    limits: Limits

    @property
    def subject(self) -> str:
        """Whose counters the limits use: the key's own, or the user's for the chat page."""
        return f"k{self.key.pk}" if self.key is not None else f"u{self.user.pk}"


def _complete(user: Any, key: Optional[ApiKey]) -> Caller:
    groups = group_ids_of(user)
    return Caller(user, key, groups, limits_for(user, key, groups))


def _by_key(token: str) -> Caller:
    close_old_connections()  # this worker thread's connection may have aged or broken
    key = api_key_authenticate(token)
    if key is None:
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
    if not key.is_active():
        raise ApiError(401, "This API key has expired or was revoked.", code="invalid_api_key")
    if not key.user.is_active:
        raise ApiError(401, "The account of this API key is disabled.", code="invalid_api_key")
    api_key_touch(key)
    return _complete(key.user, key)


def _by_session(request: HttpRequest) -> Optional[Caller]:
    close_old_connections()
    request.session = import_module(settings.SESSION_ENGINE).SessionStore(  # type: ignore[attr-defined]
        request.COOKIES[settings.SESSION_COOKIE_NAME])
    user = get_user(request)  # type: ignore[arg-type]
    if not user.is_authenticated:
        return None
    return _complete(user, None)


def csrf_passes(request: HttpRequest) -> bool:
    """Whether the chat page's unsafe request proves it comes from our page (Django's CSRF check)."""
    check = CsrfViewMiddleware(lambda r: HttpResponse())  # type: ignore[arg-type]
    return check.process_view(request, None, (), {}) is None


async def caller_of(request: HttpRequest) -> Caller:
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "The Authorization header must be 'Bearer <API key>'.", code="invalid_api_key")
        return await in_thread(_by_key, token.strip())
    if request.COOKIES.get(settings.SESSION_COOKIE_NAME):
        caller = await in_thread(_by_session, request)
        if caller is not None:
            if request.method not in SAFE_METHODS and not csrf_passes(request):
                # The chat page uses the same endpoints with its session: it must prove it is our page.
                raise ApiError(403, "CSRF verification failed.", code="csrf_failed")
            return caller
    raise ApiError(401, "You didn't provide an API key. Use 'Authorization: Bearer <API key>'.",
                   code="missing_api_key")
