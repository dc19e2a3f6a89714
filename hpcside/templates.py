"""Job templates: ``{{ name }}`` placeholders filled with shell-quoted values.

Every value from the configuration passes through ``shlex.quote``; the only unquoted
insertions are blocks this module builds itself from validated pieces (the #SBATCH
header, the export lines, the vLLM argument list). An unknown placeholder is an error.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

from .config import ServiceConfig, Settings, slurm_time
from .state import write_atomic

JOBS_DIR = Path(__file__).resolve().parent / "jobs"
GUARD_SOURCE = Path(__file__).resolve().parent / "vllm_guard.py"
GUARD_DIR = "pylib"  # in the state directory: only the guard, as hpcside_vllm_guard.py
_PLACEHOLDER = re.compile(r"\{\{\s*([a-z_]+)\s*\}\}")


class TemplateError(Exception):
    pass


@dataclass(frozen=True)
class JobFiles:
    """Where one instance's files live in the state directory."""

    state_dir: Path
    iid: str

    @property
    def script(self) -> Path:
        return self.state_dir / "jobs" / f"{self.iid}.sh"

    @property
    def token(self) -> Path:
        return self.state_dir / "secrets" / f"{self.iid}.token"

    @property
    def endpoint(self) -> Path:
        return self.state_dir / "endpoints" / f"{self.iid}.json"

    @property
    def output(self) -> Path:
        return self.state_dir / "logs" / f"{self.iid}.out"

    @property
    def guard_dir(self) -> Path:
        return self.state_dir / GUARD_DIR


def template_text(name: str) -> str:
    path = JOBS_DIR / f"{name}.sh" if "/" not in name else Path(name)
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TemplateError(f"cannot read template {path}: {exc.strerror}") from None


def sbatch_header(svc: ServiceConfig, settings: Settings) -> str:
    """Resource requests as #SBATCH lines; every value was validated by the config."""
    lines = [f"#SBATCH --time={slurm_time(svc.walltime)}", f"#SBATCH --cpus-per-task={svc.cpus}"]
    if svc.gres:
        lines.append(f"#SBATCH --gres={svc.gres}")
    elif svc.gpus:
        lines.append(f"#SBATCH --gres=gpu:{svc.gpus}")
    if svc.memory:
        lines.append(f"#SBATCH --mem={svc.memory}")
    partition = svc.partition or settings.partition
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    for option, value in (("account", svc.account or settings.account), ("qos", svc.qos or settings.qos),
                          ("reservation", svc.reservation), ("constraint", svc.constraint)):
        if value:
            lines.append(f"#SBATCH --{option}={value}")
    # Signal the batch shell 60 s before walltime so vLLM can stop cleanly.
    lines.append("#SBATCH --signal=B:TERM@60")
    lines += [f"#SBATCH {arg}" for arg in (*settings.sbatch_args, *svc.sbatch_args)]
    return "\n".join(lines)


def fill(text: str, values: Dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise TemplateError(f"unknown placeholder {{{{ {key} }}}} (known: {', '.join(sorted(values))})")
        return values[key]

    return _PLACEHOLDER.sub(replace, text)


def install_guard(state_dir: Path) -> Path:
    """Copy the token guard where jobs import it from (``pylib/hpcside_vllm_guard.py``), if changed.

    Its own directory on the job's PYTHONPATH: the hpcside package's parent (often the account's
    home) could hold anything that would shadow vLLM's imports."""
    target = state_dir / GUARD_DIR / "hpcside_vllm_guard.py"
    source = GUARD_SOURCE.read_text(encoding="utf-8")
    try:
        if target.read_text(encoding="utf-8") == source:
            return target
    except OSError:
        pass
    target.parent.mkdir(mode=0o700, exist_ok=True)
    write_atomic(target, source)
    return target


def render(svc: ServiceConfig, settings: Settings, files: JobFiles) -> str:
    q = shlex.quote
    exports: List[str] = [f"export {key}={q(value)}" for key, value in svc.env]
    values = {
        "instance": q(files.iid),
        "service": q(svc.name),
        "model": q(svc.model),
        "model_path": q(svc.model_path),
        "gpus": q(str(svc.gpus)),
        "tensor_parallel_size": q(str(svc.tensor_parallel_size)),
        "max_model_len": q(str(svc.max_model_len)),
        # fcfs is vLLM's default: no flag, so a template also runs a vLLM older than the option.
        "scheduling_args": " --scheduling-policy priority" if svc.scheduling_policy == "priority" else "",
        "vllm_args": " ".join(q(a) for a in svc.vllm_args),
        "python": q(settings.python),
        "vllm": q(settings.vllm),
        "bind_host": q(settings.bind_host),
        "endpoint_host": q(settings.endpoint_host),
        "token_file": q(str(files.token)),
        "endpoint_file": q(str(files.endpoint)),
        "guard_dir": q(str(files.guard_dir)),
        "env_exports": "\n".join(exports) if exports else "# (no extra environment)",
        "sbatch_header": sbatch_header(svc, settings),
    }
    values["preamble"] = fill(template_text("preamble").rstrip("\n"), values)
    return fill(template_text(svc.template), values)
