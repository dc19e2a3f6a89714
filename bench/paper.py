#!/usr/bin/env python3
"""The paper's Table 1 (latency per hop) and Table 2 (requests/s per component), reproduced on
this machine on the real stack (a benchmark, not a test).

One run sets up what the end-to-end test uses: a real Slurm (2 nodes), a real sshd with the web
server's key locked to the ForceCommand, hpcside as the functional account, two instances started
by hpcside as Slurm jobs (vLLM on CPU serving SmolLM2-135M-Instruct, and bench/fast_backend.py, a
stand-in that answers at tens of thousands of requests/s), and the gateway (daphne) reaching them
over SSH. Side by side in the same run: the same instances called directly, and a LiteLLM proxy
(1 worker) in front of them.

Table 1, added latency per hop (sequential requests, median and p90 of --samples):
  probe the local bridge     hpcbridge -> a local hpcside session (pipe, no SSH), answered by hpcside
  the SSH command            the same probe over the kept SSH link; and, for the reference's design,
                             a new OpenSSH client process per probe running the ForceCommand
  probe the instance         GET /health of the vLLM instance through the SSH link and the router,
                             against the same probe sent directly
  first token                streamed chat completion, time to the first token: direct to vLLM,
                             through the whole path (HTTP -> gateway -> SSH -> hpcside -> vLLM),
                             through LiteLLM

Table 2, requests/s per component (wrk -t1 keep-alive, or an asyncio driver in-process for the
bridge; --seconds each): the web server (a Django view, and a static file), the gateway (/v1/models with a key), the
bridge (probe over SSH), hpcside -> instance (requests over SSH through the router), and the whole
path, each with the fast backend and with the real model (8 tokens per answer).

    .venv/bin/python bench/paper.py [--seconds 10] [--samples 200] [--repeat 3] [--no-litellm]

With --repeat N both tables are measured N times on the same stack and each figure is the median
of the N runs (as bench/gateway.py does); the report keeps the runs' count.

Needs root (Slurm, sshd, the functional account) and the vLLM runtime and model that scripts/lib.sh
prepares (scripts/test.sh or scripts/run.sh did it once). Writes bench/results/paper.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform as pyplatform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import aiohttp  # noqa: E402
from loadgen import LITELLM_KEY, ensure_tools, load, median_of, start_litellm, step, wrk  # noqa: E402

from chatai.management.commands.embedded import SMOLLM2_VLLM_ARGS  # noqa: E402
from hpcbridge.client import Platform  # noqa: E402
from hpcbridge.config import PlatformConfig  # noqa: E402
from tests.conftest import Hpcside  # noqa: E402
from tests.harness.accounts import ensure_functional_account, stop_process_group  # noqa: E402
from tests.harness.slurm import SlurmCluster  # noqa: E402
from tests.harness.sshd import SSHServer  # noqa: E402
from tests.live import LiveApp, stub_service  # noqa: E402

REAL = "SmolLM2-135M-Instruct"
FAST = "fast-backend"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def runtime_paths() -> tuple[Path, Path]:
    """vLLM's python and the model directory, where scripts/lib.sh (the one place that knows the
    cache layout and versions) puts them; CHATAI_VLLM_PYTHON and CHATAI_MODEL_DIR override."""
    out = subprocess.run(["bash", "-c", 'source scripts/lib.sh && echo "$VLLM_ENV/bin/python" && echo "$SMOLLM2_DIR"'],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\n")
    return (Path(os.environ.get("CHATAI_VLLM_PYTHON") or out[0]),
            Path(os.environ.get("CHATAI_MODEL_DIR") or out[1]))


VLLM_PYTHON, MODEL_DIR = runtime_paths()


def stats(samples: list[float]) -> dict[str, float]:
    samples = sorted(samples)
    return {"n": len(samples), "p50_ms": round(statistics.median(samples) * 1000, 3),
            "p90_ms": round(samples[max(0, int(len(samples) * 0.9) - 1)] * 1000, 3)}


async def timed(call: Callable[[], Awaitable[Any]], n: int) -> dict[str, float]:
    await call()  # warm
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - t)
    return stats(samples)


def deploy(account: Any) -> Path:
    """hpcside, the fast backend and the stub template in a directory the functional account reads."""
    root = Path(tempfile.mkdtemp(prefix="bench-paper-deploy-"))
    root.chmod(0o755)
    shutil.copytree(ROOT / "hpcside", root / "hpcside", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "bench" / "fast_backend.py", root / "fast_backend.py")
    shutil.copy(ROOT / "tests" / "support" / "stub.sh", root / "stub.sh")
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


class Stack:
    """Everything one run needs; ``close()`` stops all of it."""

    def __init__(self, workdir: Path, litellm: bool) -> None:
        self.workdir = workdir
        self.account = ensure_functional_account()
        self.deployment = deploy(self.account)
        self.cluster: SlurmCluster | None = None
        self.h: Hpcside | None = None
        self.sshd: SSHServer | None = None
        self.app: LiveApp | None = None
        self.procs: list[Any] = []
        self.platforms: list[Platform] = []
        self.want_litellm = litellm

    def start(self) -> Stack:
        step("starting Slurm (2 nodes), sshd with the ForceCommand key, hpcside as the functional account")
        self.cluster = SlurmCluster(["n1", "n2"], self.account).start()
        self.h = h = Hpcside(self.deployment, self.account, self.cluster)
        services = "\n".join([
            f"[service:real]\nmodel = {REAL}\ntemplate = vllm-cpu\nmodel_path = {MODEL_DIR}\nmax_model_len = 2048",
            f"vllm_args = {SMOLLM2_VLLM_ARGS}",
            "cpus = 2\nmin_instances = 1\nwalltime = 2h\nrenewal_margin = 10m\nreadiness_timeout = 5m\n",
            # The hop is measured, not admission: no cap below the highest concurrency (docs/hpcside.md).
            stub_service("fast", FAST, min_instances=1, template=self.deployment / "stub.sh",
                         model_path=self.deployment / "fast_backend.py", walltime="2h", cpus="1",
                         max_inflight="1024"),
        ])
        h.write_config(services, python=str(VLLM_PYTHON), hold_timeout="5m")
        self.sshd = SSHServer(self.account, self.deployment, h.config, slurm_env=f"SLURM_CONF={self.cluster.conf}")
        self.sshd.start()
        step("starting both instances as Slurm jobs (vLLM loads SmolLM2 in about 20-40 s)")
        h.until(lambda: h.ready("real") and h.ready("fast"), timeout=400, what="both instances ready", interval=1)
        self.instances = {i["service"]: i for i in h.status()["instances"] if i["phase"] == "ready"}
        self.tokens = {name: (h.state / "secrets" / f"{inst['id']}.token").read_text().strip()
                       for name, inst in self.instances.items()}
        step("starting the gateway (daphne) with the cluster as its HPC platform over SSH")
        ssh_platform = {"name": "hpc", "transport": "ssh", "host": "127.0.0.1", "port": self.sshd.port,
                        "user": self.account.name, "key_file": str(self.sshd.client_key),
                        "known_hosts": str(self.sshd.known_hosts)}
        self.app = LiveApp(extra_env={"HPC_PLATFORMS": json.dumps([ssh_platform]), "LOG_LEVEL": "WARNING",
                                      "GATEWAY_POLICY_TTL": "5"}).start()
        self.app.create_user("bench")
        self.key = self.app.create_key("bench")
        self.app.limit_user("bench", parallel_streams=100000)  # no rate limits for the bench user
        # The bridge used in-process for the hop measurements: one over SSH, one local (its own
        # hpcside state, owned by this user, answering probes itself).
        self.ssh = self.platform(PlatformConfig(**ssh_platform))
        local_cfg = self.workdir / "local.ini"
        local_cfg.write_text(f"[hpcside]\nstate_dir = {self.workdir}/local-state\nlauncher = local\n"
                             f"python = {sys.executable}\n\n" + stub_service("fast", FAST, max_inflight="1024"))
        self.local = self.platform(PlatformConfig(name="local", transport="local", hpcside_config=str(local_cfg)))
        self.litellm_url = ""
        if self.want_litellm:
            step("starting LiteLLM (1 worker) in front of the same two instances")
            proc, port = start_litellm({REAL: (self.direct("real"), self.tokens["real"]),
                                        FAST: (self.direct("fast"), self.tokens["fast"])}, self.workdir)
            self.procs.append(proc)
            self.litellm_url = f"http://127.0.0.1:{port}"
        return self

    def platform(self, cfg: PlatformConfig) -> Platform:
        plat = Platform(cfg).start()
        self.platforms.append(plat)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                asyncio.run(plat.request("GET", "/v1/models"))
                return plat
            except Exception:  # noqa: BLE001 - the link is still coming up
                time.sleep(0.2)
        raise RuntimeError(f"platform {cfg.name} did not come up")

    def direct(self, service: str) -> str:
        return str(self.instances[service]["endpoint"])

    def close(self) -> None:
        for plat in self.platforms:
            plat.stop()
        for proc in self.procs:
            stop_process_group(proc)
        if self.app is not None:
            self.app.stop()
        if self.sshd is not None:
            self.sshd.stop()
        if self.h is not None:
            self.h.cleanup()
        if self.cluster is not None:
            self.cluster.stop()
        shutil.rmtree(self.deployment, ignore_errors=True)


# -- Table 1 ------------------------------------------------------------------------------

async def first_token(session: aiohttp.ClientSession, url: str, token: str) -> float:
    """Seconds from sending a streamed chat completion to the first chunk carrying text."""
    body = {"model": REAL, "messages": QUESTION, "stream": True, "max_tokens": 16, "temperature": 0}
    started = time.perf_counter()
    async with session.post(f"{url}/v1/chat/completions", json=body,
                            headers={"Authorization": f"Bearer {token}"}) as resp:
        resp.raise_for_status()
        got: float | None = None
        async for raw in resp.content:
            line = raw.decode().strip()
            if got is None and line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                    got = time.perf_counter() - started
        if got is None:
            raise RuntimeError(f"{url}: no token in the stream")
        return got


def ssh_command(stack: Stack) -> None:
    """The reference's design: an OpenSSH client process per request, running the ForceCommand."""
    assert stack.sshd is not None
    proc = stack.sshd.ssh(command="ping", timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"ssh ping failed: {proc.stderr.decode(errors='replace')}")


