"""The services file: parsed, and every mistake named by file, service and field."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from pathlib import Path
from typing import Any

import pytest

from hpcside.config import (
    SETTINGS_FIELDS,
    ConfigError,
    ServiceConfig,
    Settings,
    _service_fields,
    field_default,
    load,
    parse_capacity,
    parse_duration,
    slurm_time,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "hpcside" / "examples" / "services.ini"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "services.ini"
    path.write_text(text)
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load(path)
    return err.value.problems


GOOD = """
[hpcside]
state_dir = state
launcher = local

[service:small]
model = org/Small-1B
template = vllm-cpu
model_path = /models/small
"""


def test_the_shipped_example_is_valid() -> None:
    config = load(EXAMPLE)
    svc = config.services["llama-3.1-8b-instruct"]
    assert svc.model == "meta-llama/Llama-3.1-8B-Instruct"
    assert svc.walltime == 2 * 86400 and svc.renewal_margin == 1800
    assert svc.capacity[0].min_instances == 2
    assert svc.vllm_args == ("--enable-prefix-caching", "--gpu-memory-utilization", "0.9")


def test_a_relative_state_dir_is_beside_the_config(tmp_path: Path) -> None:
    config = load(write(tmp_path, GOOD))
    assert config.settings.state_dir == tmp_path / "state"
    assert config.service_for_model("org/Small-1B") is config.services["small"]


def test_every_mistake_is_named_with_file_service_and_field(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + """
gpus = two
min_instances = 5
max_instances = 2
walltime = forever
capacity = mon-fri 08:00-18:00 many=2
colour = blue

