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

from gateway.models import ApiKey


async def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness for the reverse proxy and the run script: the web app answers."""
    return JsonResponse({"status": "ok"})


@login_required
def index(request: HttpRequest) -> HttpResponse:
    return render(request, "chat.html", {"chat_defaults": settings.CHAT_DEFAULTS})


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
    context: dict[str, Any] = {"keys": ApiKey.objects.filter(user=user),
                               "api_base": request.build_absolute_uri("/v1")}
    response = render(request, "keys.html", context)
    response["Cache-Control"] = "no-store"
    return response


@staff_member_required
def platforms(request: HttpRequest) -> HttpResponse:
    """Staff: the platforms' links and every model's status, live over /ws/status/ (static/chatai/platforms.js)."""
    return render(request, "platforms.html")
