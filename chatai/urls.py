from __future__ import annotations

from django.conf import settings
from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

from chatai import reports, views
from gateway.metrics import metrics_view

urlpatterns = [
    path("", views.index, name="index"),
    path("keys/", views.keys, name="keys"),
    path("privacy/", views.privacy, name="privacy"),
    path("healthz", views.healthz, name="healthz"),
    path("usage/", reports.usage, name="usage"),
    path("admin/platforms/", views.platforms, name="platforms"),
    path("admin/chargeback/", reports.chargeback, name="chargeback"),
    path("admin/chargeback/csv", reports.chargeback_csv, name="chargeback-csv"),
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("v1/", include("gateway.urls")),
    path("api/", include("api.urls")),
    path("metrics", metrics_view, name="metrics"),
]
if settings.OIDC_ENABLED:
    urlpatterns.append(path("oidc/", include("mozilla_django_oidc.urls")))
    urlpatterns.insert(0, path("signin-failed/", views.signin_failed, name="signin_failed"))
if not settings.OIDC_PASSWORD_LOGIN:
    # Single sign-on only: the password forms send the browser to the provider instead.
    to_sso = RedirectView.as_view(pattern_name="oidc_authentication_init", query_string=True)
    urlpatterns[:0] = [path("accounts/login/", to_sso), path("admin/login/", to_sso)]
