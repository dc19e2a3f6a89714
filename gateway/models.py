"""API keys, rate-limit policies, the model overlay and usage rows. Never any content."""

from __future__ import annotations

import datetime

from django.conf import settings
from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.db import models
from django.utils import timezone


class Project(models.Model):
    """A group of users whose usage is budgeted and charged back together, optionally named after a
    Slurm account. Members: the users of its ``groups`` (from the OIDC groups claim) and its
    explicit ``members`` (set by an admin)."""

    name = models.CharField(max_length=100, unique=True, validators=[RegexValidator(
        r"^[^(]", "A project's name may not start with '(': the reports use '(no project)' and '(idle)'.")])
    slurm_account = models.CharField(max_length=100, blank=True,
                                     help_text="The Slurm account this project stands for, if any.")
    description = models.TextField(blank=True)
    shares = models.PositiveIntegerField(default=1, help_text="Fair-share weight (Slurm's shares): twice the "
                                         "shares, twice the usage before its priority drops as far.")
    groups = models.ManyToManyField(Group, blank=True, related_name="projects",
                                    help_text="Members of these groups are members of the project.")
    members = models.ManyToManyField(settings.AUTH_USER_MODEL, blank=True, related_name="projects",
                                     help_text="Members added by hand, on top of the groups' members.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


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
    project = models.ForeignKey(Project, null=True, blank=True, on_delete=models.PROTECT, related_name="api_keys",
                                help_text="The project this key's usage is charged to; empty: none.")

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
    project = models.ForeignKey(Project, null=True, blank=True, on_delete=models.SET_NULL)
    platform = models.CharField(max_length=100, blank=True, help_text="The HPC platform that served it.")
    instance = models.CharField(max_length=100, blank=True, help_text="The model instance (job) that served it.")

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["project", "created_at"]), models.Index(fields=["user", "created_at"])]


class Budget(models.Model):
    """A hard token budget per period for a project, a group (each member counted alone) or a user."""

    PERIODS = [("day", "day"), ("week", "week"), ("month", "month")]
    name = models.CharField(max_length=100)
    project = models.ForeignKey(Project, null=True, blank=True, on_delete=models.CASCADE, related_name="budgets")
    group = models.ForeignKey(Group, null=True, blank=True, on_delete=models.CASCADE)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE)
    tokens = models.PositiveBigIntegerField(help_text="Prompt plus completion tokens allowed per period.")
    period = models.CharField(max_length=5, choices=PERIODS, default="month")

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        owners = [x for x in (self.project_id, self.group_id, self.user_id) if x is not None]
        if len(owners) != 1:
            raise ValidationError("A budget belongs to exactly one of: a project, a group, a user.")


class NodeTime(models.Model):
    """One model instance's node time on an HPC platform (a Slurm job or a local process): what the
    charge-back divides among projects by the tokens the instance served."""

    SOURCES = [("sacct", "sacct"), ("hpcside", "hpcside")]
    platform = models.CharField(max_length=100)
    instance = models.CharField(max_length=100)
    job_id = models.CharField(max_length=50, blank=True)
    model = models.CharField(max_length=200)
    started_at = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True, help_text="Empty while it runs.")
    nodes = models.PositiveIntegerField(default=1)
    gpus = models.PositiveIntegerField(default=0)
    cpus = models.PositiveIntegerField(default=0)
    source = models.CharField(max_length=10, choices=SOURCES)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["platform", "instance"], name="nodetime_platform_instance")]
        indexes = [models.Index(fields=["started_at"])]

    def __str__(self) -> str:
        return f"{self.platform}/{self.instance}"


class NodeTimeCollection(models.Model):
    """Where ``manage.py collect_nodetime`` left off on one platform: the next run asks for what
    ended since ``until`` (the platform's own clock, so the two machines' clocks need not agree)."""

    platform = models.CharField(max_length=100, unique=True)
    until = models.FloatField(default=0.0, help_text="The platform's clock at the last complete collection "
                              "(seconds since the epoch).")
    collected_at = models.DateTimeField(null=True, blank=True)
    records = models.PositiveIntegerField(default=0, help_text="Instances received by the last collection.")
    last_error = models.CharField(max_length=300, blank=True)

    def __str__(self) -> str:
        return f"{self.platform} until {self.until:.0f}"