async def table1(stack: Stack, samples: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    step(f"Table 1: probe the local bridge ({samples} sequential probes)")
    out["bridge_probe_local"] = await timed(lambda: stack.local.request("GET", "/v1/models"), samples)
    step("Table 1: the SSH command (kept link; and one OpenSSH process per probe)")
    out["ssh_probe_kept_link"] = await timed(lambda: stack.ssh.request("GET", "/v1/models"), samples)
    loop = asyncio.get_running_loop()
    out["ssh_command_per_request"] = await timed(lambda: loop.run_in_executor(None, ssh_command, stack),
                                                 max(10, samples // 10))
    step("Table 1: probe the instance (vLLM /health), through the pipe and directly")
    async with aiohttp.ClientSession() as session:
        async def direct_health() -> None:
            # Every path of an instance needs its token (hpcside's guard inside vLLM).
            async with session.get(f"{stack.direct('real')}/health",
                                   headers={"Authorization": f"Bearer {stack.tokens['real']}"}) as resp:
                await resp.read()

        out["instance_probe_direct"] = await timed(direct_health, samples)
        out["instance_probe_via_ssh"] = await timed(lambda: stack.ssh.request("GET", "/health", REAL), samples)
        n = max(10, samples // 10)
        step(f"Table 1: first token of a streamed answer ({n} each, interleaved): direct, gateway, LiteLLM")
        targets = {"first_token_direct": (stack.direct("real"), stack.tokens["real"]),
                   "first_token_gateway": (stack.app.url if stack.app else "", stack.key)}
        if stack.litellm_url:
            targets["first_token_litellm"] = (stack.litellm_url, LITELLM_KEY)
        got: dict[str, list[float]] = {name: [] for name in targets}
        for url, token in targets.values():
            await first_token(session, url, token)  # warm
        for _ in range(n):
            for name, (url, token) in targets.items():
                got[name].append(await first_token(session, url, token))
        out.update({name: stats(values) for name, values in got.items()})
    return out


# -- Table 2 ------------------------------------------------------------------------------

def table2(stack: Stack, seconds: int, levels: list[int]) -> dict[str, dict[str, Any]]:
    assert stack.app is not None
    app, key, wd = stack.app, stack.key, stack.workdir
    fast_body = {"model": FAST, "messages": QUESTION}
    real_body = {"model": REAL, "messages": QUESTION, "max_tokens": 8, "temperature": 0}
    out: dict[str, dict[str, Any]] = {}

    def http(name: str, url: str, token: str, body: dict | None = None, conc: list[int] | None = None,
             secs: int = seconds) -> None:
        out[name] = {}
        for c in conc or levels:
            step(f"Table 2: {name} at concurrency {c} ({secs} s)")
            out[name][f"c{c}"] = wrk(url, token, c, secs, wd, body)

    def inproc(name: str, call: Callable[[], Awaitable[Any]], conc: list[int], secs: int = seconds) -> None:
        out[name] = {}
        for c in conc:
            step(f"Table 2: {name} at concurrency {c} ({secs} s, in-process)")
            out[name][f"c{c}"] = asyncio.run(load(call, c, secs))

    http("web_server", f"{app.url}/healthz", "")
    http("web_server_static", f"{app.url}/static/chatai/app.css", "")
    http("gateway_models", f"{app.url}/v1/models", key)
    inproc("bridge_probe_ssh", lambda: stack.ssh.request("GET", "/v1/models"), [max(levels)])

    async def via_bridge(model: str, body: dict) -> None:
        head, _ = await stack.ssh.request("POST", "/v1/chat/completions", model,
                                          {"content-type": "application/json"}, json.dumps(body).encode())
        if head.status != 200:
            raise RuntimeError(f"{model}: {head.status}")

    inproc("hpcside_to_fast_instance", lambda: via_bridge(FAST, fast_body), [max(levels)])
    http("fast_direct", f"{stack.direct('fast')}/v1/chat/completions", stack.tokens["fast"], fast_body)
    http("fast_gateway", f"{app.url}/v1/chat/completions", key, fast_body)
    if stack.litellm_url:
        http("fast_litellm", f"{stack.litellm_url}/v1/chat/completions", LITELLM_KEY, fast_body)
    real_secs = max(seconds, 20)
    inproc("hpcside_to_real_instance", lambda: via_bridge(REAL, real_body), [8], real_secs)
    http("real_direct", f"{stack.direct('real')}/v1/chat/completions", stack.tokens["real"], real_body, [8], real_secs)
    http("real_gateway", f"{app.url}/v1/chat/completions", key, real_body, [8], real_secs)
    if stack.litellm_url:
        http("real_litellm", f"{stack.litellm_url}/v1/chat/completions", LITELLM_KEY, real_body, [8], real_secs)
    return out


def median_table1(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Each row's figures: the median over the runs."""
    return {name: median_of([run[name] for run in runs]) for name in runs[0]}


def median_table2(runs: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Each component's figures at each concurrency: the median over the runs."""
    return {name: {level: median_of([run[name][level] for run in runs]) for level in levels}
            for name, levels in runs[0].items()}


def print_tables(t1: dict[str, dict[str, float]], t2: dict[str, dict[str, Any]]) -> None:
    print(f"\nTable 1: latency per hop          {'p50 ms':>9} {'p90 ms':>9} {'n':>5}")
    for name, row in t1.items():
        print(f"  {name:<32} {row['p50_ms']:>9.2f} {row['p90_ms']:>9.2f} {row['n']:>5}")
    print(f"\nTable 2: requests/s per component {'conc':>5} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9}")
    for name, levels in t2.items():
        for level, row in levels.items():
            print(f"  {name:<32} {level[1:]:>5} {row['rps']:>9.1f} {row['p50_ms']:>9.2f} {row['p99_ms']:>9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--concurrency", default="8,64", help="for the fast backend (the real model: 8)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each table; figures are their medians")
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "paper.json"))
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    for what, path in (("CHATAI_VLLM_PYTHON", VLLM_PYTHON), ("CHATAI_MODEL_DIR", MODEL_DIR)):
        if not path.exists():
            raise SystemExit(f"{what}: {path} is missing; scripts/run.sh or scripts/test.sh prepares it")
    ensure_tools(not args.no_litellm)
    levels = [int(c) for c in args.concurrency.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="bench-paper-"))
    stack = Stack(workdir, not args.no_litellm)
    try:
        stack.start()
        t1_runs, t2_runs = [], []
        for i in range(args.repeat):
            step(f"run {i + 1}/{args.repeat}")
            t1_runs.append(asyncio.run(table1(stack, args.samples)))
            t2_runs.append(table2(stack, args.seconds, levels))
        t1, t2 = median_table1(t1_runs), median_table2(t2_runs)
    finally:
        step("stopping everything")
        stack.close()
        shutil.rmtree(workdir, ignore_errors=True)
    report = {"date": datetime.date.today().isoformat(), "command": " ".join([".venv/bin/python", *sys.argv]),
              "machine": f"{pyplatform.machine()}, {os.cpu_count()} cores, {pyplatform.platform()}",
              "python": pyplatform.python_version(), "repeat": args.repeat, "table1": t1, "table2": t2}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print_tables(t1, t2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
