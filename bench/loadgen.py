"""Load generation shared by the benchmarks: wrk for HTTP (requests/s, p50, p99), an asyncio
driver for in-process calls, and a LiteLLM proxy in front of given OpenAI-compatible backends.

wrk is the equivalent of the paper's Locust here: one C process drives the load at a small fraction
of the CPU a Python load tool needs, which matters when load tool and system share 2 cores.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness.net import wait_http  # noqa: E402
from tests.harness.slurm import free_port  # noqa: E402

LITELLM_VENV = ROOT / "bench" / ".venv-litellm"
LITELLM_KEY = "sk-bench-0123456789abcdef0123456789abcdef"  # noqa: S105 - its master key, on loopback
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def ensure_tools(litellm: bool) -> None:
    if not shutil.which("wrk"):
        step("installing wrk (apt)")
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "wrk"], check=True,
                       stdout=subprocess.DEVNULL)
    if litellm and not (LITELLM_VENV / "bin" / "litellm").exists():
        step(f"installing litellm[proxy] into {LITELLM_VENV} (a few minutes)")
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True)


def start_litellm(backends: dict[str, tuple[str, str]], workdir: Path) -> tuple[subprocess.Popen, int]:  # type: ignore[type-arg]
    """A LiteLLM proxy (1 worker, no database, its master key as the API key: its fastest set-up
    that still checks a key) in front of each model's backend: {model: (base_url, token)}."""
    port = free_port()
    cfg = workdir / "litellm.yaml"
    models = "".join(f"""  - model_name: {model}
    litellm_params:
      model: openai/{model}
      api_base: {url}/v1
      api_key: {token}
""" for model, (url, token) in backends.items())
    cfg.write_text(f"""model_list:
{models}general_settings:
  master_key: {LITELLM_KEY}
litellm_settings:
  telemetry: false
""")
    env = {**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "NO_DOCS": "True"}
    log = open(workdir / "litellm.log", "wb")  # noqa: SIM115 - lives with the process
    proc = subprocess.Popen([str(LITELLM_VENV / "bin" / "litellm"), "--config", str(cfg), "--host", "127.0.0.1",
                             "--port", str(port), "--num_workers", "1"], env=env, cwd=workdir,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/health/liveliness", 180, "LiteLLM",
              lambda: (workdir / "litellm.log").read_text()[-3000:])
    return proc, port


def wrk(url: str, token: str, concurrency: int, seconds: int, workdir: Path,
        body: dict | None = None, timeout: str = "30s") -> dict[str, float]:
    """wrk -t1 against URL (POST with BODY as JSON, or GET), keep-alive; requests/s, p50, p99 in ms."""
    script = workdir / "wrk.lua"
    lines = [f'wrk.headers["Authorization"] = "Bearer {token}"'] if token else []
    if body is not None:
        lines += ['wrk.method = "POST"', f"wrk.body = {json.dumps(json.dumps(body))}",
                  'wrk.headers["Content-Type"] = "application/json"']
    script.write_text("\n".join(lines) + "\n")
    out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", f"--timeout={timeout}", "--latency",
                          "-s", str(script), url], capture_output=True, text=True, check=True).stdout
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    if errors or socket_errors:
        found = [m.group(0) for m in (errors, socket_errors) if m]
        print(f"    warning: {url}: {'; '.join(found)}")

    def pct(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert m, out
        return float(m.group(1)) * UNITS[m.group(2)]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert rps, out
    return {"rps": float(rps.group(1)), "p50_ms": round(pct("50"), 3), "p99_ms": round(pct("99"), 3),
            "errors": int(errors.group(1)) if errors else 0}


def summarize(latencies: list[float], seconds: float) -> dict[str, float]:
    latencies.sort()
    return {"requests": len(latencies), "rps": round(len(latencies) / seconds, 1),
            "p50_ms": round(statistics.median(latencies) * 1000, 3),
            "p90_ms": round(latencies[max(0, int(len(latencies) * 0.9) - 1)] * 1000, 3),
            "p99_ms": round(latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000, 3)}


async def load(call: Callable[[], Awaitable[None]], concurrency: int, seconds: float) -> dict[str, float]:
    """CONCURRENCY workers calling CALL for SECONDS; requests/s and latency percentiles."""
    latencies: list[float] = []
    stop = time.monotonic() + seconds

    async def worker() -> None:
        while time.monotonic() < stop:
            t = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - t)

    for _ in range(min(concurrency, 4)):  # warm up
        await call()
    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return summarize(latencies, time.monotonic() - start)


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
