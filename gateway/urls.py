"""The /v1 routes, written once. ``route`` maps a path below /v1/ to its view: the lean ASGI front
(``chatai.asgi.ApiApp``, which serves /v1 under daphne and ``runserver`` alike) calls it directly, a
dict lookup (Django's resolver, with the whole site's patterns, cost a tenth of a request); Django's
resolver reaches the same views through ``dispatch``, its one pattern (a request made with Django's
test client, say)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.urls import re_path
from django.views.decorators.csrf import csrf_exempt

from gateway import views

ROUTES: dict[str, Callable[..., Any]] = {
    "models": views.models,
    "chat/completions": views.chat_completions,
    "completions": views.completions,
    "embeddings": views.embeddings,
}


def route(rest: str) -> tuple[Callable[..., Any], dict[str, str]]:
    """The view and its arguments for /v1/<rest>."""
    view = ROUTES.get(rest)
    if view is not None:
        return view, {}
    if rest.startswith("models/") and len(rest) > len("models/"):
        return views.model_detail, {"model": rest[len("models/"):]}
    return views.not_found, {"rest": rest}


@csrf_exempt  # the views check CSRF themselves for a session (gateway.caller), as under ApiApp
async def dispatch(request: HttpRequest, rest: str) -> HttpResponse:
    view, kwargs = route(rest)
    return await view(request, **kwargs)


urlpatterns = [re_path(r"^(?P<rest>.*)$", dispatch)]
