"""API key creation and verification (NetBox style: prefix lookup, HMAC with a server pepper)."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
import secrets
from collections.abc import Sequence

from django.conf import settings
from django.contrib.auth.models import User
from django.core.cache import caches
from django.db import connection
from django.utils import timezone

from common.expiring import Expiring
from gateway.models import ApiKey

KEY_PREFIX = "cai-"
LAST_USED_EVERY = dt.timedelta(minutes=1)


def hash_secret(secret: str) -> str:
    return hmac.new(settings.API_KEY_PEPPER.encode(), secret.encode(), hashlib.sha256).hexdigest()


def api_key_create(*, user: User, name: str, expires_at: dt.datetime | None = None,
                   allowed_models: Sequence[str] = (), project_id: int | None = None) -> tuple[ApiKey, str]:
    """The new key and its full secret, which is shown once and never stored. Its usage is charged to
    ``project_id`` (the caller checked the user is a member)."""
    prefix = secrets.token_hex(6)
    secret = secrets.token_urlsafe(30)
    key = ApiKey.objects.create(user=user, name=name, prefix=prefix, secret_hash=hash_secret(secret),
                                expires_at=expires_at, allowed_models=list(allowed_models), project_id=project_id)
    caches["default"].delete(_unknown(prefix))  # a miss remembered before it existed must not hide it
    return key, f"{KEY_PREFIX}{prefix}.{secret}"


def split_key(raw: str) -> tuple[str, str] | None:
    if not raw.startswith(KEY_PREFIX) or len(raw) > 200:
        return None
    prefix, sep, secret = raw[len(KEY_PREFIX):].partition(".")
    if not sep or len(prefix) != 12 or not secret:
        return None
    return prefix, secret


_keys: Expiring[str, ApiKey] = Expiring(lambda: settings.GATEWAY_POLICY_TTL)


def _unknown(prefix: str) -> str:
    """The cache entry that remembers a prefix no key has (hashed: the prefix comes from the client)."""
    return "gw:unknown-key:" + hashlib.sha256(prefix.encode(errors="replace")).hexdigest()[:32]


@functools.cache
def _state_sql() -> str:
    q = connection.ops.quote_name
    key_table, user_model = ApiKey._meta.db_table, ApiKey._meta.get_field("user").related_model
    user_table, user_pk = user_model._meta.db_table, user_model._meta.pk.column
    if user_pk is None:
        raise RuntimeError("the user model has no primary key column")
    # Identifiers come from the models' metadata, quoted; the one value is a parameter.
    return (f"SELECT {q(key_table)}.{q('revoked_at')} IS NULL, {q(user_table)}.{q('is_active')} "  # noqa: S608
            f"FROM {q(key_table)} JOIN {q(user_table)} ON {q(user_table)}.{q(user_pk)} = "
            f"{q(key_table)}.{q(ApiKey._meta.get_field('user').column)} WHERE {q(key_table)}.{q('id')} = %s")


def _fetch(prefix: str) -> ApiKey | None:
    """The key with its user. The object is kept for GATEWAY_POLICY_TTL seconds; what must apply
    at once (revocation, deletion, a disabled account) is re-read on every call with one plain query."""
    key = _keys.get(prefix)
    if key is not None:
        with connection.cursor() as cursor:
            cursor.execute(_state_sql(), [key.pk])
            row = cursor.fetchone()
        if row is None:
            _keys.pop(prefix)
            return None
        if not row[0] and key.revoked_at is None:
            key.revoked_at = timezone.now()
        key.user.is_active = bool(row[1])
        return key
    # A prefix known to be unknown costs no query for GATEWAY_UNKNOWN_KEY_TTL seconds (key creation clears it).
    unknown = _unknown(prefix)
    if caches["default"].get(unknown):
        return None
    try:
        key = ApiKey.objects.select_related("user", "project").get(prefix=prefix)
    except ApiKey.DoesNotExist:
        caches["default"].set(unknown, 1, settings.GATEWAY_UNKNOWN_KEY_TTL)
        return None
    return _keys.put(prefix, key)


def api_key_authenticate(raw: str) -> ApiKey | None:
    """The key for ``raw`` with its user, or None (unknown or wrong secret: both look alike). Sync."""
    parts = split_key(raw)
    if parts is None:
        return None
    prefix, secret = parts
    key = _fetch(prefix)
    if key is None:
        hash_secret(secret)  # the same work as a hit, so timing does not tell prefixes apart
        return None
    if not hmac.compare_digest(key.secret_hash, hash_secret(secret)):
        return None
    return key


def api_key_touch(key: ApiKey) -> None:
    """Record last use, written at most once a minute per key. Sync."""
    now = timezone.now()
    if key.last_used_at is None or now - key.last_used_at >= LAST_USED_EVERY:
        key.last_used_at = now
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)


def api_key_revoke(key: ApiKey) -> None:
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])
