"""The /v1 routes. ``chatai.asgi.ApiApp`` dispatches with ``route`` (a dict lookup: Django's
resolver, with the whole site's patterns, cost a tenth of a request); ``urlpatterns`` is the same
table for Django's resolver, which serves /v1 only if the site is run without ApiApp."""

from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

from django.urls import path, re_path

from gateway import views

ROUTES: Dict[str, Callable[..., Any]] = {
    "models": views.models,
    "chat/completions": views.chat_completions,
    "completions": views.completions,
    "embeddings": views.embeddings,
}


def route(rest: str) -> Tuple[Callable[..., Any], Dict[str, str]]:
    """The view and its arguments for /v1/<rest>."""
    view = ROUTES.get(rest)
    if view is not None:
        return view, {}
    if rest.startswith("models/") and len(rest) > len("models/"):
        return views.model_detail, {"model": rest[len("models/"):]}
    return views.not_found, {"rest": rest}


urlpatterns = [
    *(path(p, v) for p, v in ROUTES.items()),
    path("models/<path:model>", views.model_detail),
    re_path(r"^(?P<rest>.*)$", views.not_found),
]
