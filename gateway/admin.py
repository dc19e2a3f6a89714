from __future__ import annotations

import csv
from typing import Any

from django.contrib import admin
from django.contrib.auth import get_user_model
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse

from common.csvcells import safe_row
from gateway import projects
from gateway.models import ApiKey, Budget, ModelOverlay, NodeTimeCollection, Project, RateLimitPolicy, UsageRecord


@admin.register(Project)
class ProjectAdmin(admin.ModelAdmin):
    """Projects and who belongs to them: the members of its groups (from the OIDC groups claim) and
    those added by hand. Projects named in the PROJECTS setting get their groups back at every migrate."""

    list_display = ("name", "slurm_account", "shares", "member_count", "group_names")
    search_fields = ("name", "slurm_account", "description")
    filter_horizontal = ("groups", "members")
    fields = ("name", "slurm_account", "shares", "description", "groups", "members")

    def get_queryset(self, request: HttpRequest) -> QuerySet[Project]:
        return super().get_queryset(request).prefetch_related("groups")

    @admin.display(description="members")
    def member_count(self, project: Project) -> int:
        """Everyone who is a member now: in one of its groups, or added by hand (counted once)."""
        return get_user_model().objects.filter(
            Q(projects=project) | Q(groups__in=project.groups.all())).distinct().count()

    @admin.display(description="groups")
    def group_names(self, project: Project) -> str:
        return ", ".join(g.name for g in project.groups.all())

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        super().save_related(request, form, formsets, change)
        projects.forget()  # this worker applies it at once; the others within GATEWAY_POLICY_TTL


@admin.register(Budget)
class BudgetAdmin(admin.ModelAdmin):
    list_display = ("name", "project", "group", "user", "tokens", "period")
    list_filter = ("period", "project")
    search_fields = ("name", "project__name", "group__name", "user__username")


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("name", "user", "project", "prefix", "created_at", "expires_at", "revoked_at", "last_used_at")
    list_filter = ("project", "revoked_at", "expires_at")
    list_select_related = ("user", "project")
    search_fields = ("name", "prefix", "user__username", "project__name")
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
    fields = ["created_at", "user", "api_key", "project", "model", "endpoint", "status", "prompt_tokens",
              "completion_tokens", "duration_ms", "streamed"]
    writer.writerow(fields)
    for row in queryset.select_related("user", "api_key", "project"):
        writer.writerow(safe_row(getattr(row, f) for f in fields))  # a key's name may start with =
    return response


@admin.register(UsageRecord)
class UsageRecordAdmin(admin.ModelAdmin):
    list_display = ("created_at", "user", "api_key", "project", "model", "endpoint", "status", "prompt_tokens",
                    "completion_tokens", "duration_ms")
    list_filter = ("project", "model", "status", "endpoint", "created_at")
    list_select_related = ("user", "api_key", "project")
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
