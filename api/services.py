"""Writes of the resource API: keys created (never wider than the key asking) and revoked."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from django.utils import timezone
from rest_framework.exceptions import ValidationError

from api.errors import WiderKey
from gateway.keys import api_key_create, api_key_revoke
from gateway.models import ApiKey, RateLimitPolicy

MAX_KEYS_PER_USER = 50
LIMIT_FIELDS = ("requests_per_minute", "requests_per_hour", "requests_per_day", "tokens_per_minute",
                "tokens_per_day", "parallel_streams")


def key_create(*, user: Any, name: str, expires_days: int | None, models: Sequence[str],
               parent: ApiKey | None = None) -> tuple[ApiKey, str]:
    """A new key of ``user`` and its secret. ``parent``, the key this request came with, bounds the new
    key: its models and expiry are inherited when not given and refused when wider, and the parent's
    own rate-limit policy is copied to the new key."""
    if ApiKey.objects.filter(user=user, revoked_at=None).count() >= MAX_KEYS_PER_USER:
        raise ValidationError({"name": [f"You have {MAX_KEYS_PER_USER} active keys: revoke one first."]},
                              code="too_many_keys")
    expires = timezone.now() + dt.timedelta(days=expires_days) if expires_days else None
    allowed: list[str] = list(dict.fromkeys(models))
    if parent is not None:
        if parent.expires_at is not None:
            if expires is None:
                expires = parent.expires_at
            elif expires > parent.expires_at:
                raise WiderKey("A key cannot create a key that expires after it does.", "expires_days")
        if parent.allowed_models:
            if not allowed:
                allowed = list(parent.allowed_models)
            elif not set(allowed) <= set(parent.allowed_models):
                raise WiderKey("A key cannot create a key for models it may not use itself.", "models")
    key, secret = api_key_create(user=user, name=name, expires_at=expires, allowed_models=allowed)
    if parent is not None:
        for policy in RateLimitPolicy.objects.filter(api_key=parent):
            RateLimitPolicy.objects.create(name=policy.name, api_key=key,
                                           **{f: getattr(policy, f) for f in LIMIT_FIELDS})
    return key, secret


def key_revoke(*, user: Any, prefix: str) -> ApiKey | None:
    """Revoke one of the user's own keys; None if the user has no key of that prefix."""
    key = ApiKey.objects.filter(user=user, prefix=prefix).first()
    if key is not None:
        api_key_revoke(key)
    return key
