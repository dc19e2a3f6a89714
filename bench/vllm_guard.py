#!/usr/bin/env python3
"""Benchmark the token guard inside vLLM (not a test): what ``--middleware hpcside_vllm_guard.TokenGuard`` adds.

Two measurements in one run:
  real vLLM   two vLLM (CPU) servers serving SmolLM2 with the job template's flags, one with the guard
              and one without (vLLM's own --api-key check on /v1 runs in both), requests with the
              token alternating between them on keep-alive connections, so drift hits both alike;
              added p50 = guarded p50 - plain p50, per path.
  in process  the guard's own ASGI call around a no-op app, timed in batches (the floor of its cost).

The goal (issue 12, item 15) is <= 0.3 ms added at p50. vLLM's python and the model come from
scripts/lib.sh (CHATAI_VLLM_PYTHON and CHATAI_MODEL_DIR override). Writes bench/results/vllm_guard.json.

    .venv/bin/python bench/vllm_guard.py [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform as pyplatform
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatai.management.commands.embedded import SMOLLM2_VLLM_ARGS  # noqa: E402
from hpcside.templates import install_guard  # noqa: E402
from hpcside.vllm_guard import TokenGuard  # noqa: E402

MODEL = "smol"
PATHS: list[tuple[str, str, bytes]] = [
    ("GET", "/health", b""),
    ("GET", "/v1/models", b""),
    ("POST", "/tokenize", json.dumps({"model": MODEL, "prompt": "The capital of France is"}).encode()),
]


def runtime_paths() -> tuple[Path, Path]:
    out = subprocess.run(["bash", "-c", 'source scripts/lib.sh && echo "$VLLM_ENV/bin/python" && echo "$SMOLLM2_DIR"'],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\n")
    return (Path(os.environ.get("CHATAI_VLLM_PYTHON") or out[0]), Path(os.environ.get("CHATAI_MODEL_DIR") or out[1]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_vllm(python: Path, model: Path, port: int, token: str, guard_dir: Path, guarded: bool,
               log: Path) -> subprocess.Popen[bytes]:
    """vLLM with the flags of hpcside/jobs/vllm-cpu.sh (the guard only if ``guarded``)."""
    env = {**os.environ, "VLLM_API_KEY": token, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "PYTHONPATH": str(guard_dir)}
    argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--host", "127.0.0.1", "--port", str(port), "--served-model-name", MODEL, "--max-model-len", "2048",
            "--enforce-eager", "--distributed-executor-backend", "uni", "--no-enable-log-requests",
            "--disable-uvicorn-access-log", *SMOLLM2_VLLM_ARGS.split()]
    if guarded:
        argv += ["--middleware", "hpcside_vllm_guard.TokenGuard"]
    with open(log, "wb") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(port: int, token: str, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vLLM on port {port} exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health", headers={"Authorization": f"Bearer {token}"})
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"vLLM on port {port} not ready after {timeout:.0f}s")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure_real(ports: dict[str, int], token: str, n: int) -> dict[str, Any]:
    conns = {name: http.client.HTTPConnection("127.0.0.1", port, timeout=30) for name, port in ports.items()}
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    out: dict[str, Any] = {}
    for method, path, body in PATHS:
        times: dict[str, list[float]] = {name: [] for name in conns}
        for i in range(n + 100):
            for name in (list(conns) if i % 2 else list(conns)[::-1]):  # alternate who goes first
                conn = conns[name]
                started = time.perf_counter()
                conn.request(method, path, body=body or None, headers=headers)
                resp = conn.getresponse()
                resp.read()
                elapsed = time.perf_counter() - started
                if resp.status != 200:
                    raise SystemExit(f"{name} {path}: HTTP {resp.status}")
                if i >= 100:  # the first 100 warm up
                    times[name].append(elapsed * 1000)
        row = {name: {"p50_ms": round(statistics.median(t), 4), "p90_ms": round(percentile(t, 0.9), 4)}
               for name, t in times.items()}
        row["added_p50_ms"] = round(row["guarded"]["p50_ms"] - row["plain"]["p50_ms"], 4)
        out[f"{method} {path}"] = row
    for conn in conns.values():
        conn.close()
    return out


def measure_in_process(calls: int) -> dict[str, Any]:
    token = secrets.token_urlsafe(32)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        return None

    async def send(message: Any) -> None:
        return None

    async def receive() -> Any:
        return {"type": "http.request"}

    guard = TokenGuard(app, token)
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [
        (b"host", b"node:8000"), (b"content-type", b"application/json"), (b"content-length", b"100"),
        (b"authorization", f"Bearer {token}".encode())]}

    async def batches(target: Any) -> list[float]:
        per_call = []
        for _ in range(calls // 1000):
            started = time.perf_counter()
            for _ in range(1000):
                await target(scope, receive, send)
            per_call.append((time.perf_counter() - started) / 1000 * 1e6)
        return per_call

    guarded, bare = asyncio.run(batches(guard)), asyncio.run(batches(app))
    return {"guarded_call_us": round(statistics.median(guarded), 3), "bare_call_us": round(statistics.median(bare), 3),
            "added_us": round(statistics.median(guarded) - statistics.median(bare), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="timed requests per path and server")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "vllm_guard.json"))
    args = parser.parse_args()
    python, model = runtime_paths()
    for what, path in (("CHATAI_VLLM_PYTHON", python), ("CHATAI_MODEL_DIR", model)):
        if not path.exists():
            raise SystemExit(f"{what}: {path} is missing; scripts/run.sh or scripts/test.sh prepares it")
    work = Path(tempfile.mkdtemp(prefix="bench-guard-"))
    guard_dir = install_guard(work).parent
    token = secrets.token_urlsafe(32)
    ports = {"plain": free_port(), "guarded": free_port()}
    procs = {}
    try:
        for name, port in ports.items():  # one after the other: two loads at once starve 2 cores
            procs[name] = start_vllm(python, model, port, token, guard_dir, name == "guarded", work / f"{name}.log")
            wait_ready(port, token, procs[name])
            print(f"vLLM {name} ready on {port}", flush=True)
        # The guard is really there: no token, no answer, on a path vLLM itself leaves open.
        conn = http.client.HTTPConnection("127.0.0.1", ports["guarded"], timeout=10)
        conn.request("GET", "/metrics")
        assert conn.getresponse().status == 401, "the guarded vLLM answered without a token"
        real = measure_real(ports, token, args.requests)
    finally:
        for proc in procs.values():
            os.killpg(proc.pid, 15)
        for proc in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
    in_process = measure_in_process(200_000)
    result = {
        "machine": f"vm {os.cpu_count()} cores {pyplatform.machine()}", "python": pyplatform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(["python", "bench/vllm_guard.py", *sys.argv[1:]]),
        "requests_per_path": args.requests, "real_vllm": real, "in_process": in_process,
        "goal_added_p50_ms": 0.3,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
