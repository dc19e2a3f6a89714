"""API key creation and verification (NetBox style: prefix lookup, HMAC with a server pepper)."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from typing import Optional, Sequence

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.utils import timezone

from gateway.models import ApiKey

KEY_PREFIX = "cai-"
LAST_USED_EVERY = dt.timedelta(minutes=1)


def hash_secret(secret: str) -> str:
    return hmac.new(settings.API_KEY_PEPPER.encode(), secret.encode(), hashlib.sha256).hexdigest()


def api_key_create(*, user: AbstractBaseUser, name: str, expires_at: Optional[dt.datetime] = None,
                   allowed_models: Sequence[str] = ()) -> tuple[ApiKey, str]:
    """The new key and its full secret, which is shown once and never stored."""
    prefix = secrets.token_hex(6)
    secret = secrets.token_urlsafe(30)
    key = ApiKey.objects.create(user=user, name=name, prefix=prefix, secret_hash=hash_secret(secret),
                                expires_at=expires_at, allowed_models=list(allowed_models))
    return key, f"{KEY_PREFIX}{prefix}.{secret}"


def split_key(raw: str) -> Optional[tuple[str, str]]:
    if not raw.startswith(KEY_PREFIX) or len(raw) > 200:
        return None
    prefix, sep, secret = raw[len(KEY_PREFIX):].partition(".")
    if not sep or len(prefix) != 12 or not secret:
        return None
    return prefix, secret


async def api_key_authenticate(raw: str) -> Optional[ApiKey]:
    """The active key for ``raw``, or None (unknown, wrong secret, revoked or expired: all look alike)."""
    parts = split_key(raw)
    if parts is None:
        return None
    prefix, secret = parts
    try:
        key = await ApiKey.objects.select_related("user").aget(prefix=prefix)
    except ApiKey.DoesNotExist:
        hash_secret(secret)  # the same work as a hit, so timing does not tell prefixes apart
        return None
    if not hmac.compare_digest(key.secret_hash, hash_secret(secret)):
        return None
    return key


async def api_key_touch(key: ApiKey) -> None:
    """Record last use, written at most once a minute per key."""
    now = timezone.now()
    if key.last_used_at is None or now - key.last_used_at >= LAST_USED_EVERY:
        key.last_used_at = now
        await ApiKey.objects.filter(pk=key.pk).aupdate(last_used_at=now)


def api_key_revoke(key: ApiKey) -> None:
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])
