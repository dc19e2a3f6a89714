"""Single sign-on with the institution's OpenID Connect provider (mozilla-django-oidc).

A user is identified by one stable claim (``OIDC_USERNAME_CLAIM``: ``email`` or ``sub``),
never by a claim the user can change at will. Groups come from ``OIDC_GROUPS_CLAIM`` at every
login and replace the user's groups (they decide which models the user may use), through
``OIDC_GROUPS_MAP`` (claim value -> Django group name) or, without a map, by name, limited to
values starting with ``OIDC_GROUPS_PREFIX`` when it is set. Logging out also ends the session
at the provider (its ``end_session_endpoint``) when ``OIDC_OP_LOGOUT_ENDPOINT`` is set.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List
from urllib.parse import urlencode

from django.conf import settings
from django.contrib.auth.models import Group
from django.db import transaction
from django.http import HttpRequest
from mozilla_django_oidc.auth import OIDCAuthenticationBackend

log = logging.getLogger("chatai.oidc")


def claim_groups(claims: Dict[str, Any]) -> List[str]:
    """The Django group names the claims give, in order, without duplicates."""
    raw = claims.get(settings.OIDC_GROUPS_CLAIM) or []
    if isinstance(raw, str):
        raw = [raw]
    names: List[str] = []
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


class Backend(OIDCAuthenticationBackend):  # type: ignore[misc]
    def username_of(self, claims: Dict[str, Any]) -> str:
        value = claims.get(settings.OIDC_USERNAME_CLAIM)
        return value.strip() if isinstance(value, str) else ""

    def verify_claims(self, claims: Dict[str, Any]) -> bool:
        ok = bool(self.username_of(claims)) and len(self.username_of(claims)) <= 150
        if not ok:
            log.warning("OIDC login refused: the claim %r is missing or too long", settings.OIDC_USERNAME_CLAIM)
        return ok

    def filter_users_by_claims(self, claims: Dict[str, Any]) -> Any:
        return self.UserModel.objects.filter(username=self.username_of(claims))

    def describe_user_by_claims(self, claims: Dict[str, Any]) -> str:
        return f"{settings.OIDC_USERNAME_CLAIM} {self.username_of(claims)}"

    def create_user(self, claims: Dict[str, Any]) -> Any:
        user = self.UserModel.objects.create_user(self.username_of(claims), email=claims.get("email") or "")
        return self.update_user(user, claims)

    def update_user(self, user: Any, claims: Dict[str, Any]) -> Any:
        with transaction.atomic():
            user.email = claims.get("email") or user.email
            user.first_name = (claims.get("given_name") or user.first_name)[:150]
            user.last_name = (claims.get("family_name") or user.last_name)[:150]
            user.save(update_fields=["email", "first_name", "last_name"])
            if settings.OIDC_GROUPS_CLAIM in claims:
                user.groups.set([Group.objects.get_or_create(name=name)[0] for name in claim_groups(claims)])
        return user


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
