"""API keys, rate-limit policies, the model overlay and usage rows. Never any content."""

from __future__ import annotations

import datetime

from django.conf import settings
from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.db import models
from django.utils import timezone


class ApiKey(models.Model):
    """A key is ``cai-<prefix>.<secret>``: looked up by prefix, verified by a keyed hash of the secret."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, unique=True, editable=False)
    secret_hash = models.CharField(max_length=64, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    allowed_models = models.JSONField(default=list, blank=True,
                                      help_text="Model ids this key may use; empty: every model the user may use.")

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} (cai-{self.prefix}…)"

    def is_active(self, now: datetime.datetime | None = None) -> bool:
        now = now or timezone.now()
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)

    def allows(self, model: str) -> bool:
        return not self.allowed_models or model in self.allowed_models


class RateLimitPolicy(models.Model):
    """Limits for a group or a user (counted per user across all their keys), or a key (an extra limit
    on top, counted per key). Empty fields: no limit of that kind."""

    name = models.CharField(max_length=100)
    group = models.ForeignKey(Group, null=True, blank=True, on_delete=models.CASCADE)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE)
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.CASCADE)
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True)
    requests_per_hour = models.PositiveIntegerField(null=True, blank=True)
    requests_per_day = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_minute = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_day = models.PositiveIntegerField(null=True, blank=True)
    parallel_streams = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "rate-limit policies"

    def __str__(self) -> str:
        return self.name


class ModelOverlay(models.Model):
    """What an admin adds to a model from the platforms, or an external OpenAI-compatible provider."""

    model_id = models.CharField(max_length=200, unique=True)
    display_name = models.CharField(max_length=200, blank=True)
    description = models.TextField(blank=True)
    groups = models.ManyToManyField(Group, blank=True, help_text="Who may use it; none selected: everybody.")
    enabled = models.BooleanField(default=True)
    external_base_url = models.URLField(blank=True, help_text="An external OpenAI-compatible provider's /v1 URL.")
    external_model = models.CharField(max_length=200, blank=True, help_text="The model name at the provider.")
    external_key_env = models.CharField(max_length=100, blank=True,
                                        help_text="Environment variable (or NAME_FILE) holding the provider key.")
    requests_per_minute = models.PositiveIntegerField(
        null=True, blank=True, help_text="Per user (or key) for this model, on top of their own limits.")
    tokens_per_day = models.PositiveIntegerField(null=True, blank=True, help_text="Per user (or key) for this model.")
    parallel_streams = models.PositiveIntegerField(null=True, blank=True,
                                                   help_text="Per user (or key) for this model.")

    def __str__(self) -> str:
        return self.display_name or self.model_id

    def clean(self) -> None:
        if self.external_model and not self.external_base_url:
            raise ValidationError({"external_base_url": "An external model needs the provider's base URL."})
        if self.external_key_env and not self.external_key_env.replace("_", "").isalnum():
            raise ValidationError({"external_key_env": "An environment variable name: letters, digits and _."})

    @property
    def is_external(self) -> bool:
        return bool(self.external_base_url)


class UsageRecord(models.Model):
    """One row per request: who, which model, when, outcome, tokens, duration. Never content."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL)
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.SET_NULL)
    model = models.CharField(max_length=200, db_index=True)
    endpoint = models.CharField(max_length=40)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    status = models.PositiveSmallIntegerField()
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    duration_ms = models.PositiveIntegerField(default=0)
    streamed = models.BooleanField(default=False)

    class Meta:
        ordering = ["-created_at"]
