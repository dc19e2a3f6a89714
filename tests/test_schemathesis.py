"""schemathesis against the OpenAPI document at /api/schema, on the live app with the stand-in
platform (a stub model kept ready): for every operation of /api and /v1, generated requests (valid
and invalid) never get a 5xx, and every answer has a documented status, media type and shape (every
error the Error schema). Bounded: a few examples per operation, no deadline per example."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    ignored_auth,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.live import LiveApp, stub_service

MAX_EXAMPLES = 15
CHECKS = [not_a_server_error, ignored_auth, status_code_conformance, content_type_conformance,
          response_schema_conformance]


MODELS = st.sampled_from([None, "stub-model"])  # None: the generated name (most do not exist)


def steer(pair: tuple[schemathesis.Case, str | None]) -> schemathesis.Case:
    """Half the cases name the stub model, so they reach the platform instead of stopping at 404."""
    case, model = pair
    if model is not None:
        if isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = model
        if case.path_parameters and "model" in case.path_parameters:
            case.path_parameters["model"] = model
    return case


@pytest.fixture(scope="module")
def app() -> Iterator[LiveApp]:
    live = LiveApp(services=stub_service("stub", "stub-model", min_instances=1, idle_timeout="10m")
                   + stub_service("other", "other-model"),
                   # ignored_auth sends wrong credentials on purpose: the per-address block would then refuse all.
                   extra_env={"GATEWAY_AUTH_FAILURES_PER_MINUTE": "0"}).start()
    live.create_user("sam")
    live.shell("from django.contrib.auth.models import User\nUser.objects.filter(username='sam').update(is_staff=True)")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def auth(app: LiveApp) -> dict:
    """A staff user's key (staff: the admin operations answer 200 too, not only 403)."""
    headers = {"Authorization": f"Bearer {app.create_key('sam')}"}
    for _ in range(120):  # the stub model ready, so /v1 requests reach it instead of waiting for a cold start
        found = requests.get(f"{app.url}/v1/models/stub-model", headers=headers, timeout=10)
        if found.status_code == 200 and found.json()["status"] == "ready":
            break
        time.sleep(0.5)
    return headers


@pytest.fixture(scope="module")
def api_schema(app: LiveApp, auth: dict) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{app.url}/api/schema", headers=auth, timeout=10)


def test_no_5xx_and_every_answer_as_documented(api_schema: schemathesis.BaseSchema, auth: dict) -> None:
    # One Hypothesis run per operation, driven here: schemathesis' lazy pytest fixture loader
    # (schemathesis.pytest.from_fixture) uses a pytest attribute that pytest 9 no longer has.
    failures: list[str] = []
    seen: Counter[tuple[str, int]] = Counter()

    def runner(name: str, strategy: st.SearchStrategy) -> Callable[[], None]:
        @given(case=strategy)
        @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                  derandomize=True, database=None)
        def run(case: schemathesis.Case) -> None:
            response = case.call_and_validate(headers=auth, checks=CHECKS, timeout=30)
            seen[(name, response.status_code)] += 1

        return run

    for result in api_schema.get_all_operations():
        operation = result.ok()
        name = f"{operation.method.upper()} {operation.path}"
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                runner(name, st.tuples(operation.as_strategy(generation_mode=mode), MODELS).map(steer))()
            except BaseException as exc:  # noqa: BLE001 - collect all operations' failures (groups too)
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                failures.append(f"{name} ({mode.value}): {exc}\n" + "\n".join(
                    str(e)[:1500] for e in getattr(exc, "exceptions", ())))
    print(sorted(seen.items()))
    assert not failures, "\n\n".join(failures)
    assert len({name for name, _ in seen}) >= 12  # every operation was called
    assert any(status == 200 for name, status in seen if name == "POST /v1/chat/completions")  # the stub answered
    assert any(status == 400 for name, status in seen if name == "POST /v1/chat/completions")  # and bad input too


def test_an_upstream_error_of_another_shape_reaches_the_client_in_the_error_shape(app: LiveApp, auth: dict) -> None:
    """Found by schemathesis: the stub (like vLLM without an embeddings model) answers /v1/embeddings
    404 with {"error": "not found"}, which the gateway passed through as it was."""
    reply = requests.post(f"{app.url}/v1/embeddings", json={"model": "stub-model", "input": "x"}, headers=auth,
                          timeout=30)
    assert reply.status_code == 404
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    assert error["message"] == "not found" and error["type"] == "not_found_error"
