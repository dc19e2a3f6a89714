"""A vLLM job answers only with its instance's token, on every path, and logs no content.

The REAL vLLM (CPU build) serving SmolLM2, started from the shipped vllm-cpu job template by the
scheduler (local launcher: the same script Slurm would run). vLLM's own --api-key guards only /v1;
hpcside's guard (``--middleware hpcside_vllm_guard.TokenGuard``) guards the rest. The service's
environment asks for the most talkative vLLM an operator could set up (DEBUG logging, response
logging): the job must still write no prompt and no reply to its output.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hpcside.config import load
from hpcside.launchers import LocalLauncher
from hpcside.reconcile import Scheduler
from hpcside.state import read_json
from tests.test_e2e_vllm import SMOLLM2_VLLM_ARGS, runtime

pytestmark = pytest.mark.vllm

MODEL = "smol"


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    python, model_dir = runtime()
    home = tmp_path_factory.mktemp("guard")
    state = home / "state"
    (home / "services.ini").write_text("\n".join([
        "[hpcside]", f"state_dir = {state}", "launcher = local", "min_interval = 0", "probe_timeout = 2s",
        f"python = {python}", "bind_host = 127.0.0.1", "endpoint_host = 127.0.0.1", "job_prefix = guardtest", "",
        "[service:smol]", f"model = {MODEL}", "template = vllm-cpu", f"model_path = {model_dir}",
        f"vllm_args = {SMOLLM2_VLLM_ARGS}", "max_model_len = 2048", "cpus = 2", "min_instances = 1",
        "max_instances = 1", "walltime = 30m",
        "renewal_margin = 5m", "readiness_timeout = 5m",
        "env = VLLM_LOGGING_LEVEL=DEBUG VLLM_DEBUG_LOG_API_SERVER_RESPONSE=true",
    ]) + "\n")
    config = load(home / "services.ini")
    scheduler = Scheduler(config)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            # Ready means the scheduler's own GET /health passed the guard: the probe sends the token.
            scheduler.reconcile(force=True)
            routing = read_json(state / "routing.json") or {}
            entries = (routing.get("models") or {}).get(MODEL)
            if entries:
                break
            time.sleep(1)
        else:
            logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in (state / "logs").glob("*.out"))
            raise AssertionError(f"vLLM never became ready:\n{logs}")
        yield {**entries[0], "state": state}
    finally:
        LocalLauncher(state).kill_all(config.settings.job_prefix)


def call(inst: dict[str, Any], method: str, path: str, token: str | None = None,
         body: dict[str, Any] | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(inst["url"] + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310 - loopback
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


PATHS = [("GET", "/health", None), ("GET", "/metrics", None), ("GET", "/v1/models", None),
         ("GET", "/version", None), ("POST", "/tokenize", {"model": MODEL, "prompt": "hello"}),
         ("POST", "/detokenize", {"model": MODEL, "tokens": [1, 2, 3]})]


@pytest.mark.parametrize("method,path,body", PATHS, ids=[p for _, p, _ in PATHS])
def test_every_path_of_vllm_needs_the_instance_token(instance: dict[str, Any], method: str, path: str,
                                                     body: dict[str, Any] | None) -> None:
    status, answer = call(instance, method, path, None, body)
    assert status == 401, (path, status, answer[:200])
    assert call(instance, method, path, "not-the-token", body)[0] == 401
    assert call(instance, method, path, instance["token"] + "x", body)[0] == 401
    status, answer = call(instance, method, path, instance["token"], body)
    assert status == 200, (path, status, answer[:200])


def test_the_job_output_holds_no_prompt_and_no_reply(instance: dict[str, Any]) -> None:
    canary = f"canary-{uuid.uuid4().hex[:12]}"
    prompt = f"Repeat this word exactly: {canary}"
    status, raw = call(instance, "POST", "/v1/chat/completions", instance["token"],
                       {"model": MODEL, "max_tokens": 24, "temperature": 0,
                        "messages": [{"role": "user", "content": prompt}]})
    assert status == 200, raw[:300]
    reply = json.loads(raw)["choices"][0]["message"]["content"]
    status, raw = call(instance, "POST", "/v1/completions", instance["token"],
                       {"model": MODEL, "max_tokens": 8, "prompt": f"{canary} says", "stream": True})
    assert status == 200 and b"data:" in raw
    time.sleep(1)  # let the job's output reach its file
    state: Path = instance["state"]
    outputs = list((state / "logs").glob("*.out"))
    text = b"".join(p.read_bytes() for p in outputs)
    # The output is vLLM's (DEBUG) log, with the guard among its non-default arguments...
    assert b"DEBUG" in text and b"hpcside_vllm_guard.TokenGuard" in text, text[-2000:]
    # ...and nothing of the request or the answer, anywhere in the state directory.
    for path in state.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert canary.encode() not in data, path
            if len(reply.strip()) >= 12:
                assert reply.strip().encode() not in data, path


def test_the_job_runs_vllm_with_priority_scheduling_and_a_request_may_carry_a_priority(
        instance: dict[str, Any]) -> None:
    """The template's --scheduling-policy priority (the service's default) reaches the real vLLM,
    which takes the priority the router writes into the body."""
    for priority in (7, -3):
        status, raw = call(instance, "POST", "/v1/chat/completions", instance["token"],
                           {"model": MODEL, "max_tokens": 4, "priority": priority,
                            "messages": [{"role": "user", "content": "Hi"}]})
        assert status == 200, raw[:300]
    text = b"".join(p.read_bytes() for p in (instance["state"] / "logs").glob("*.out"))
    assert b"'scheduling_policy': 'priority'" in text, text[-3000:]
