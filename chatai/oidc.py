"""Single sign-on with the institution's OpenID Connect provider (mozilla-django-oidc).

A user is identified by the provider's ``sub`` claim (``OIDC_USERNAME_CLAIM``), which the user
cannot change. ``email`` may be chosen instead, and is then accepted only with
``email_verified`` true. Either way only accounts made by single sign-on (no usable password)
are matched: a local account of the same name (an operator's) is never taken over.
Groups come from ``OIDC_GROUPS_CLAIM`` at every login and replace the user's groups (they decide
which models the user may use), through ``OIDC_GROUPS_MAP`` (claim value -> Django group name)
or, without a map, by name, limited to values starting with ``OIDC_GROUPS_PREFIX`` when it is
set. An absent claim means no groups (fail closed) unless ``OIDC_KEEP_GROUPS_WITHOUT_CLAIM``.
A user disabled in the admin loses every session at its next request (``get_user``), pages and
/v1 alike; a session also ends when the provider's does: ``SessionRefresh`` asks the provider
again (silently) every ``OIDC_RENEW_ID_TOKEN_EXPIRY_SECONDS``, and /v1 refuses a session whose
check is overdue (``session_is_current``). Logging out also ends the session at the provider
(its ``end_session_endpoint``) when ``OIDC_OP_LOGOUT_ENDPOINT`` is set.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY
from django.contrib.auth.backends import ModelBackend
from django.contrib.auth.models import Group
from django.core.exceptions import SuspiciousOperation
from django.db import transaction
from django.http import HttpRequest
from mozilla_django_oidc.auth import OIDCAuthenticationBackend

log = logging.getLogger("chatai.oidc")


def claim_groups(claims: dict[str, Any]) -> list[str]:
    """The Django group names the claims give, in order, without duplicates."""
    raw = claims.get(settings.OIDC_GROUPS_CLAIM) or []
    if isinstance(raw, str):
        raw = [raw]
    names: list[str] = []
    for value in raw:
        if not isinstance(value, str) or not value:
            continue
        if settings.OIDC_GROUPS_MAP:
            name = settings.OIDC_GROUPS_MAP.get(value)
        elif settings.OIDC_GROUPS_PREFIX:
            name = value if value.startswith(settings.OIDC_GROUPS_PREFIX) else None
        else:
            name = value
        if name and len(name) <= 150 and name not in names:
            names.append(name)
    return names


def email_verified(claims: Mapping[str, Any]) -> bool:
    value = claims.get("email_verified")
    return value is True or (isinstance(value, str) and value.lower() == "true")


class Backend(OIDCAuthenticationBackend):
    def username_of(self, claims: dict[str, Any]) -> str:
        value = claims.get(settings.OIDC_USERNAME_CLAIM)
        return value.strip() if isinstance(value, str) else ""

    def verify_claims(self, claims: dict[str, Any]) -> bool:
        name = settings.OIDC_USERNAME_CLAIM
        if not self.username_of(claims) or len(self.username_of(claims)) > 150:
            log.warning("OIDC login refused: the claim %r is missing or too long", name)
            return False
        if name == "email" and not email_verified(claims):
            log.warning("OIDC login refused: users are identified by email, and this one is not verified")
            return False
        return True

    def filter_users_by_claims(self, claims: dict[str, Any]) -> Any:
        # Only accounts single sign-on made (no usable password): never a local account of that name.
        users = self.UserModel.objects.filter(username=self.username_of(claims))
        return [user for user in users if not user.has_usable_password()]

    def get_user(self, user_id: Any) -> Any | None:
        """The session's user, or None (signed out) once disabled in the admin."""
        user = super().get_user(user_id)
        return user if user is not None and user.is_active else None

    def describe_user_by_claims(self, claims: dict[str, Any]) -> str:
        return f"{settings.OIDC_USERNAME_CLAIM} {self.username_of(claims)}"

    def create_user(self, claims: dict[str, Any]) -> Any:
        if self.UserModel.objects.filter(username=self.username_of(claims)).exists():
            raise SuspiciousOperation("a local account has this name")  # the login fails; nothing is taken over
        user = self.UserModel.objects.create_user(self.username_of(claims), email=claims.get("email") or "")
        return self.update_user(user, claims)

    def update_user(self, user: Any, claims: dict[str, Any]) -> Any:
        with transaction.atomic():
            user.email = claims.get("email") or user.email
            user.first_name = (claims.get("given_name") or user.first_name)[:150]
            user.last_name = (claims.get("family_name") or user.last_name)[:150]
            user.save(update_fields=["email", "first_name", "last_name"])
            if settings.OIDC_GROUPS_CLAIM in claims or not settings.OIDC_KEEP_GROUPS_WITHOUT_CLAIM:
                user.groups.set([Group.objects.get_or_create(name=name)[0] for name in claim_groups(claims)])
        return user


class LocalAdminBackend(ModelBackend):
    """Password login beside single sign-on, for staff accounts only (OIDC_PASSWORD_LOGIN)."""

    def user_can_authenticate(self, user: Any) -> bool:
        return bool(super().user_can_authenticate(user) and user.is_staff)


def session_is_current(session: Mapping[str, Any]) -> bool:
    """False for a single sign-on session whose check with the provider is overdue: the chat's
    /v1 requests never pass SessionRefresh, so they refuse it until a page load renews it."""
    backend = session.get(BACKEND_SESSION_KEY, "")
    if not settings.OIDC_ENABLED or backend != "chatai.oidc.Backend":
        return True
    return float(session.get("oidc_id_token_expiration", 0)) > time.time()


def provider_logout_url(request: HttpRequest) -> str:
    """Where logging out sends the browser: the provider's end_session_endpoint, then back here."""
    endpoint = settings.OIDC_OP_LOGOUT_ENDPOINT
    if not endpoint:
        return settings.LOGOUT_REDIRECT_URL
    params = {"post_logout_redirect_uri": request.build_absolute_uri(settings.LOGOUT_REDIRECT_URL),
              "client_id": settings.OIDC_RP_CLIENT_ID}
    id_token = request.session.get("oidc_id_token")
    if id_token:
        params["id_token_hint"] = id_token
    return f"{endpoint}?{urlencode(params)}"
