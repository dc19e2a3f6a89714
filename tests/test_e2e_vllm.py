"""The whole system on real components, end to end:

official openai client -> gateway (daphne) -> hpcbridge -> real sshd, key locked to the
ForceCommand -> hpcside session server -> a Slurm job running vLLM (CPU) serving SmolLM2.

The model starts from zero instances: the first request is held through the cold start (with
progress in SSE comments) and answers. The vLLM environment and the model are prepared by
scripts/test.sh (scripts/lib.sh: vllm_ready, smollm2_ready) and named by CHATAI_VLLM_PYTHON and
CHATAI_MODEL_DIR.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chatai.management.commands.embedded import SMOLLM2_VLLM_ARGS
from tests.conftest import Hpcside
from tests.harness.slurm import SlurmCluster
from tests.harness.sshd import SSHServer
from tests.live import LiveApp

pytestmark = [pytest.mark.slurm, pytest.mark.sshd, pytest.mark.vllm, pytest.mark.root, pytest.mark.live]

MODEL = "SmolLM2-135M-Instruct"
QUESTION = "What is the capital of France?"


def runtime() -> tuple[str, str]:
    python, model = os.environ.get("CHATAI_VLLM_PYTHON", ""), os.environ.get("CHATAI_MODEL_DIR", "")
    missing = [what for what, path in (("CHATAI_VLLM_PYTHON", python), ("CHATAI_MODEL_DIR", model))
               if not path or not Path(path).exists()]
    if missing:
        why = f"{', '.join(missing)} not set or missing: scripts/test.sh prepares the vLLM runtime and the model"
        if os.environ.get("CHATAI_REQUIRE_VLLM"):
            pytest.fail(why)
        pytest.skip(why)
    return python, model


@pytest.fixture
def stack(slurm1: SlurmCluster, hpcside_on: Callable[[SlurmCluster | None], Hpcside]) -> Iterator[tuple]:
    python, model_dir = runtime()
    h = hpcside_on(slurm1)
    section = "\n".join([
        "[service:smollm2]", f"model = {MODEL}", "template = vllm-cpu", f"model_path = {model_dir}",
        f"vllm_args = {SMOLLM2_VLLM_ARGS}", "max_model_len = 2048", "cpus = 2", "min_instances = 0",
        "max_instances = 1", "walltime = 30m", "renewal_margin = 5m", "readiness_timeout = 5m", "idle_timeout = 30m",
        "unhealthy_grace = 30s",
    ]) + "\n"
    h.write_config(section, python=python, hold_timeout="5m", probe_timeout="2s")
    with SSHServer(h.account, h.deployment, h.config, slurm_env=f"SLURM_CONF={slurm1.conf}") as sshd:
        app = LiveApp(extra_env={"HPC_PLATFORMS": json.dumps([{
            "name": "hpc", "transport": "ssh", "host": "127.0.0.1", "port": sshd.port, "user": h.account.name,
            "key_file": str(sshd.client_key), "known_hosts": str(sshd.known_hosts)}])})
        app.start()
        app.create_user("alice")
        # Staff see the cold start's details (node names, Slurm's reasons); others only the stage.
        app.shell("from django.contrib.auth.models import User\n"
                  "User.objects.filter(username='alice').update(is_staff=True)")
        try:
            yield h, app, sshd
        finally:
            app.stop()


def test_openai_client_to_vllm_in_a_slurm_job_over_ssh_from_zero_instances(stack: tuple) -> None:
    import openai

    h, app, sshd = stack
    key = app.create_key("alice")
    client = openai.OpenAI(base_url=f"{app.url}/v1", api_key=key, max_retries=0, timeout=420)
    assert h.service("smollm2")["instances"]["ready"] == 0
    assert [m.id for m in client.models.list().data] == [MODEL]

    # 1. Cold start, streamed: held (SSE comments show the stages), then the model's tokens.
    started = time.monotonic()
    comments: list[str] = []
    text = ""
    with client.chat.completions.with_streaming_response.create(
            model=MODEL, stream=True, temperature=0, max_tokens=40,
            messages=[{"role": "user", "content": QUESTION}]) as response:
        assert response.http_response.status_code == 200
        for line in response.iter_lines():
            if line.startswith(":"):
                comments.append(line)
            elif line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[len("data: "):])
                for choice in chunk.get("choices", []):
                    text += (choice.get("delta") or {}).get("content") or ""
    cold = time.monotonic() - started
    assert "Paris" in text, text
    progress = " ".join(comments)
    assert "loading the model on n1" in progress and comments[-1].startswith(": ready"), comments
    assert h.service("smollm2")["instances"]["ready"] == 1

    # 2. Warm, streamed through the client's own parser.
    stream = client.chat.completions.create(model=MODEL, stream=True, temperature=0, max_tokens=40,
                                            messages=[{"role": "user", "content": QUESTION}])
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "Paris" in streamed, streamed

    # 3. Warm, not streamed; usage is counted by the model's own figures.
    answer = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=40,
                                            messages=[{"role": "user", "content": QUESTION}])
    assert "Paris" in (answer.choices[0].message.content or ""), answer
    assert answer.model == MODEL and answer.usage and answer.usage.completion_tokens > 0
    print(f"cold start answered in {cold:.1f} s; {len(comments)} progress comments")

    # No prompt text in job output, hpcside's files, the account's home, the database or the logs.
    app.stop_workers()
    places = [h.state, Path(h.account.home), app.dir]
    for place in places:
        for path in place.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                assert b"capital of France" not in data, path
    job_logs = list((h.state / "logs").glob("*.out"))
    assert job_logs and any(b"vllm" in p.read_bytes().lower() for p in job_logs)

    # scancel (what hpcside does on scale-down) leaves no vLLM process behind.
    h.cancel_jobs()
    deadline = time.monotonic() + 30
    left: list[str] = ["?"]
    while left and time.monotonic() < deadline:
        left = subprocess.run(["pgrep", "-u", h.account.name, "-f", "vllm.entrypoints"],
                              capture_output=True, text=True, check=False).stdout.split()
        time.sleep(0.5)
    assert not left, f"vLLM processes left after scancel: {left}"
