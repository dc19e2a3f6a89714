"""Token budgets on the live app (daphne, the stand-in platform, an external provider): every kind of
request counted exactly as its usage row says, the crossing request refused with 429
insufficient_quota and forwarded nowhere, the budget left in /v1's headers and /api/me, and (with
Redis) counters lost from the cache rebuilt from the database. On SQLite with counters in process,
and on PostgreSQL with the counters in Redis."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any
from zoneinfo import ZoneInfo

import openai
import pytest

from tests.harness.accounts import stop_process_group
from tests.live import LiveApp, stub_service
from tests.test_gateway_faults import PROVIDER_KEY, Provider
from tests.test_gateway_openai import ASK, assert_openai_error, raw

REDIS_DB = 11
ZONE = "Europe/Berlin"


@pytest.fixture(scope="module")
def provider() -> Iterator[Provider]:
    p = Provider()
    yield p
    stop_process_group(p.proc)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=[pytest.mark.postgres,
                                                                                  pytest.mark.redis])])
def app(request: pytest.FixtureRequest, provider: Provider,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApp]:
    secret = tmp_path_factory.mktemp("secrets") / "provider-key"
    secret.write_text(PROVIDER_KEY + "\n")
    redis = request.param == "postgresql"
    if redis:
        subprocess.run(["redis-cli", "-n", str(REDIS_DB), "FLUSHDB"], capture_output=True, check=True)
    live = LiveApp(db=request.param, redis_url=f"redis://127.0.0.1:6379/{REDIS_DB}" if redis else "",
                   services=stub_service("stub", "stub-model", min_instances=1, idle_timeout="10m"),
                   extra_env={"EXT_PROVIDER_KEY_FILE": str(secret), "TIME_ZONE": ZONE}).start()
    try:
        live.create_user("ann", groups=("students",))
        live.shell("from django.contrib.auth.models import User\n"
                   "from gateway.models import ModelOverlay, Project\n"
                   f"ModelOverlay.objects.create(model_id='ext-model', external_base_url='{provider.url}/v1', "
                   "external_model='provider-model', external_key_env='EXT_PROVIDER_KEY')\n"
                   "p = Project.objects.create(name='climate', slurm_account='clim01')\n"
                   "p.members.add(User.objects.get(username='ann'))\n")
        yield live
    finally:
        live.stop()
        if redis:
            subprocess.run(["redis-cli", "-n", str(REDIS_DB), "FLUSHDB"], capture_output=True, check=False)


def project_key(app: LiveApp, username: str, project: str) -> str:
    key = app.create_key(username)
    prefix = key.split(".")[0].removeprefix("cai-")
    app.shell("from gateway.models import ApiKey, Project\n"
              f"ApiKey.objects.filter(prefix={prefix!r}).update(project=Project.objects.get(name={project!r}))")
    return key


def set_budget(app: LiveApp, tokens: int, period: str = "month", **owner: str) -> None:
    """The one budget of this owner (project=, group= or user= by name), created or changed."""
    (kind, name), = owner.items()
    lookup = {"project": "Project.objects.get(name=", "group": "Group.objects.get(name=",
              "user": "User.objects.get(username="}[kind]
    app.shell("from django.contrib.auth.models import Group, User\nfrom gateway.models import Budget, Project\n"
              f"Budget.objects.update_or_create({kind}={lookup}{name!r}), "
              f"defaults={{'name': '{kind} {name}', 'tokens': {tokens}, 'period': {period!r}}})")


def db_tokens(app: LiveApp, project: str, rows: int) -> int:
    """Prompt plus completion tokens of the project's usage rows, once there are ``rows`` of them."""
    out = app.shell("import time\nfrom django.db.models import Sum\nfrom gateway.models import UsageRecord\n"
                    f"q = UsageRecord.objects.filter(project__name={project!r})\n"
                    "for _ in range(150):\n"
                    f"    if q.count() >= {rows}: break\n"
                    "    time.sleep(0.1)\n"
                    "s = q.aggregate(p=Sum('prompt_tokens'), c=Sum('completion_tokens'))\n"
                    "print(list(q.values_list('model', 'status', 'streamed', 'prompt_tokens', 'completion_tokens')))\n"
                    "print(q.count(), (s['p'] or 0) + (s['c'] or 0))")
    count, tokens = map(int, out.strip().splitlines()[-1].split())
    assert count == rows, out
    return tokens


