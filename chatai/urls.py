from __future__ import annotations

from django.conf import settings
from django.contrib import admin
from django.urls import include, path

from chatai import views
from gateway.metrics import metrics_view

urlpatterns = [
    path("", views.index, name="index"),
    path("keys/", views.keys, name="keys"),
    path("privacy/", views.privacy, name="privacy"),
    path("healthz", views.healthz, name="healthz"),
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("v1/", include("gateway.urls")),
    path("metrics", metrics_view, name="metrics"),
]
if settings.OIDC_ENABLED:
    urlpatterns.append(path("oidc/", include("mozilla_django_oidc.urls")))
