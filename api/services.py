"""Writes of the resource API: keys created (never wider than the key asking) and revoked, and the chat's
choice of project."""

from __future__ import annotations

import datetime as dt
from collections.abc import MutableMapping, Sequence
from typing import Any

from django.utils import timezone
from rest_framework.exceptions import ValidationError

from api.errors import WiderKey
from gateway.keys import api_key_create, api_key_revoke
from gateway.models import ApiKey, RateLimitPolicy
from gateway.projects import SESSION_KEY, ProjectRef, projects_of

MAX_KEYS_PER_USER = 50
LIMIT_FIELDS = ("requests_per_minute", "requests_per_hour", "requests_per_day", "tokens_per_minute",
                "tokens_per_day", "parallel_streams")


def member_project(user: Any, group_ids: frozenset[int], name: str) -> ProjectRef:
    """The user's project of this name; a 400 naming the field ``project`` if they have none."""
    mine = projects_of(user, group_ids)
    for project in mine:
        if project.name == name:
            return project
    yours = ", ".join(p.name for p in mine) or "none"
    raise ValidationError({"project": [f"You are not a member of a project named {name!r} (yours: {yours})."]},
                          code="not_a_member")


def _key_project(user: Any, group_ids: frozenset[int], name: str | None, parent: ApiKey | None) -> int | None:
    """The project a new key is charged to: the one named (the user must be a member), else the user's
    default. A key creating a key keeps it in its own project."""
    if parent is not None and parent.project_id is not None:
        if name is not None and (parent.project is None or name != parent.project.name):
            raise WiderKey("A key cannot create a key charged to another project.", "project")
        return parent.project_id
    if name is not None:
        return member_project(user, group_ids, name).id
    mine = projects_of(user, group_ids)
    return mine[0].id if mine else None


def key_create(*, user: Any, name: str, expires_days: int | None, models: Sequence[str],
               parent: ApiKey | None = None, project: str | None = None,
               group_ids: frozenset[int] = frozenset()) -> tuple[ApiKey, str]:
    """A new key of ``user`` and its secret, charged to ``project`` (a name; default: the user's default
    project). ``parent``, the key this request came with, bounds the new key: its models, expiry and
    project are inherited when not given and refused when wider, and the parent's own rate-limit policy
    is copied to the new key."""
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
    project_id = _key_project(user, group_ids, project, parent)
    key, secret = api_key_create(user=user, name=name, expires_at=expires, allowed_models=allowed,
                                 project_id=project_id)
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


def session_project_choose(*, user: Any, group_ids: frozenset[int], name: str | None,
                           session: MutableMapping[str, Any]) -> ProjectRef | None:
    """Charge the session's chat requests to the user's project ``name`` from now on (None: back to the
    user's default). The session holds the project's id; gateway.caller reads it on every request, and
    a project the user has left falls back to the default there. Returns the project now in use."""
    if name is None:
        session.pop(SESSION_KEY, None)
        mine = projects_of(user, group_ids)
        return mine[0] if mine else None
    project = member_project(user, group_ids, name)
    session[SESSION_KEY] = project.id
    return project
