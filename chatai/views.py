"""Pages: the chat, API keys self-service, privacy. Server-rendered; the chat is progressive JS."""

from __future__ import annotations

import datetime as dt
from typing import Any, Dict, List

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import SESSION_KEY
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_http_methods

from gateway.keys import api_key_create, api_key_revoke
from gateway.models import ApiKey

MAX_KEYS_PER_USER = 50


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


def key_form_errors(name: str, days: str, models: List[str]) -> Dict[str, str]:
    errors: Dict[str, str] = {}
    if not name or len(name) > 100:
        errors["name"] = "Give the key a name of 1 to 100 characters."
    if days and (not days.isdigit() or not 1 <= int(days) <= 3650):
        errors["expires_days"] = "Expiry: a number of days from 1 to 3650, or empty for none."
    if any(len(m) > 200 for m in models):
        errors["models"] = "A model name is at most 200 characters."
    return errors


@login_required
@require_http_methods(["GET", "POST"])
def keys(request: HttpRequest) -> HttpResponse:
    """List, create (the secret shown once) and revoke the user's own API keys."""
    context: Dict[str, Any] = {"errors": {}, "form": {}}
    if request.method == "POST" and request.POST.get("action") == "revoke":
        key = ApiKey.objects.filter(user=request.user, prefix=request.POST.get("prefix", "")).first()
        if key is not None:
            api_key_revoke(key)
            messages.success(request, f"The key “{key.name}” (cai-{key.prefix}…) is revoked.")
        return redirect("keys")
    if request.method == "POST":
        name = request.POST.get("name", "").strip()
        days = request.POST.get("expires_days", "").strip()
        models = [m.strip() for m in request.POST.get("models", "").replace(",", "\n").splitlines() if m.strip()]
        errors = key_form_errors(name, days, models)
        if ApiKey.objects.filter(user=request.user, revoked_at=None).count() >= MAX_KEYS_PER_USER:
            errors["name"] = f"You have {MAX_KEYS_PER_USER} active keys: revoke one first."
        if errors:
            context.update(errors=errors, form={"name": name, "expires_days": days, "models": "\n".join(models)})
        else:
            expires = timezone.now() + dt.timedelta(days=int(days)) if days else None
            key, secret = api_key_create(user=request.user, name=name, expires_at=expires, allowed_models=models)
            context.update(new_key=key, secret=secret)
    context["keys"] = ApiKey.objects.filter(user=request.user)
    context["api_base"] = request.build_absolute_uri("/v1")
    response = render(request, "keys.html", context, status=400 if context["errors"] else 200)
    response["Cache-Control"] = "no-store"  # the page may hold a secret shown once
    return response
