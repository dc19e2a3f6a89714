"""The services configuration: one INI file an operator edits to add a model.

INI because the login node has only the standard library (``tomllib`` needs 3.11) and
operators want comments. Every mistake is reported with the file, the section (service)
and the field, all at once, so one run of ``check-config`` shows everything to fix.
"""

from __future__ import annotations

import configparser
import datetime as dt
import os
import re
import shlex
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, TypeVar

SERVICE_PREFIX = "service:"
# Every pattern below is applied with ``fullmatch``: ``$`` alone also matches before a trailing
# newline, which would let "value\n" through into a job script or a request head.
SERVICE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# A served model id may look like a Hugging Face name ("org/Model-1.5B"): no spaces,
# no shell or path tricks, bounded.
MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/+-]{0,127}$")
SLURM_WORD_RE = re.compile(r"^[A-Za-z0-9_.,:=+-]{1,128}$")
# A feature expression (--constraint): names joined by & | , with optional [..] groups and *N counts.
CONSTRAINT_RE = re.compile(r"^[A-Za-z0-9_.\-]+(\*[0-9]+)?([&|,][A-Za-z0-9_.\-\[\]]+(\*[0-9]+)?)*$")
# Generic resources (--gres): name[:type][:count], comma-separated, e.g. "gpu:a100:2,nvme:1".
GRES_RE = re.compile(r"^[A-Za-z0-9_]+(:[A-Za-z0-9_.\-]+){0,2}(,[A-Za-z0-9_]+(:[A-Za-z0-9_.\-]+){0,2})*$")
SBATCH_OPTION_RE = re.compile(r"^--[a-z][a-z-]*(=[A-Za-z0-9_.,:=/+@%-]+)?$")
ENV_KEY_RE = re.compile(r"^[A-Z_][A-Z0-9_]*$")
BUILTIN_TEMPLATES = ("vllm-gpu", "vllm-cpu")
SCHEDULING_POLICY_RE = re.compile(r"^(priority|fcfs)$")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class ConfigError(Exception):
    """One or more mistakes; ``problems`` lists them as readable lines."""

    def __init__(self, problems: List[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# -- value parsers: each returns the value or raises ValueError with a reason ------------

_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d)?$")
_UNITS = {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds from "90", "90s", "5m", "2h", "1d" or Slurm's "[D-]HH:MM:SS" / "MM:SS"."""
    text = text.strip().lower()
    m = _DURATION_RE.fullmatch(text)
    if m:
        return float(m.group(1)) * _UNITS[m.group(2)]
    slurm = re.fullmatch(r"(?:(\d+)-)?(\d{1,2}):(\d{2})(?::(\d{2}))?", text)
    if slurm:
        days, a, b, c = slurm.groups()
        if c is None:  # MM:SS unless a day part makes it D-HH:MM
            hours, minutes, seconds = (0, int(a), int(b)) if days is None else (int(a), int(b), 0)
        else:
            hours, minutes, seconds = int(a), int(b), int(c)
        if minutes >= 60 or seconds >= 60:
            raise ValueError(f"{text!r} has minutes or seconds >= 60")
        return (int(days or 0) * 86400) + hours * 3600 + minutes * 60 + seconds
    raise ValueError(f"{text!r} is not a duration (examples: 90s, 5m, 2h, 1d, 02:00:00, 1-00:00:00)")


def slurm_time(seconds: float) -> str:
    """Slurm's --time value, rounded up to whole minutes (Slurm's own granularity)."""
    minutes = max(1, -(-int(seconds) // 60))
    days, rem = divmod(minutes, 1440)
    hours, mins = divmod(rem, 60)
    return f"{days}-{hours:02d}:{mins:02d}:00" if days else f"{hours:02d}:{mins:02d}:00"


_SIZE_UNITS = {"": 1, "k": 1024, "kib": 1024, "m": 1024**2, "mib": 1024**2, "g": 1024**3, "gib": 1024**3}


def parse_size(text: str) -> int:
    """Bytes from "65536", "512K", "64M", "64MiB" or "1G" (binary units)."""
    m = re.fullmatch(r"(\d+)\s*([A-Za-z]*)", text.strip())
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"{text.strip()!r} is not a size (examples: 65536, 512K, 64M, 1G)")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


def _size_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = parse_size(text)
        if value < minimum:
            raise ValueError(f"{text.strip()!r} is below the minimum of {minimum} bytes")
        return value

    return parse


def _duration_at_least(minimum: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = parse_duration(text)
        if value < minimum:
            raise ValueError(f"{text.strip()!r} is below the minimum of {minimum:g}s")
        return value

    return parse


def _parse_int(text: str, minimum: int = 0) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"{text.strip()!r} is not a whole number") from None
    if value < minimum:
        raise ValueError(f"{value} is below the minimum of {minimum}")
    return value


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "yes", "true", "on"):
        return True
    if low in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"{text.strip()!r} is not yes/no")


@dataclass(frozen=True)
class CapacityWindow:
    """During ``days`` between ``start`` and ``end`` (local time), keep min..max instances."""

    days: Tuple[int, ...]  # 0 = Monday
    start: dt.time
    end: Optional[dt.time]  # None means midnight (24:00)
    min_instances: int
    max_instances: Optional[int]
    text: str

    def active(self, when: dt.datetime) -> bool:
        if when.weekday() not in self.days:
            return False
        t = when.time()
        return self.start <= t and (self.end is None or t < self.end)


def _parse_days(text: str) -> Tuple[int, ...]:
    aliases = {"daily": "mon-sun", "weekdays": "mon-fri", "weekends": "sat-sun"}
    days: List[int] = []
    for part in aliases.get(text, text).split(","):
        if "-" in part:
            a, b = part.split("-", 1)
            if a not in DAYS or b not in DAYS:
                raise ValueError(f"unknown day range {part!r} (use mon..sun)")
            i, j = DAYS.index(a), DAYS.index(b)
            days += list(range(i, j + 1)) if i <= j else list(range(i, 7)) + list(range(0, j + 1))
        elif part in DAYS:
            days.append(DAYS.index(part))
        else:
            raise ValueError(f"unknown day {part!r} (use mon..sun, weekdays, weekends, daily)")
    return tuple(sorted(set(days)))


def _parse_clock(text: str) -> Optional[dt.time]:
    if text == "24:00":
        return None
    m = re.fullmatch(r"(\d{1,2}):(\d{2})", text)
    if not m or int(m.group(1)) > 23 or int(m.group(2)) > 59:
        raise ValueError(f"{text!r} is not a time of day HH:MM")
    return dt.time(int(m.group(1)), int(m.group(2)))


def parse_capacity(text: str) -> List[CapacityWindow]:
    """One window a line: ``mon-fri 08:00-18:00 min=2 [max=4]``."""
    windows = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) < 3:
            raise ValueError(f"{line!r}: expected 'DAYS HH:MM-HH:MM min=N [max=N]'")
        days = _parse_days(parts[0].lower())
        if "-" not in parts[1]:
            raise ValueError(f"{line!r}: {parts[1]!r} is not a range HH:MM-HH:MM")
        start_s, end_s = parts[1].split("-", 1)
        start, end = _parse_clock(start_s), _parse_clock(end_s)
        if start is None:
            raise ValueError(f"{line!r}: a window cannot start at 24:00")
        if end is not None and end <= start:
            raise ValueError(f"{line!r}: the end must be after the start (split windows over midnight)")
        opts: Dict[str, int] = {}
        for opt in parts[2:]:
            key, _, value = opt.partition("=")
            if key not in ("min", "max") or not value:
                raise ValueError(f"{line!r}: {opt!r} should be min=N or max=N")
            opts[key] = _parse_int(value)
        if "min" not in opts:
            raise ValueError(f"{line!r}: min=N is required")
        if "max" in opts and opts["max"] < opts["min"]:
            raise ValueError(f"{line!r}: max is below min")
        windows.append(CapacityWindow(days, start, end, opts["min"], opts.get("max"), line))
    return windows


