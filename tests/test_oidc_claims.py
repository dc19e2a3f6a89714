"""Which claims sign a user in (chatai.oidc), for the settings the browser test does not switch.

The real provider flow (sub, groups, disabled users, session lifetime, no password login) is in
tests/test_browser_accounts.py; these are the backend's decisions on the claims themselves.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth import authenticate
from django.contrib.auth.models import Group, User

from chatai.oidc import Backend, session_is_current


@pytest.fixture
def oidc(settings: Any) -> Any:
    settings.OIDC_ENABLED = True
    settings.OIDC_OP_TOKEN_ENDPOINT = settings.OIDC_OP_USER_ENDPOINT = "https://sso.example/x"
    settings.OIDC_OP_JWKS_ENDPOINT = "https://sso.example/jwks"
    settings.OIDC_RP_CLIENT_ID, settings.OIDC_RP_CLIENT_SECRET = "chat-ai", "s"
    settings.OIDC_RP_SIGN_ALGO = "RS256"
    settings.OIDC_USERNAME_CLAIM = "sub"
    settings.OIDC_GROUPS_CLAIM, settings.OIDC_GROUPS_MAP, settings.OIDC_GROUPS_PREFIX = "groups", {}, ""
    settings.OIDC_KEEP_GROUPS_WITHOUT_CLAIM = False
    return settings


def test_email_identifies_a_user_only_when_verified(oidc: Any) -> None:
    oidc.OIDC_USERNAME_CLAIM = "email"
    backend = Backend()
    assert not backend.verify_claims({"sub": "1", "email": "a@uni.example"})
    assert not backend.verify_claims({"sub": "1", "email": "a@uni.example", "email_verified": False})
    assert backend.verify_claims({"sub": "1", "email": "a@uni.example", "email_verified": True})


@pytest.mark.django_db
def test_an_absent_groups_claim_keeps_groups_only_when_configured(oidc: Any) -> None:
    backend = Backend()
    user = User.objects.create_user("s-1")
    user.groups.add(Group.objects.create(name="physics"))
    oidc.OIDC_KEEP_GROUPS_WITHOUT_CLAIM = True
    backend.update_user(user, {"sub": "s-1"})
    assert list(user.groups.values_list("name", flat=True)) == ["physics"]
    oidc.OIDC_KEEP_GROUPS_WITHOUT_CLAIM = False
    backend.update_user(user, {"sub": "s-1"})
    assert not user.groups.exists()


@pytest.mark.django_db
def test_password_login_kept_for_local_admins_admits_staff_only(oidc: Any) -> None:
    oidc.AUTHENTICATION_BACKENDS = ["chatai.oidc.Backend", "chatai.oidc.LocalAdminBackend"]
    User.objects.create_user("ops", password="pw-ops-123456", is_staff=True)
    User.objects.create_user("student", password="pw-student-123456")
    assert authenticate(username="ops", password="pw-ops-123456") is not None
    assert authenticate(username="student", password="pw-student-123456") is None


def test_a_session_is_current_until_its_provider_check_is_due(oidc: Any) -> None:
    sso = {"_auth_user_backend": "chatai.oidc.Backend"}
    assert not session_is_current({**sso, "oidc_id_token_expiration": 1.0})
    assert session_is_current({**sso, "oidc_id_token_expiration": 9e12})
    assert session_is_current({"_auth_user_backend": "chatai.oidc.LocalAdminBackend"})
