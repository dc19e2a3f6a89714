from __future__ import annotations

import csv
from typing import Any

from django.contrib import admin
from django.http import HttpRequest, HttpResponse

from gateway.models import ApiKey, ModelOverlay, NodeTimeCollection, RateLimitPolicy, UsageRecord


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("name", "user", "prefix", "created_at", "expires_at", "revoked_at", "last_used_at")
    list_filter = ("revoked_at", "expires_at")
    search_fields = ("name", "prefix", "user__username")
    readonly_fields = ("prefix", "secret_hash", "last_used_at", "created_at")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # a key's secret is shown once: create keys on the API keys page or with `manage.py apikey`


@admin.register(RateLimitPolicy)
class RateLimitPolicyAdmin(admin.ModelAdmin):
    list_display = ("name", "group", "user", "api_key", "requests_per_minute", "tokens_per_minute", "parallel_streams")


@admin.register(ModelOverlay)
class ModelOverlayAdmin(admin.ModelAdmin):
    list_display = ("model_id", "display_name", "enabled", "external_base_url")
    list_filter = ("enabled",)
    filter_horizontal = ("groups",)
    fieldsets = (
        (None, {"fields": ("model_id", "display_name", "description", "enabled", "groups")}),
        ("External OpenAI-compatible provider (leave empty for a model of the HPC platforms)",
         {"fields": ("external_base_url", "external_model", "external_key_env")}),
        ("Limits per user (or key) for this model, on top of their own", {
            "fields": ("requests_per_minute", "tokens_per_day", "parallel_streams")}),
    )


@admin.action(description="Export selected rows as CSV")
def export_csv(modeladmin: Any, request: HttpRequest, queryset: Any) -> HttpResponse:
    response = HttpResponse(content_type="text/csv")
    response["Content-Disposition"] = 'attachment; filename="usage.csv"'
    writer = csv.writer(response)
    fields = ["created_at", "user", "api_key", "model", "endpoint", "status", "prompt_tokens", "completion_tokens",
              "duration_ms", "streamed"]
    writer.writerow(fields)
    for row in queryset.select_related("user", "api_key"):
        writer.writerow([getattr(row, f) for f in fields])
    return response


@admin.register(UsageRecord)
class UsageRecordAdmin(admin.ModelAdmin):
    list_display = ("created_at", "user", "api_key", "model", "endpoint", "status", "prompt_tokens",
                    "completion_tokens", "duration_ms")
    list_filter = ("model", "status", "endpoint", "created_at")
    date_hierarchy = "created_at"
    actions = [export_csv]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(NodeTimeCollection)
class NodeTimeCollectionAdmin(admin.ModelAdmin):
    """Where ``manage.py collect_nodetime`` left off per platform, and whether its last run was whole."""

    list_display = ("platform", "collected_at", "until", "records", "last_error")
    readonly_fields = ("platform", "until", "collected_at", "records", "last_error")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False
