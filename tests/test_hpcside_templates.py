"""Rendered job scripts, checked against golden files.

If a change to a template is intended, delete the golden file (or run with
UPDATE_GOLDEN=1) and review the new one in the diff.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from hpcside.config import load
from hpcside.templates import JobFiles, TemplateError, fill, install_guard, render

GOLDEN = Path(__file__).resolve().parent / "golden"
CONFIG = """
[hpcside]
state_dir = /home/chatai/state
partition = gpu
account = proj42
qos = service
vllm = /opt/vllm/bin/vllm
python = /opt/vllm/bin/python3
sbatch_args = --exclusive

[service:llama]
model = meta-llama/Llama-3.1-8B-Instruct
template = vllm-gpu
model_path = /models/Llama 3.1 (8B)
gpus = 2
tensor_parallel_size = 2
max_model_len = 16384
vllm_args = --enable-prefix-caching --chat-template '/x/my template.jinja'
cpus = 8
memory = 64G
walltime = 1-00:00:00
env = HF_HOME=/scratch/hf NCCL_DEBUG=WARN
qos = llm-high
reservation = llm-service
constraint = a100&ib
gres = gpu:a100:2

[service:smol]
model = smollm2-135m
template = vllm-cpu
model_path = /var/models/smollm2
max_model_len = 2048
cpus = 2
walltime = 2h
"""


@pytest.fixture
def config(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "services.ini"
    path.write_text(CONFIG)
    return load(path)


@pytest.mark.parametrize("service,golden", [("llama", "vllm-gpu.sbatch"), ("smol", "vllm-cpu.sbatch")])
def test_rendered_script_matches_the_golden_file(config, service: str, golden: str) -> None:  # type: ignore[no-untyped-def]
    script = render(config.services[service], config.settings, JobFiles(config.settings.state_dir, "a1b2c3d4e5f6"))
    path = GOLDEN / golden
    if os.environ.get("UPDATE_GOLDEN") or not path.exists():
        path.write_text(script)
    assert script == path.read_text()


def test_rendered_scripts_are_valid_bash(config) -> None:  # type: ignore[no-untyped-def]
    for svc in config.services.values():
        script = render(svc, config.settings, JobFiles(config.settings.state_dir, "a1b2c3d4e5f6"))
        proc = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr


def test_the_token_never_appears_on_the_command_line(config) -> None:  # type: ignore[no-untyped-def]
    script = render(config.services["llama"], config.settings, JobFiles(config.settings.state_dir, "a1b2c3d4e5f6"))
    exec_line = script[script.index("exec "):]
    assert "api-key" not in exec_line and "VLLM_API_KEY" not in exec_line
    assert 'VLLM_API_KEY="$(cat /home/chatai/state/secrets/a1b2c3d4e5f6.token)"' in script


def test_hostile_values_stay_inert_when_the_script_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "services.ini"
    path.write_text(f"""
[hpcside]
state_dir = {tmp_path}/state
python = python3
vllm = echo

[service:x]
template = vllm-gpu
gpus = 1
model_path = $(touch {marker})`touch {marker}`;touch {marker}
vllm_args = '; touch {marker}' "$(touch {marker})"
""")
    config = load(path)
    files = JobFiles(tmp_path / "state", "a1b2c3d4e5f6")
    for sub in ("secrets", "endpoints"):
        (tmp_path / "state" / sub).mkdir(parents=True, exist_ok=True)
    files.token.write_text("tok\n")
    install_guard(tmp_path / "state")  # as the scheduler does before it submits
    script = render(config.services["x"], config.settings, files)
    # vllm = echo: the "server" prints its argv, which must hold the values literally.
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=False, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()
    assert f"$(touch {marker})`touch {marker}`;touch {marker}" in proc.stdout
    assert (tmp_path / "state" / "endpoints" / "a1b2c3d4e5f6.json").exists()
    # The token guard and request logging explicitly off (no vLLM beside this python: today's flag).
    assert "--middleware hpcside_vllm_guard.TokenGuard --no-enable-log-requests" in proc.stdout


def test_request_logging_is_turned_off_with_the_flag_the_installed_vllm_knows(tmp_path: Path) -> None:
    from hpcside.vllm_guard import request_log_flag

    def vllm_with(source: str) -> Path:
        pkg = tmp_path / f"v{len(list(tmp_path.iterdir()))}" / "vllm"
        (pkg / "engine").mkdir(parents=True)
        (pkg / "engine" / "arg_utils.py").write_text(source)
        return pkg

    old = vllm_with('parser.add_argument("--disable-log-requests", action="store_true")\n')
    both = vllm_with('"--enable-log-requests", ... "--disable-log-requests", deprecated=True\n')
    new = vllm_with('parser.add_argument("--enable-log-requests", action=argparse.BooleanOptionalAction)\n')
    assert request_log_flag(old) == "--disable-log-requests"
    assert request_log_flag(both) == request_log_flag(new) == "--no-enable-log-requests"
    assert request_log_flag(tmp_path / "nowhere") == "--no-enable-log-requests"  # unknown: never silent


def test_an_unknown_placeholder_is_an_error() -> None:
    with pytest.raises(TemplateError, match="unknown placeholder"):
        fill("{{ nope }}", {"model": "x"})


def test_per_service_slurm_options_reach_the_job_header(config) -> None:  # type: ignore[no-untyped-def]
    from hpcside.templates import sbatch_header

    llama = sbatch_header(config.services["llama"], config.settings).splitlines()
    assert "#SBATCH --qos=llm-high" in llama and "#SBATCH --qos=service" not in llama  # the service's own
    assert "#SBATCH --account=proj42" in llama  # [hpcside]'s, as the service names none
    assert {"#SBATCH --reservation=llm-service", "#SBATCH --constraint=a100&ib",
            "#SBATCH --gres=gpu:a100:2"} <= set(llama)
    assert "#SBATCH --gres=gpu:2" not in llama  # gres replaces what gpus would ask for
    smol = sbatch_header(config.services["smol"], config.settings)
    assert "--qos=service" in smol and "--reservation" not in smol and "--gres" not in smol


@pytest.mark.parametrize("field, value", [
    ("account", "proj 42"), ("qos", "high\n  --uid=0"), ("reservation", "r;rm -rf"),
    ("constraint", "a100 && ib"), ("constraint", "a100\n  ib"), ("gres", "gpu:a100:2:x"), ("gres", "gpu=2"),
])
def test_a_bad_slurm_option_is_a_config_error_naming_the_field(tmp_path: Path, field: str, value: str) -> None:
    from hpcside.config import ConfigError

    path = tmp_path / "services.ini"  # an indented next line continues the value, as configparser reads it
    path.write_text("[hpcside]\nstate_dir = s\n\n[service:x]\ntemplate = vllm-cpu\nmodel_path = /m\n"
                    f"{field} = {value}\n")
    with pytest.raises(ConfigError) as err:
        load(path)
    assert f"[service:x] {field}:" in str(err.value), str(err.value)


def test_priority_scheduling_reaches_vllm_unless_the_service_asks_for_fcfs(config) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    files = JobFiles(config.settings.state_dir, "a1b2c3d4e5f6")
    for name in ("llama", "smol"):
        svc = config.services[name]
        assert svc.scheduling_policy == "priority"  # the default
        assert "--scheduling-policy priority" in render(svc, config.settings, files)
        fcfs = render(dataclasses.replace(svc, scheduling_policy="fcfs"), config.settings, files)
        assert "--scheduling-policy" not in fcfs  # vLLM's default: no flag, so older vLLMs run it too
        subprocess.run(["bash", "-n"], input=fcfs, text=True, check=True)
