"""Who is calling: an API key, or a logged-in session (with a CSRF check), resolved in one thread hop.

Everything the database knows about the caller (key and user, groups, rate limits) is read
by one sync function in a worker thread, instead of one thread hop per query: on ASGI each
hop costs more than the query itself. Failed authentications are counted per client address:
beyond GATEWAY_AUTH_FAILURES_PER_MINUTE, the address gets 429 until the minute is over,
before any database work.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user
from django.db import close_old_connections
from django.http import HttpRequest, HttpResponse
from django.middleware.csrf import CsrfViewMiddleware

from chatai.netaddr import client_address
from chatai.oidc import session_is_current
from gateway.errors import ApiError
from gateway.keys import api_key_authenticate, api_key_touch
from gateway.limits import Limits, group_ids_of, key_limits_for, limiter, user_limits_for
from gateway.models import ApiKey
from gateway.projects import SESSION_KEY, ProjectRef, project_for_key, project_for_session, projects_of
from gateway.threads import in_thread

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


@dataclass(frozen=True)
class Caller:
    user: Any
    key: ApiKey | None
    group_ids: frozenset[int]
    limits: Limits  # the user's, for all their keys and the chat page together
    key_limits: Limits | None = None  # the key's own policy, on top of the user's
    project: ProjectRef | None = None  # charged with the request's usage: the key's, or the session's choice

    @property
    def subject(self) -> str:
        """The user's counters: one set per user, whichever key or session calls."""
        return f"u{self.user.pk}"

    def buckets(self) -> list[tuple[str, Limits]]:
        """Every set of counters a request of this caller counts in: the user's, and the key's own."""
        out = [(self.subject, self.limits)]
        if self.key is not None and self.key_limits is not None:
            out.append((f"k{self.key.pk}", self.key_limits))
        return out


def _complete(user: Any, key: ApiKey | None, chosen_project: Any = None) -> Caller:
    groups = group_ids_of(user)
    if key is not None:
        project = project_for_key(key)
        if project is not None and all(p.id != project.id for p in projects_of(user, groups)):
            # The user left the key's project (group claim or admin): its budget, fair share and
            # charge-back are no longer theirs to spend. The key stops; a new one names a project of theirs.
            raise ApiError(403, f"This API key belongs to project {project.name!r}, of which you are no longer "
                                "a member. Create a new key.", code="key_project_left")
        if project is None:
            # A key made without a project (before its user had one, or by an operator without
            # --project) is charged as the chat is, to the user's default project, as Slurm charges a
            # job without --account to the user's default account: a member cannot step around the
            # project's budget, share and charge-back with an old key.
            project = project_for_session(user, groups, None)
    else:
        project = project_for_session(user, groups, chosen_project)
    return Caller(user, key, groups, user_limits_for(user, groups), key_limits_for(key), project)


def _refused(wait: float) -> ApiError:
    return ApiError(429, f"Too many failed authentications from your address. Retry after {wait:.0f}s.",
                    code="rate_limit_exceeded", retry_after=wait)


def _failed(address: str, error: ApiError) -> ApiError:
    """Count a failed authentication: its own error, or 429 once the address is over the limit."""
    wait = limiter.auth_failed_sync(address, settings.GATEWAY_AUTH_FAILURES_PER_MINUTE)
    return _refused(wait) if wait else error


def _by_key(token: str, address: str) -> Caller:
    close_old_connections()  # this worker thread's connection may have aged or broken
    wait = limiter.auth_blocked_sync(address, settings.GATEWAY_AUTH_FAILURES_PER_MINUTE)
    if wait:
        raise _refused(wait)
    key = api_key_authenticate(token)
    if key is None:
        raise _failed(address, ApiError(401, "Incorrect API key provided.", code="invalid_api_key"))
    if not key.is_active():
        raise _failed(address, ApiError(401, "This API key has expired or was revoked.", code="invalid_api_key"))
    if not key.user.is_active:
        raise _failed(address, ApiError(401, "The account of this API key is disabled.", code="invalid_api_key"))
    api_key_touch(key)
    return _complete(key.user, key)


def caller_by_key(token: str, address: str) -> Caller:
    """The caller of an API key (``cai-...``), with the same checks and failure counting as /v1. Sync;
    raises ApiError (401, or 429 for an address with too many failures). Used by /api's DRF views."""
    return _by_key(token, address)


def caller_by_user(user: Any, session: Any = None) -> Caller:
    """The caller for a signed-in user (a session already checked by Django). Sync."""
    return _complete(user, None, session.get(SESSION_KEY) if session is not None else None)


def _by_session(request: HttpRequest, address: str) -> Caller | None:
    close_old_connections()
    wait = limiter.auth_blocked_sync(address, settings.GATEWAY_AUTH_FAILURES_PER_MINUTE)
    if wait:
        raise _refused(wait)
    request.session = import_module(settings.SESSION_ENGINE).SessionStore(
        request.COOKIES[settings.SESSION_COOKIE_NAME])
    user = get_user(request)
    if not user.is_authenticated or not session_is_current(request.session):
        return None  # signed out, disabled, or single sign-on's check with the provider is due
    return _complete(user, None, request.session.get(SESSION_KEY))


def csrf_passes(request: HttpRequest) -> bool:
    """Whether the chat page's unsafe request proves it comes from our page (Django's CSRF check)."""
    check = CsrfViewMiddleware(lambda r: HttpResponse())
    return check.process_view(request, lambda r: HttpResponse(), (), {}) is None  # the view is never called


async def caller_of(request: HttpRequest) -> Caller:
    address = client_address(request.META) or "unknown"  # behind TRUSTED_PROXIES: the forwarded client
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise await _failed_async(address, ApiError(401, "The Authorization header must be 'Bearer <API key>'.",
                                                        code="invalid_api_key"))
        return await in_thread(_by_key, token.strip(), address)
    if request.COOKIES.get(settings.SESSION_COOKIE_NAME):
        caller = await in_thread(_by_session, request, address)
        if caller is not None:
            if request.method not in SAFE_METHODS and not csrf_passes(request):
                # The chat page uses the same endpoints with its session: it must prove it is our page.
                raise ApiError(403, "CSRF verification failed.", code="csrf_failed")
            return caller
    raise await _failed_async(address, ApiError(
        401, "You didn't provide an API key. Use 'Authorization: Bearer <API key>'.", code="missing_api_key"))


async def _failed_async(address: str, error: ApiError) -> ApiError:
    if limiter.inline:
        return _failed(address, error)
    return await in_thread(_failed, address, error)