[service:bad name]
model = x
""")
    found = problems(path)
    assert f"{path}: [service:small] gpus: 'two' is not a whole number" in found
    assert f"{path}: [service:small] min_instances: 5 is above max_instances (2)" in found
    assert any("[service:small] walltime: 'forever' is not a duration" in p for p in found)
    assert any("[service:small] capacity:" in p and "min=N or max=N" in p for p in found)
    assert f"{path}: [service:small] colour: unknown field (misspelt?)" in found
    assert any("[service:bad name]" in p for p in found)


def test_required_fields_and_sections_are_reported(tmp_path: Path) -> None:
    assert problems(write(tmp_path, "[service:x]\nmodel = x\n")) == [
        f"{tmp_path / 'services.ini'}: [hpcside] section is missing (it names state_dir and launcher)"]
    found = problems(write(tmp_path, "[hpcside]\nstate_dir = s\n[service:x]\n"))
    assert any("[service:x] template: is required" in p for p in found)
    assert any("[service:x] model_path: is required" in p for p in found)


def test_a_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    (found,) = problems(write(tmp_path, "[hpcside]\nstate_dir = s\nthis line has no equals\n"))
    assert str(tmp_path / "services.ini") in found and "line" in found


def test_an_unreadable_file_says_so(tmp_path: Path) -> None:
    (found,) = problems(tmp_path / "missing.ini")
    assert "cannot read" in found


def test_the_token_and_port_cannot_be_set_in_vllm_args(tmp_path: Path) -> None:
    found = problems(write(tmp_path, GOOD + "vllm_args = --api-key=secret\n"))
    assert any("vllm_args" in p and "never goes on a command line" in p for p in found)
    found = problems(write(tmp_path, GOOD + "vllm_args = --max-num-seqs=8 --enable-log-requests\n"))
    assert any("vllm_args" in p and "never log request" in p for p in found)
    found = problems(write(tmp_path, GOOD + "env = VLLM_API_KEY=x\n"))
    assert any("[service:small] env:" in p for p in found)


def test_admission_and_scheduling_options_are_validated_naming_the_field(tmp_path: Path) -> None:
    svc = load(write(tmp_path, GOOD + "max_inflight = 2\nscheduling_policy = fcfs\n")).services["small"]
    assert (svc.max_inflight, svc.scheduling_policy) == (2, "fcfs")
    found = problems(write(tmp_path, GOOD + "max_inflight = 0\nscheduling_policy = lifo\n"))
    assert any(p.endswith("[service:small] max_inflight: 0 is below the minimum of 1") for p in found), found
    assert any("[service:small] scheduling_policy: 'lifo' is not a valid scheduling policy (priority or fcfs)" in p
               for p in found), found
    found = problems(write(tmp_path, GOOD + "max_inflight = two\n"))
    assert any("[service:small] max_inflight: 'two' is not a whole number" in p for p in found), found
    # The router must know the policy (vLLM refuses a request's priority under fcfs): not in vllm_args.
    found = problems(write(tmp_path, GOOD + "vllm_args = --scheduling-policy=fcfs\n"))
    assert any("[service:small] vllm_args:" in p and "set scheduling_policy instead" in p for p in found), found
    found = problems(write(tmp_path, GOOD + "vllm_args = --scheduling-policy fcfs\n"))
    assert any("[service:small] vllm_args:" in p for p in found), found


def test_hostile_slurm_values_are_refused(tmp_path: Path) -> None:
    found = problems(write(tmp_path, GOOD + "partition = gpu\n  --wrap=id\nsbatch_args = --wrap='rm -rf /'\n"))
    assert any("[service:small] partition" in p for p in found)
    assert any("[service:small] sbatch_args" in p for p in found)


def test_an_env_key_with_a_newline_is_a_config_error_naming_the_field(tmp_path: Path) -> None:
    # An INI continuation line puts a newline inside the quoted word: "FOO\n=bar".
    found = problems(write(tmp_path, GOOD + 'env = "FOO\n  =bar"\n'))
    assert any(p.startswith(f"{tmp_path / 'services.ini'}: [service:small] env:") for p in found), found


def test_an_sbatch_option_with_a_trailing_newline_is_refused(tmp_path: Path) -> None:
    found = problems(write(tmp_path, GOOD + 'sbatch_args = "--constraint=a100\n  "\n'))
    assert any("[service:small] sbatch_args" in p for p in found), found
    found = problems(write(tmp_path, GOOD.replace("launcher = local", 'sbatch_args = "--qos=x\n  "')))
    assert any("[hpcside] sbatch_args" in p for p in found), found


def test_session_memory_bounds_have_safe_defaults_and_are_validated(tmp_path: Path) -> None:
    settings = load(write(tmp_path, GOOD)).settings
    assert settings.session_body_budget == 64 * 1024 * 1024 and settings.body_timeout == 30
    assert settings.held_body_budget == 32 * 1024 * 1024
    text = GOOD.replace("launcher = local", "launcher = local\nsession_body_budget = 128M\nbody_timeout = 1m\n"
                                            "held_body_budget = 512K")
    settings = load(write(tmp_path, text)).settings
    got = (settings.session_body_budget, settings.body_timeout, settings.held_body_budget)
    assert got == (128 << 20, 60, 512 << 10)
    text = GOOD.replace("launcher = local", "launcher = local\nsession_body_budget = 1000\nbody_timeout = 0s\n"
                                            "held_body_budget = lots")
    found = problems(write(tmp_path, text))
    for field in ("session_body_budget", "body_timeout", "held_body_budget"):
        assert any(f"[hpcside] {field}:" in p for p in found), (field, found)


def test_two_services_cannot_serve_the_same_model(tmp_path: Path) -> None:
    text = GOOD + GOOD.split("\n", 5)[5].replace("[service:small]", "[service:other]")
    found = problems(write(tmp_path, text))
    assert any("[service:other] model: 'org/Small-1B' is already served by [service:small]" in p for p in found)


@pytest.mark.parametrize("text,seconds", [
    ("90", 90), ("90s", 90), ("5m", 300), ("2h", 7200), ("1d", 86400), ("01:30:00", 5400),
    ("1-00:00:00", 86400), ("30:00", 1800), ("2-12:00", 216000),
])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_slurm_time_rounds_up_to_minutes() -> None:
    assert slurm_time(90) == "00:02:00"
    assert slurm_time(86400 * 2 + 60) == "2-00:01:00"


def test_capacity_windows_apply_on_their_days_and_hours() -> None:
    (w,) = parse_capacity("weekdays 08:00-18:00 min=2 max=4")
    assert w.active(dt.datetime(2026, 11, 23, 8, 0))  # Monday
    assert not w.active(dt.datetime(2026, 11, 23, 18, 0))
    assert not w.active(dt.datetime(2026, 11, 28, 12, 0))  # Saturday
    (night,) = parse_capacity("fri-mon 20:00-24:00 min=1")
    assert night.days == (0, 4, 5, 6)
    assert night.active(dt.datetime(2026, 11, 23, 23, 59))


@pytest.mark.parametrize("bad", [
    "mon-fri 18:00-08:00 min=1", "someday 08:00-18:00 min=1", "mon 8-18 min=1", "mon 08:00-18:00",
    "mon 08:00-18:00 min=3 max=1", "mon 25:00-26:00 min=1",
])
def test_bad_capacity_windows_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_capacity(bad)


# -- defaults written once: in the dataclasses; load() and docs/hpcside.md follow them ------------

DOCS = Path(__file__).resolve().parent.parent / "docs" / "hpcside.md"
EMPTY = ("empty", "-", "none", "login node's")  # what the docs write for an empty default


def docs_defaults(heading: str) -> dict[str, str]:
    """field -> the default as docs/hpcside.md writes it, from the table after ``heading``."""
    text = DOCS.read_text()
    rows = text[text.index(heading):].split("\n\n", 2)[1].splitlines()[2:]
    out: dict[str, str] = {}
    for row in rows:
        names_cell, default_cell = row.split("|")[1:3]
        names = re.findall(r"`([a-z_]+)`", names_cell)
        values = [v.strip().strip("`") for v in default_cell.split(",")]
        values = values if len(values) == len(names) else values * len(names)
        out.update(zip(names, values, strict=True))
    return out


@pytest.mark.parametrize("cls, heading, how", [
    (Settings, "`[hpcside]` (global):", SETTINGS_FIELDS),
    (ServiceConfig, "`[service:NAME]` (NAME:", _service_fields(Path("/"))),
])
def test_the_documented_defaults_are_the_dataclass_defaults(cls: Any, heading: str, how: dict) -> None:
    documented = docs_defaults(heading)
    fields_ = {f.name: f for f in dataclasses.fields(cls) if f.name != "name"}
    assert set(documented) == set(fields_), "docs/hpcside.md documents other fields than the dataclass has"
    for name, f in fields_.items():
        text, default = documented[name], field_default(f)
        if default is dataclasses.MISSING or name in ("state_dir", "model"):
            assert text in ("required", "NAME"), (name, text)
        elif text in EMPTY:
            assert not default, (name, default)
        else:
            assert how[name].parse(text.split()[0].strip("`")) == default, (name, text, default)


def test_every_field_is_read_from_the_file_and_defaults_come_from_the_dataclass(tmp_path: Path) -> None:
    assert set(SETTINGS_FIELDS) == {f.name for f in dataclasses.fields(Settings)}
    assert set(_service_fields(tmp_path)) == {f.name for f in dataclasses.fields(ServiceConfig)} - {"name"}
    config = load(write(tmp_path, "[hpcside]\nstate_dir = s\n\n[service:x]\ntemplate = vllm-cpu\nmodel_path = /m\n"))
    for f in dataclasses.fields(Settings):
        if f.name != "state_dir":
            assert getattr(config.settings, f.name) == field_default(f), f.name
    svc = config.services["x"]
    assert svc.model == "x"
    for f in dataclasses.fields(ServiceConfig):
        if f.name not in ("name", "model", "template", "model_path"):
            assert getattr(svc, f.name) == field_default(f), f.name
