from __future__ import annotations

from django.urls import path, re_path

from gateway import views

urlpatterns = [
    path("models", views.models),
    path("models/<path:model>", views.model_detail),
    path("chat/completions", views.chat_completions),
    path("completions", views.completions),
    path("embeddings", views.embeddings),
    re_path(r"^(?P<rest>.*)$", views.not_found),
]