# -- the configuration --------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    model: str  # the served model id clients ask for
    template: str  # builtin name or an absolute path to a template file
    model_path: str
    gpus: int = 0
    tensor_parallel_size: int = 1
    max_model_len: int = 4096
    vllm_args: Tuple[str, ...] = ()
    cpus: int = 1
    memory: str = ""
    partition: str = ""
    # Per-service Slurm options (account and qos override [hpcside]'s; gres replaces gpu:N).
    account: str = ""
    qos: str = ""
    reservation: str = ""
    constraint: str = ""
    gres: str = ""
    sbatch_args: Tuple[str, ...] = ()
    env: Tuple[Tuple[str, str], ...] = ()
    min_instances: int = 0
    max_instances: int = 1
    scale_up_inflight: int = 8
    # Requests of one session running at once on one instance with the same or a better priority
    # (twice that in all); more wait at the router, in priority order (hpcside/admission.py; the
    # default is explained in docs/hpcside.md).
    max_inflight: int = 64
    # vLLM's scheduling policy: "priority" (each request's fair-share priority reaches vLLM) or "fcfs".
    scheduling_policy: str = "priority"
    scale_down_delay: float = 300.0
    idle_timeout: float = 3600.0
    walltime: float = 86400.0
    renewal_margin: float = 1800.0
    readiness_timeout: float = 900.0
    unhealthy_grace: float = 30.0
    drain_timeout: float = 0.0  # 0: a draining instance waits for its last stream
    capacity: Tuple[CapacityWindow, ...] = ()

    def bounds_at(self, when: dt.datetime) -> Tuple[int, int]:
        """(min, max) instances in force at ``when``: the first active window wins."""
        for window in self.capacity:
            if window.active(when):
                high = window.max_instances if window.max_instances is not None else self.max_instances
                return max(self.min_instances, window.min_instances), max(high, window.min_instances)
        return self.min_instances, self.max_instances


