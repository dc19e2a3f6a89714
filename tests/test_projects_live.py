"""Projects on the live app (daphne), on SQLite and on PostgreSQL: the PROJECTS setting applied by the
deployment's migrate, keys charged to a project through /api/keys, the chat's session switching its
project with PUT /api/me/project, and the usage rows of /v1 requests (by key and by session) carrying
the project they were charged to, as /api/usage shows and filters them."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.live import LiveApp, stub_service
from tests.test_api import call, login, wait_ready
from tests.test_gateway_openai import ASK

PROJECTS = {"chemistry": {"groups": ["chem"], "slurm_account": "chem01", "shares": 10},
            "physics": ["phys"], "biology": ["bio"]}


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def app(request: pytest.FixtureRequest) -> Iterator[LiveApp]:
    live = LiveApp(db=request.param, services=stub_service("stub", "stub-model", min_instances=1, idle_timeout="10m"),
                   extra_env={"PROJECTS": json.dumps(PROJECTS)}).start()
    try:
        live.create_user("pat", groups=("chem", "phys"))
        live.create_user("quinn", groups=("bio",))
        yield live
    finally:
        live.stop()


def usage_projects(app: LiveApp, username: str, rows: int) -> list[str]:
    """The projects of the user's usage rows, oldest first, once there are ``rows`` (the writer batches)."""
    out = app.shell("import time\nfrom gateway.models import UsageRecord\n"
                    "for _ in range(100):\n"
                    f"    q = UsageRecord.objects.filter(user__username={username!r}).order_by('pk')\n"
                    f"    if q.count() >= {rows}: break\n"
                    "    time.sleep(0.1)\n"
                    "print([r.project.name if r.project else None for r in q])")
    return list(eval(out.strip().splitlines()[-1]))  # noqa: S307 - our own print of a list of names


def test_migrate_made_the_projects_of_the_setting(app: LiveApp) -> None:
    out = app.shell("from gateway.models import Project\n"
                    "for p in Project.objects.order_by('name'):\n"
                    "    print(p.name, p.slurm_account or '-', p.shares, ','.join(g.name for g in p.groups.all()))")
    assert out.strip().splitlines()[-3:] == ["biology - 1 bio", "chemistry chem01 10 chem", "physics - 1 phys"]
    app.manage("migrate", "--no-input", "-v", "0")  # a second deployment run changes nothing
    assert "0 created, 0 updated, 3 unchanged" in app.manage("sync_projects")


def test_a_key_made_for_a_project_charges_its_requests_there(app: LiveApp) -> None:
    opener, csrf = login(app, "pat")
    me = call(app, "GET", "/api/me", opener=opener)[2]
    assert [p["name"] for p in me["projects"]] == ["chemistry", "physics"] and me["project"] == "chemistry"
    status, _, made = call(app, "POST", "/api/keys", body={"name": "phys-script", "project": "physics"},
                           headers={"X-CSRFToken": csrf}, opener=opener)
    assert status == 201 and made["project"] == "physics", made
    status, _, body = call(app, "POST", "/api/keys", body={"name": "x", "project": "biology"},
                           headers={"X-CSRFToken": csrf}, opener=opener)
    assert status == 400 and body["error"]["param"] == "project"
    key = made["secret"]
    wait_ready(app, key, "stub-model")
    assert call(app, "GET", "/api/me", key)[2]["project"] == "physics"
    assert call(app, "POST", "/v1/chat/completions", key, {"model": "stub-model", "messages": ASK})[0] == 200
    assert usage_projects(app, "pat", 1) == ["physics"]


def test_the_chat_session_switches_its_project_and_its_requests_follow(app: LiveApp) -> None:
    opener, csrf = login(app, "quinn")
    unsafe = {"X-CSRFToken": csrf}
    wait_ready(app, app.create_key("quinn"), "stub-model")
    chat = {"model": "stub-model", "messages": ASK}
    assert call(app, "POST", "/v1/chat/completions", body=chat, headers=unsafe, opener=opener)[0] == 200
    status, _, body = call(app, "PUT", "/api/me/project", body={"project": "chemistry"}, headers=unsafe, opener=opener)
    assert status == 400 and body["error"]["param"] == "project"  # not quinn's
    assert call(app, "PUT", "/api/me/project", body={"project": "biology"}, opener=opener)[0] == 403  # no CSRF token

    # An admin adds quinn to chemistry by hand; the chat switches to it.
    app.shell("from django.contrib.auth.models import User\nfrom gateway.models import Project\n"
              "Project.objects.get(name='chemistry').members.add(User.objects.get(username='quinn'))")
    status, _, body = call(app, "PUT", "/api/me/project", body={"project": "chemistry"}, headers=unsafe, opener=opener)
    assert (status, body["project"]) == (200, "chemistry"), body
    assert call(app, "POST", "/v1/chat/completions", body=chat, headers=unsafe,
                opener=opener)[0] == 200
    assert call(app, "GET", "/api/me", opener=opener)[2]["project"] == "chemistry"
    assert usage_projects(app, "quinn", 2) == ["biology", "chemistry"]

    rows = call(app, "GET", "/api/usage?project=chemistry", opener=opener)[2]["data"]
    assert [(r["project"], r["requests"]) for r in rows] == [("chemistry", 1)]
    assert {r["project"] for r in call(app, "GET", "/api/usage", opener=opener)[2]["data"]} == {"biology", "chemistry"}