def me(app: LiveApp, key: str) -> dict[str, Any]:
    status, _, body = raw(app, "GET", "/api/me", headers={"Authorization": f"Bearer {key}"})
    assert status == 200, body
    return dict(body)


def budget_used(app: LiveApp, key: str, scope: str = "project") -> int:
    [budget] = [b for b in me(app, key)["budgets"] if b["scope"] == scope]
    return int(budget["used"])


def chat(app: LiveApp, key: str, model: str = "stub-model", **extra: Any) -> tuple[int, dict[str, str], Any]:
    return raw(app, "POST", "/v1/chat/completions", json.dumps({"model": model, "messages": ASK, **extra}).encode(),
               {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})


def leave_mid_stream(app: LiveApp, key: str, model: str) -> None:
    """Start a long stream, read five words, go away."""
    conn = http.client.HTTPConnection("127.0.0.1", app.ports[0], timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps(
        {"model": model, "messages": ASK, "stream": True, "stub_delay": 0.05, "stub_repeat": 200}),
        {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    received = 0
    while received < 5:
        line = resp.fp.readline()
        if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            received += 1
    conn.close()


def next_month_words() -> str:
    today = dt.datetime.now(ZoneInfo(ZONE)).date()
    first = (today.replace(day=1) + dt.timedelta(days=32)).replace(day=1)
    return f"{first.day} {first:%B %Y} at 00:00 ({ZONE})"


def test_every_kind_of_request_is_counted_and_the_crossing_one_is_refused(app: LiveApp, provider: Provider) -> None:
    key = project_key(app, "ann", "climate")
    set_budget(app, 1_000_000, project="climate")
    client = openai.OpenAI(base_url=f"{app.url}/v1", api_key=key, max_retries=0, timeout=60)
    client.chat.completions.create(model="stub-model", messages=ASK)  # plain
    list(client.chat.completions.create(model="stub-model", messages=ASK, stream=True))  # streamed
    client.chat.completions.create(model="ext-model", messages=ASK)  # an external provider, plain
    list(client.chat.completions.create(model="ext-model", messages=ASK, stream=True))  # and streamed
    leave_mid_stream(app, key, "stub-model")  # cancelled: charged an estimate
    leave_mid_stream(app, key, "ext-model")
    spent = db_tokens(app, "climate", rows=6)
    assert spent > 6 * 8 and budget_used(app, key) == spent  # the counters agree with the rows, exactly

    # 5 tokens left: the next request's prompt (about 8 tokens) would cross the budget.
    set_budget(app, spent + 5, project="climate")
    forwarded = provider.stats()["requests"]
    status, headers, body = chat(app, key, "ext-model")
    assert_openai_error(status, body, 429)
    assert body["error"]["type"] == body["error"]["code"] == "insufficient_quota"
    assert body["error"]["message"] == (
        f"This request (about 8 prompt tokens) would exceed project climate's monthly token budget: 5 of "
        f"{spent + 5:,} tokens left. It resets on {next_month_words()}.")
    assert headers["x-budget-remaining-tokens"] == "5" and headers["x-should-retry"] == "false"
    assert "retry-after" not in headers
    assert provider.stats()["requests"] == forwarded  # nothing reached the provider
    with pytest.raises(openai.RateLimitError) as err:  # what the official client sees
        client.chat.completions.create(model="stub-model", messages=ASK, stream=True)
    assert err.value.code == "insufficient_quota"
    assert budget_used(app, key) == spent and db_tokens(app, "climate", rows=6) == spent  # nothing counted
    # Another of ann's keys, made without a project, is charged to her default project: held to it too.
    status, _, body = chat(app, app.create_key("ann"))
    assert status == 429 and body["error"]["code"] == "insufficient_quota"
    # A user of no project is not.
    app.create_user("cy")
    assert chat(app, app.create_key("cy"))[0] == 200


def test_the_budget_left_is_in_every_v1_response_and_in_api_me(app: LiveApp) -> None:
    app.create_user("bea", groups=("physics",))
    set_budget(app, 5000, "week", group="physics")
    set_budget(app, 900, "day", user="bea")
    key = app.create_key("bea")
    auth = {"Authorization": f"Bearer {key}"}
    status, headers, _ = chat(app, key)
    assert status == 200
    # The tightest: bea's own 900 a day (the group's 5000 a week has more left).
    assert (headers["x-budget-limit-tokens"], headers["x-budget-remaining-tokens"]) == ("900", "900")
    assert headers["x-budget-scope"] == "user"
    reset = dt.datetime.fromisoformat(headers["x-budget-reset"])
    assert reset.tzinfo is not None and reset.astimezone(ZoneInfo(ZONE)).time() == dt.time(0, 0)
    used = 900 - int(raw(app, "GET", "/v1/models", headers=auth)[1]["x-budget-remaining-tokens"])
    assert used > 0
    for path in ("/v1/models/stub-model", "/v1/models/no-such-model"):
        assert raw(app, "GET", path, headers=auth)[1]["x-budget-remaining-tokens"] == str(900 - used)
    status, headers, _ = chat(app, key, "no-such-model")
    assert status == 404 and headers["x-budget-remaining-tokens"] == str(900 - used)
    budgets = {b["scope"]: b for b in me(app, key)["budgets"]}
    assert set(budgets) == {"group", "user"}
    assert budgets["user"] == {**budgets["user"], "name": "user bea", "owner": "bea", "limit": 900, "used": used,
                               "remaining": 900 - used, "period": "day"}
    assert budgets["group"]["owner"] == "physics" and budgets["group"]["period"] == "week"
    assert dt.datetime.fromisoformat(budgets["group"]["resets_at"]).astimezone(ZoneInfo(ZONE)).weekday() == 0
    app.create_user("dan")
    assert me(app, app.create_key("dan"))["budgets"] == []  # no project, group or own budget: none apply


def test_a_counter_lost_from_the_cache_is_rebuilt_from_the_database(app: LiveApp) -> None:
    if not app.redis_url:
        pytest.skip("the in-process counters die with the worker; the engine test covers their rebuild")
    key = project_key(app, "ann", "climate")
    set_budget(app, 1_000_000, project="climate")
    rows = int(app.shell("from gateway.models import UsageRecord\n"
                         "print(UsageRecord.objects.filter(project__name='climate').count())").split()[-1]) + 1
    assert chat(app, key)[0] == 200
    # The usage row is written after the reply has gone out (its budget counter settled before it):
    # wait for the row, then read the counter.
    spent = db_tokens(app, "climate", rows)
    before = budget_used(app, key)
    assert before == spent
    names = subprocess.run(["redis-cli", "-n", str(REDIS_DB), "--scan", "--pattern", "*bud:*"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert any(":bud:p" in n for n in names), names
    subprocess.run(["redis-cli", "-n", str(REDIS_DB), "DEL", *names], capture_output=True, check=True)
    assert budget_used(app, key) == before  # rebuilt from the rows
    assert chat(app, key)[0] == 200
    time.sleep(0.1)
    assert budget_used(app, key) == db_tokens(app, "climate", rows + 1)


def test_a_plain_request_whose_client_leaves_before_the_answer_is_charged_its_prompt(app: LiveApp) -> None:
    """A plain request to an external provider whose client times out: the provider does (and bills)
    the work all the same, and the official client retries twice; each was charged nothing."""
    app.create_user("eve")
    key = app.create_key("eve")
    conn = http.client.HTTPConnection("127.0.0.1", app.ports[0], timeout=1)
    conn.request("POST", "/v1/chat/completions", json.dumps(
        {"model": "ext-model", "messages": ASK, "stub_delay": 0.05, "stub_repeat": 200}),  # a 10 s answer
        {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with pytest.raises(TimeoutError):
        conn.getresponse()
    conn.close()
    out = app.shell("import time\nfrom gateway.models import UsageRecord\n"
                    "q = UsageRecord.objects.filter(user__username='eve')\n"
                    "for _ in range(150):\n"
                    "    if q.exists(): break\n"
                    "    time.sleep(0.1)\n"
                    "print(list(q.values_list('status', 'prompt_tokens', 'completion_tokens')))")
    assert out.strip().splitlines()[-1] == "[(499, 8, 0)]", out  # the prompt's estimate, as the 429 above says
