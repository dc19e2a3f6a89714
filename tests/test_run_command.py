"""The run command (scripts/run.sh) and the management command behind it (manage.py embedded).

The last test runs scripts/run.sh itself, as a newcomer would, with the real vLLM and SmolLM2
that scripts/test.sh prepared: ready, answers, and Ctrl-C leaves nothing running.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.slurm import free_port
from tests.live import ROOT, SUPPORT
from tests.test_e2e_vllm import runtime


@pytest.fixture
def data_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="chatai-run-") as tmp:
        yield Path(tmp)


def env_for(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "REDIS", "HPC", "DJANGO", "OIDC"))}
    env.update({"CHATAI_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"})
    return env


def manage(data_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env_for(data_dir),
                          capture_output=True, text=True, timeout=120, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"manage.py {' '.join(args)}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_setup_writes_the_services_file_and_prints_the_login_once(data_dir: Path) -> None:
    model = data_dir / "model"
    model.mkdir()
    manage(data_dir, "migrate", "--no-input", "-v", "0")
    first = manage(data_dir, "embedded", "setup", "--vllm-python", sys.executable, "--model-dir", str(model)).stdout
    password = re.search(r"password\s+(\S+)", first)
    assert password and "user      admin" in first, first
    services = (data_dir / "hpcside" / "services.ini").read_text()
    assert "template = vllm-cpu" in services and f"model_path = {model}" in services
    assert f"python = {sys.executable}" in services and "launcher = local" in services
    # The password works, and is written nowhere.
    check = manage(data_dir, "shell", "-c", "from django.contrib.auth import authenticate; "
                   f"print(authenticate(username='admin', password={password.group(1)!r}) is not None)")
    assert check.stdout.strip().splitlines()[-1] == "True"
    for path in data_dir.rglob("*"):
        if path.is_file():
            assert password.group(1).encode() not in path.read_bytes(), path

    second = manage(data_dir, "embedded", "setup", "--vllm-python", sys.executable, "--model-dir", str(model)).stdout
    assert "password" not in second.replace("password was printed", "").replace("changepassword", ""), second
    assert "admin" in second


def test_setup_keeps_an_operators_own_file_and_names_what_is_wrong(data_dir: Path) -> None:
    manage(data_dir, "migrate", "--no-input", "-v", "0")
    missing = manage(data_dir, "embedded", "setup", "--vllm-python", sys.executable,
                     "--model-dir", str(data_dir / "nowhere"), check=False)
    assert missing.returncode != 0 and "--model-dir" in missing.stderr
    own = data_dir / "hpcside" / "services.ini"
    own.parent.mkdir()
    own.write_text("[hpcside]\nstate_dir = /tmp/x\nlauncher = local\nmin_interval = soon\n")
    broken = manage(data_dir, "embedded", "setup", "--vllm-python", sys.executable, "--model-dir", str(data_dir),
                    check=False)
    assert broken.returncode != 0 and "min_interval" in broken.stderr, broken.stderr
    assert "min_interval = soon" in own.read_text()  # left as the operator wrote it


def test_warm_waits_for_the_instance_and_stop_kills_it(data_dir: Path) -> None:
    """warm and stop on the local launcher, with the stub standing in for vLLM (a file of the
    operator's own, which setup leaves alone)."""
    manage(data_dir, "migrate", "--no-input", "-v", "0")
    own = data_dir / "hpcside" / "services.ini"
    own.parent.mkdir()
    own.write_text(f"""[hpcside]
state_dir = {data_dir}/hpcside/state
launcher = local
min_interval = 0
python = {sys.executable}
bind_host = 127.0.0.1
endpoint_host = 127.0.0.1

[service:smollm2]
model = SmolLM2-135M-Instruct
template = {SUPPORT / "stub.sh"}
model_path = {SUPPORT / "stub_vllm.py"}
env = STUB_MODE=slow:2
min_instances = 1
walltime = 1h
renewal_margin = 5m
""")
    try:
        warm = manage(data_dir, "embedded", "warm", "--timeout", "60").stdout
        assert "loading the model" in warm and "SmolLM2-135M-Instruct ready in" in warm, warm
    finally:  # the instance is stopped even when warm failed
        stop = manage(data_dir, "embedded", "stop", check=False).stdout
    assert "stopped 1 model instance" in stop, stop
    status = json.loads(subprocess.run([sys.executable, "-m", "hpcside", "--config", str(own), "status", "--json"],
                                       cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    port = re.search(r"ready in \d+ s \(http://127\.0\.0\.1:(\d+)\)", warm)
    assert port, warm
    # This test's instance only: other tests (in parallel, say) run stubs of their own.
    pids = [p for p in subprocess.run(["pgrep", "-f", f"{SUPPORT / 'stub_vllm.py'} --host 127.0.0.1 --port "
                                       f"{port.group(1)} "], capture_output=True, text=True,
                                      check=False).stdout.split()]
    assert not pids, (pids, status)


def start_in_own_group(argv: list[str], **kwargs: object) -> subprocess.Popen:  # type: ignore[type-arg]
    """Start a command as a terminal would: its own process group, SIGINT at its default.

    A suite started as a background job (``cmd &``) runs with SIGINT ignored, and an ignored
    signal is inherited: bash then cannot trap it, and Ctrl-C (SIGINT to the group) would do nothing.
    """
    return subprocess.Popen(argv, start_new_session=True,  # type: ignore[call-overload]
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)


def test_ctrl_c_reaches_the_command_even_when_the_suite_ignores_sigint() -> None:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under `pytest &`
    try:
        proc = start_in_own_group(["bash", "-c", "trap 'exit 130' INT; echo up; while :; do sleep 0.1; done"],
                                  stdout=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=10) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def chat_in_the_browser(url: str, password: str) -> None:
    """Sign in with the printed login and ask the real model in the chat page (Chromium)."""
    from playwright import sync_api

    from tests.test_browser import ARTIFACTS, launch_chromium, wait_js

    with sync_api.sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            page.set_default_timeout(60_000)
            page.goto(url + "/")
            page.fill("#id_username", "admin")
            page.fill("#id_password", password)
            page.click("button[type=submit]")
            page.wait_for_selector("#prompt")
            # A 135M model rambles at the default 0.7; this conversation's own setting, as a user sets it.
            page.click("#settings-toggle")
            page.fill("#temperature", "0")
            page.click("#settings-toggle")
            page.fill("#prompt", "What is the capital of France?")
            page.keyboard.press("Enter")
            ARTIFACTS.mkdir(exist_ok=True)
            try:
                wait_js(page, "(() => { const r = document.querySelectorAll('#messages li.msg.assistant');"
                              " return r.length > 0 && r[r.length - 1].textContent.includes('Paris')"
                              " && !document.querySelector('#send').hidden; })()", timeout=120)
            finally:
                page.screenshot(path=str(ARTIFACTS / "run-command-real-model.png"))
        finally:
            browser.close()


@pytest.mark.vllm  # slow: loads the real model
@pytest.mark.browser
@pytest.mark.live
def test_the_run_command_serves_the_real_model_and_ctrl_c_stops_everything(data_dir: Path) -> None:
    runtime()  # the vLLM environment and the model, prepared by scripts/test.sh
    port = free_port()
    env = {**env_for(data_dir), "CHATAI_PORT": str(port)}
    out = open(data_dir / "run.log", "w+b")  # noqa: SIM115 - read while the command runs
    proc = start_in_own_group(["bash", "scripts/run.sh"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        text = ""
        while "Chat AI is ready" not in text:
            assert proc.poll() is None and time.monotonic() < deadline, text[-3000:]
            time.sleep(0.5)
            text = (data_dir / "run.log").read_text(errors="replace")
        password = re.search(r"password\s+(\S+)", text)
        assert password and f"http://127.0.0.1:{port}/" in text, text
        key = re.search(r"^(cai-\S+)$", manage(data_dir, "apikey", "create", "admin", "--name", "t").stdout, re.M)
        assert key

        import openai

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key.group(1), max_retries=0,
                               timeout=120)
        question = [{"role": "user", "content": "What is the capital of France?"}]
        answer = client.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0, max_tokens=40,
                                                messages=question)  # type: ignore[arg-type]
        assert "Paris" in (answer.choices[0].message.content or ""), answer
        chat_in_the_browser(f"http://127.0.0.1:{port}", password.group(1))
        ports: list[str] = re.findall(r"ready in \d+ s \(http://127\.0\.0\.1:(\d+)\)", text)
        assert ports, text
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the terminal's whole process group
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            code = None
        out.close()
        if code is None:  # Ctrl-C did not stop it: stop everything it started, then fail
            os.killpg(proc.pid, signal.SIGKILL)  # run.sh and daphne (one process group)
            proc.wait()
            manage(data_dir, "embedded", "stop", check=False)  # the model's instances (their own sessions)
    assert code == 130
    log = (data_dir / "run.log").read_text(errors="replace")
    assert "stopped 1 model instance" in log, log[-2000:]
    left = subprocess.run(["pgrep", "-f", f"vllm.entrypoints.*--port {ports[0]}"], capture_output=True, text=True,
                          check=False).stdout.split()
    daphne = subprocess.run(["pgrep", "-f", f"daphne -b 127.0.0.1 -p {port}"], capture_output=True, text=True,
                            check=False).stdout.split()
    assert not left and not daphne, (left, daphne)