def gpus_of(svc: ServiceConfig) -> int:
    """GPUs per job: the gpu entries of ``gres`` when set (it replaces ``gpus``), else ``gpus``."""
    if not svc.gres:
        return svc.gpus
    total = 0
    for entry in svc.gres.split(","):
        parts = entry.strip().split(":")  # gpu, gpu:2, gpu:a100, gpu:a100:2
        if parts[0] == "gpu":
            total += int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1
    return total


@dataclass(frozen=True)
class Settings:
    """The ``[hpcside]`` section: where state lives and how jobs are launched."""

    state_dir: Path
    launcher: str = "slurm"  # slurm | local
    job_prefix: str = "chatai"
    min_interval: float = 5.0
    probe_timeout: float = 2.0
    command_timeout: float = 20.0
    backoff_base: float = 30.0
    backoff_max: float = 1800.0
    bind_host: str = "0.0.0.0"
    endpoint_host: str = ""  # empty: the node's hostname, as the job sees it
    python: str = "python3"
    vllm: str = "vllm"
    partition: str = ""
    account: str = ""
    qos: str = ""
    sbatch_args: Tuple[str, ...] = ()
    timezone: str = ""
    hold_timeout: float = 600.0
    # Memory a session server may hold for request bodies (one key holder must not exhaust the
    # login node): all bodies of one session (being received, held or forwarded), the time a
    # body may take from REQUEST to END, and the bodies of requests held through a cold start.
    session_body_budget: int = 64 * 1024 * 1024
    body_timeout: float = 30.0
    held_body_budget: int = 32 * 1024 * 1024


