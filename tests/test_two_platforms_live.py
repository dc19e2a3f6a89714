"""One model offered by two HPC platforms, through the gateway on daphne and the openai client:
listed once with both platforms' instances, and served while one platform is down."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from hpcside.launchers import LocalLauncher
from tests.live import LiveApp, local_services, stub_service

ASK = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApp]:
    other = tmp_path_factory.mktemp("platform-b")
    local_services(other / "services.ini", other / "state", "liveb",
                   stub_service("stub", "stub-model", min_instances=1))
    live = LiveApp(services=stub_service("stub", "stub-model", min_instances=1))
    live.extra_env["HPC_PLATFORMS"] = json.dumps([
        {"name": "a", "transport": "local", "hpcside_config": str(live.dir / "services.ini")},
        {"name": "b", "transport": "local", "hpcside_config": str(other / "services.ini")}])
    live.start()
    live.create_user("alice")
    yield live
    live.stop()
    LocalLauncher(other / "state").kill_all("liveb.")


@pytest.fixture(scope="module")
def client(app: LiveApp) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app.url}/v1", api_key=app.create_key("alice"), max_retries=0, timeout=60)


def test_a_model_on_two_platforms_is_one_model_with_both_platforms_instances(client: openai.OpenAI) -> None:
    assert "Paris" in (client.chat.completions.create(model="stub-model", messages=ASK).choices[0].message.content
                       or "")
    deadline = time.monotonic() + 30
    while True:
        models = [m for m in client.models.list() if m.id == "stub-model"]
        assert len(models) == 1
        if models[0].model_extra["instances"] == 2 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert models[0].model_extra["instances"] == 2 and models[0].model_extra["status"] == "ready"


def test_with_one_platform_down_the_model_is_served_by_the_other(app: LiveApp, client: openai.OpenAI) -> None:
    config = Path(app.dir / "services.ini")
    good = config.read_text()
    config.write_text("[hpcside]\nbroken = \n")  # platform a's session server can no longer start
    try:
        for pid in subprocess.run(["pgrep", "-f", "--", f"--config {config} forcecommand"], capture_output=True,
                                  text=True, check=False).stdout.split():
            os.kill(int(pid), signal.SIGKILL)
        for _ in range(10):
            reply = client.chat.completions.create(model="stub-model", messages=ASK)
            assert "Paris" in (reply.choices[0].message.content or "")
            text = "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(model="stub-model", messages=ASK, stream=True)
                           if c.choices)
            assert text == "The capital of France is Paris."
    finally:
        config.write_text(good)
