"""An upstream's error reaches the client in the one documented error shape (found by schemathesis)."""

from __future__ import annotations

import time
from typing import Iterator

import pytest

from tests.live import LiveApp, stub_service


@pytest.fixture(scope="module")
def app() -> Iterator[LiveApp]:
    live = LiveApp(services=stub_service("stub", "stub-model", min_instances=1, idle_timeout="10m")
                   + stub_service("other", "other-model")).start()
    live.create_user("sam")
    live.shell("from django.contrib.auth.models import User\nUser.objects.filter(username='sam').update(is_staff=True)")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def auth(app: LiveApp) -> dict:
    """A staff user's key (staff: the admin operations answer 200 too, not only 403)."""
    headers = {"Authorization": f"Bearer {app.create_key('sam')}"}
    import requests

    for _ in range(120):  # the stub model ready, so /v1 requests reach it instead of waiting for a cold start
        found = requests.get(f"{app.url}/v1/models/stub-model", headers=headers, timeout=10)
        if found.status_code == 200 and found.json()["status"] == "ready":
            break
        time.sleep(0.5)
    return headers


def test_an_upstream_error_of_another_shape_reaches_the_client_in_the_error_shape(app: LiveApp, auth: dict) -> None:
    """Found by schemathesis: the stub (like vLLM without an embeddings model) answers /v1/embeddings
    404 with {"error": "not found"}, which the gateway passed through as it was."""
    import requests

    reply = requests.post(f"{app.url}/v1/embeddings", json={"model": "stub-model", "input": "x"}, headers=auth,
                          timeout=30)
    assert reply.status_code == 404
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    assert error["message"] == "not found" and error["type"] == "not_found_error"