@dataclass(frozen=True)
class Config:
    path: Path
    settings: Settings
    services: Dict[str, ServiceConfig] = field(default_factory=dict)

    def service_for_model(self, model: str) -> Optional[ServiceConfig]:
        for svc in self.services.values():
            if svc.model == model:
                return svc
        return None


T = TypeVar("T")
_NOT_REQUIRED = object()


class _Reader:
    """Reads typed fields from one section, collecting problems instead of stopping."""

    def __init__(self, path: Path, section: configparser.SectionProxy, label: str) -> None:
        self.path, self.section, self.label = path, section, label
        self.problems: List[str] = []
        self.used: set = set()

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{self.path}: [{self.label}] {key}: {message}")

    def get(self, key: str, parse: Callable[[str], T], default: T) -> T:
        self.used.add(key)
        if key not in self.section:
            return default
        try:
            return parse(self.section[key])
        except ValueError as exc:
            self.problem(key, str(exc))
            return default

    def required(self, key: str, parse: Callable[[str], T], default: T) -> T:
        if key not in self.section or not self.section[key].strip():
            self.used.add(key)
            self.problem(key, "is required")
            return default
        return self.get(key, parse, default)

    def unknown(self, known_defaults: configparser.SectionProxy) -> None:
        for key in self.section:
            if key not in self.used and key not in known_defaults:
                self.problem(key, "unknown field (misspelt?)")


