from __future__ import annotations

from django.urls import path

from api import views

urlpatterns = [
    path("me", views.MeApi.as_view(), name="api-me"),
    path("me/project", views.MyProjectApi.as_view(), name="api-me-project"),
    path("keys", views.KeyListApi.as_view(), name="api-keys"),
    path("keys/<str:prefix>", views.KeyDetailApi.as_view(), name="api-key"),
    path("usage", views.UsageApi.as_view(), name="api-usage"),
    path("admin/usage", views.AdminUsageApi.as_view(), name="api-admin-usage"),
    path("admin/chargeback", views.AdminChargebackApi.as_view(), name="api-admin-chargeback"),
    path("admin/platforms", views.AdminPlatformsApi.as_view(), name="api-admin-platforms"),
    path("schema", views.SchemaApi.as_view(), name="api-schema"),
    path("docs", views.docs, name="api-docs"),
]
