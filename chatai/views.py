"""Pages: the chat, API keys self-service, privacy. Server-rendered; the chat is progressive JS."""

from __future__ import annotations

from typing import Any, cast

from django.conf import settings
from django.contrib.admin.views.decorators import staff_member_required
from django.contrib.auth import SESSION_KEY
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_http_methods

from gateway.limits import group_ids_of
from gateway.models import ApiKey
from gateway.projects import SESSION_KEY as PROJECT_SESSION_KEY
from gateway.projects import ProjectRef, project_for_session, projects_of


async def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness for the reverse proxy and the run script: the web app answers."""
    return JsonResponse({"status": "ok"})


def _projects(request: HttpRequest) -> tuple[tuple[ProjectRef, ...], ProjectRef | None]:
    """The signed-in user's projects and the one their chat is charged to now (the session's choice)."""
    groups = group_ids_of(request.user)
    return (projects_of(request.user, groups),
            project_for_session(request.user, groups, request.session.get(PROJECT_SESSION_KEY)))


@login_required
def index(request: HttpRequest) -> HttpResponse:
    mine, current = _projects(request)
    return render(request, "chat.html", {"chat_defaults": settings.CHAT_DEFAULTS, "projects": mine,
                                         "project": current})


def privacy(request: HttpRequest) -> HttpResponse:
    return render(request, "privacy.html")


def signin_failed(request: HttpRequest) -> HttpResponse:
    """Where single sign-on ends when it did not let the user in (disabled here, provider session over).
    A session that still names a user who cannot sign in (disabled) is ended for good here, so
    re-enabling the account later does not bring it back."""
    if request.session.get(SESSION_KEY) and not request.user.is_authenticated:
        request.session.flush()
    return render(request, "signin_failed.html")


@login_required
@require_http_methods(["GET"])
def keys(request: HttpRequest) -> HttpResponse:
    """The user's own API keys; the page creates and revokes them through /api/keys (static/chatai/keys.js)."""
    user = cast(User, request.user)  # signed in: login_required
    mine = projects_of(request.user, group_ids_of(request.user))
    context: dict[str, Any] = {"keys": ApiKey.objects.filter(user=user).select_related("project"),
                               "api_base": request.build_absolute_uri("/v1"), "projects": mine,
                               "default_project": mine[0] if mine else None}
    response = render(request, "keys.html", context)
    response["Cache-Control"] = "no-store"
    return response


@staff_member_required
def platforms(request: HttpRequest) -> HttpResponse:
    """Staff: the platforms' links and every model's status, live over /ws/status/ (static/chatai/platforms.js)."""
    return render(request, "platforms.html")