def _pattern(regex: re.Pattern[str], what: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip()
        if not regex.fullmatch(value):
            raise ValueError(f"{value!r} is not a valid {what}")
        return value

    return parse


def _sbatch_args(text: str) -> Tuple[str, ...]:
    args = tuple(shlex.split(text))
    for arg in args:
        if not SBATCH_OPTION_RE.fullmatch(arg):
            raise ValueError(f"{arg!r} is not an sbatch option of the form --name=value")
    return args


def _vllm_args(text: str) -> Tuple[str, ...]:
    try:
        args = tuple(shlex.split(text))
    except ValueError as exc:
        raise ValueError(f"cannot split {text!r}: {exc}") from None
    for arg in args:
        if "\n" in arg or "\0" in arg:
            raise ValueError("arguments may not contain newlines")
        if arg.split("=", 1)[0] in ("--api-key", "--host", "--port"):
            raise ValueError(f"{arg!r} is set by hpcside (the token never goes on a command line)")
        if arg.split("=", 1)[0] in ("--enable-log-requests", "--enable-log-outputs"):
            raise ValueError(f"{arg!r}: jobs never log request or response content")
        if arg.split("=", 1)[0] == "--scheduling-policy":
            raise ValueError(f"{arg!r}: set scheduling_policy instead (the router must know it: vLLM "
                             "refuses a request's priority under fcfs)")
    return args


def _env(text: str) -> Tuple[Tuple[str, str], ...]:
    pairs = []
    for item in shlex.split(text):
        key, sep, value = item.partition("=")
        if not sep or not ENV_KEY_RE.fullmatch(key):
            raise ValueError(f"{item!r} is not NAME=value")
        if key == "VLLM_API_KEY":
            raise ValueError("VLLM_API_KEY is set by hpcside from the instance's own token")
        pairs.append((key, value))
    return tuple(pairs)


def _path(text: str) -> str:
    value = text.strip()
    if not value or "\n" in value or "\0" in value:
        raise ValueError("is not a path")
    return value


def _template(base: Path) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip()
        if value in BUILTIN_TEMPLATES:
            return value
        path = Path(value) if Path(value).is_absolute() else base / value
        if not path.is_file():
            raise ValueError(f"{value!r} is neither a built-in template ({', '.join(BUILTIN_TEMPLATES)}) nor a file")
        return str(path)

    return parse


def _memory(text: str) -> str:
    value = text.strip()
    if value and not re.fullmatch(r"\d+[KMGT]?", value):
        raise ValueError(f"{value!r} is not a Slurm memory size such as 64G")
    return value


def _timezone(text: str) -> str:
    value = text.strip()
    if value:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
    return value


# How each field of the file is read. The defaults are the dataclasses' own (written once, there);
# a required field is listed with the stand-in kept while its problem is reported.
_Parse = Callable[[str], Any]


class _Field(NamedTuple):
    parse: _Parse
    required_stand_in: Any = _NOT_REQUIRED


SETTINGS_FIELDS: Dict[str, _Field] = {
    "state_dir": _Field(_path, required_stand_in="."),
    "launcher": _Field(_pattern(re.compile(r"^(slurm|local)$"), "launcher (slurm or local)")),
    "job_prefix": _Field(_pattern(re.compile(r"^[a-z][a-z0-9-]{0,15}$"), "job prefix")),
    "min_interval": _Field(parse_duration),
    "probe_timeout": _Field(parse_duration),
    "command_timeout": _Field(parse_duration),
    "backoff_base": _Field(parse_duration),
    "backoff_max": _Field(parse_duration),
    "bind_host": _Field(_pattern(re.compile(r"^[0-9a-fA-F.:]+$"), "IP address")),
    "endpoint_host": _Field(_pattern(re.compile(r"^[A-Za-z0-9.:-]*$"), "host name")),
    "python": _Field(_path),
    "vllm": _Field(_path),
    "partition": _Field(_pattern(SLURM_WORD_RE, "partition")),
    "account": _Field(_pattern(SLURM_WORD_RE, "account")),
    "qos": _Field(_pattern(SLURM_WORD_RE, "qos")),
    "sbatch_args": _Field(_sbatch_args),
    "timezone": _Field(_timezone),
    "hold_timeout": _Field(parse_duration),
    "session_body_budget": _Field(_size_at_least(1024 * 1024)),
    "body_timeout": _Field(_duration_at_least(1.0)),
    "held_body_budget": _Field(_size_at_least(0)),
}


def _at_least(minimum: int) -> Callable[[str], int]:
    return lambda text: _parse_int(text, minimum)


def _service_fields(base: Path) -> Dict[str, _Field]:
    """``name`` comes from the section; ``model`` defaults to it (see load)."""
    return {
        "model": _Field(_pattern(MODEL_ID_RE, "model id")),
        "template": _Field(_template(base), required_stand_in="vllm-gpu"),
        "model_path": _Field(_path, required_stand_in=""),
        "gpus": _Field(_parse_int),
        "tensor_parallel_size": _Field(_at_least(1)),
        "max_model_len": _Field(_at_least(16)),
        "vllm_args": _Field(_vllm_args),
        "cpus": _Field(_at_least(1)),
        "memory": _Field(_memory),
        "partition": _Field(_pattern(SLURM_WORD_RE, "partition")),
        "account": _Field(_pattern(SLURM_WORD_RE, "account")),
        "qos": _Field(_pattern(SLURM_WORD_RE, "qos")),
        "reservation": _Field(_pattern(SLURM_WORD_RE, "reservation")),
        "constraint": _Field(_pattern(CONSTRAINT_RE, "constraint (features joined by & | ,)")),
        "gres": _Field(_pattern(GRES_RE, "gres (name[:type][:count], comma-separated)")),
        "sbatch_args": _Field(_sbatch_args),
        "env": _Field(_env),
        "min_instances": _Field(_parse_int),
        "max_instances": _Field(_at_least(1)),
        "scale_up_inflight": _Field(_at_least(1)),
        "max_inflight": _Field(_at_least(1)),
        "scheduling_policy": _Field(_pattern(SCHEDULING_POLICY_RE, "scheduling policy (priority or fcfs)")),
        "scale_down_delay": _Field(parse_duration),
        "idle_timeout": _Field(parse_duration),
        "walltime": _Field(parse_duration),
        "renewal_margin": _Field(parse_duration),
        "readiness_timeout": _Field(parse_duration),
        "unhealthy_grace": _Field(parse_duration),
        "drain_timeout": _Field(parse_duration),
        "capacity": _Field(lambda text: tuple(parse_capacity(text))),
    }


def field_default(f: Field[Any]) -> Any:
    """A dataclass field's default (MISSING for a field without one)."""
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def _read_fields(r: _Reader, cls: Any, how: Dict[str, _Field], given: Optional[Dict[str, Any]] = None,
                 defaults: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Every field of ``cls`` in declaration order (so problems come in the documented order):
    ``given`` ones as they are, the rest read from the section or left at their default (the
    dataclass's, or one from ``defaults`` that depends on the section)."""
    given, defaults = given or {}, defaults or {}
    values: Dict[str, Any] = {}
    for f in fields(cls):
        if f.name in given:
            values[f.name] = given[f.name]
            continue
        spec = how[f.name]
        if spec.required_stand_in is not _NOT_REQUIRED:
            values[f.name] = r.required(f.name, spec.parse, spec.required_stand_in)
        else:
            values[f.name] = r.get(f.name, spec.parse, defaults.get(f.name, field_default(f)))
    return values


def load(path: Path) -> Config:
    """Parse and validate; raise ConfigError naming file, service and field of every mistake."""
    path = Path(path)
    parser = configparser.ConfigParser(interpolation=None, default_section="__defaults__")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as exc:
        raise ConfigError([f"{path}: {' '.join(str(exc).split())}"]) from None

    problems: List[str] = []
    if "hpcside" not in parser:
        raise ConfigError([f"{path}: [hpcside] section is missing (it names state_dir and launcher)"])
    r = _Reader(path, parser["hpcside"], "hpcside")
    values = _read_fields(r, Settings, SETTINGS_FIELDS)
    state_dir = Path(os.path.expanduser(values["state_dir"]))
    values["state_dir"] = state_dir if state_dir.is_absolute() else path.parent / state_dir
    settings = Settings(**values)
    r.unknown(parser["__defaults__"])
    problems += r.problems

    services: Dict[str, ServiceConfig] = {}
    models: Dict[str, str] = {}
    for section in parser.sections():
        if section == "hpcside":
            continue
        if not section.startswith(SERVICE_PREFIX):
            problems.append(f"{path}: [{section}]: unknown section (services are [service:NAME])")
            continue
        name = section[len(SERVICE_PREFIX):]
        label = section
        if not SERVICE_NAME_RE.fullmatch(name):
            problems.append(f"{path}: [{label}]: service name must be letters, digits, '.', '_' or '-'")
            continue
        s = _Reader(path, parser[section], label)
        svc = ServiceConfig(**_read_fields(s, ServiceConfig, _service_fields(path.parent), given={"name": name},
                                           defaults={"model": name}))
        model = svc.model
        if svc.min_instances > svc.max_instances:
            s.problem("min_instances", f"{svc.min_instances} is above max_instances ({svc.max_instances})")
        if svc.tensor_parallel_size > max(svc.gpus, 1) and svc.gpus:
            s.problem("tensor_parallel_size", f"{svc.tensor_parallel_size} is more than gpus ({svc.gpus})")
        if svc.walltime < 120:
            s.problem("walltime", "must be at least 2 minutes")
        elif svc.renewal_margin >= svc.walltime:
            s.problem("renewal_margin", "must be shorter than walltime")
        if svc.template == "vllm-gpu" and svc.gpus < 1:
            s.problem("gpus", "the vllm-gpu template needs gpus >= 1 (or use template = vllm-cpu)")
        if model in models:
            s.problem("model", f"{model!r} is already served by [service:{models[model]}]")
        models[model] = name
        s.unknown(parser["__defaults__"])
        problems += s.problems
        services[name] = svc
    if problems:
        raise ConfigError(problems)
    return Config(path=path, settings=settings, services=services)
