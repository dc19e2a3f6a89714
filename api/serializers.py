"""Input and output shapes of /api (the OpenAPI schema in api/openapi.py describes the same)."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from gateway.chargeback import current_month, parse_month
from gateway.models import ApiKey

NAME_ERROR = "Give the key a name of 1 to 100 characters."
DAYS_ERROR = "Expiry: a number of days from 1 to 3650, or empty for none."
MODEL_ERROR = "A model name is at most 200 characters."
PROJECT_ERROR = "A project is named by its name, 1 to 100 characters."


class KeyCreateInput(serializers.Serializer):
    name = serializers.CharField(max_length=100, error_messages={
        "required": NAME_ERROR, "blank": NAME_ERROR, "max_length": NAME_ERROR, "null": NAME_ERROR,
        "invalid": NAME_ERROR})
    expires_days = serializers.IntegerField(min_value=1, max_value=3650, required=False, allow_null=True,
                                            error_messages={k: DAYS_ERROR for k in (
                                                "invalid", "min_value", "max_value", "max_string_length")})
    models = serializers.ListField(
        child=serializers.CharField(max_length=200, error_messages={"max_length": MODEL_ERROR}),
        required=False, default=list, max_length=100)
    project = serializers.CharField(max_length=100, required=False, allow_null=True, error_messages={
        k: PROJECT_ERROR for k in ("blank", "max_length", "invalid")})


class ProjectChoiceInput(serializers.Serializer):
    """The chat's choice of project: a name, or null for the user's default."""

    project = serializers.CharField(max_length=100, allow_null=True, error_messages={
        k: PROJECT_ERROR for k in ("required", "blank", "max_length", "invalid")})


class KeyOutput(serializers.ModelSerializer):
    state = serializers.SerializerMethodField()
    project = serializers.SerializerMethodField()

    class Meta:
        model = ApiKey
        fields = ["prefix", "name", "created_at", "expires_at", "revoked_at", "last_used_at", "allowed_models",
                  "state", "project"]

    def get_project(self, key: ApiKey) -> str | None:
        return key.project.name if key.project_id is not None and key.project is not None else None

    def get_state(self, key: ApiKey) -> str:
        return "revoked" if key.revoked_at else "active" if key.is_active() else "expired"


class DateRangeInput(serializers.Serializer):
    """``?from=YYYY-MM-DD&to=YYYY-MM-DD``, both optional, both inclusive (days in the site's TIME_ZONE)."""

    to = serializers.DateField(required=False, input_formats=["%Y-%m-%d"])

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        fields["from"] = serializers.DateField(required=False, input_formats=["%Y-%m-%d"])  # a keyword in Python
        return fields

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs.get("from") and attrs.get("to") and attrs["from"] > attrs["to"]:
            raise serializers.ValidationError({"from": "'from' is after 'to'."})
        return attrs


class UsageFilterInput(DateRangeInput):
    """The date range, and ``?project=NAME`` for one project's rows only."""

    project = serializers.CharField(max_length=100, required=False, error_messages={
        k: PROJECT_ERROR for k in ("blank", "max_length", "invalid")})


class MonthInput(serializers.Serializer):
    """``?month=YYYY-MM`` (a calendar month in TIME_ZONE), this month when not given."""

    month = serializers.CharField(required=False, max_length=7, error_messages={
        k: "month: a month as YYYY-MM, e.g. 2026-12" for k in ("blank", "max_length", "invalid")})

    def validate_month(self, value: str) -> str:
        try:
            parse_month(value)
        except ValueError as exc:
            raise serializers.ValidationError(str(exc)) from None
        return value

    project = serializers.CharField(max_length=100, required=False, error_messages={
        k: PROJECT_ERROR for k in ("blank", "max_length", "invalid")})

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        return {"month": attrs.get("month") or current_month(), "project": attrs.get("project")}
