#!/usr/bin/env python3
"""Fair share against first come, first served, side by side in one run (a benchmark, not a test).

A heavy user keeps ``--heavy`` streams open (each a long reply; a new one starts as soon as one
ends) and a light user starts one short chat every 2 s; both use API keys (so the chat page's
boost plays no part: what is measured is fair share alone). Measured over ``--seconds`` after
``--warmup`` seconds (the heavy user's usage is recorded when its first replies end; the backlog it
sent before that keeps the priority of an unused account, as the light user's): the light user's
time to its first token (median, p90) and the heavy user's throughput (content tokens received per
second). Also the light user alone (idle), the baseline.

Two arms per backend, each its own gateway (daphne with Redis) in front of hpcside (local
launcher; the transport plays no part in the order) and one instance:
  fcfs       FAIRSHARE=off (every request priority 0), the service's scheduling_policy = fcfs
  fairshare  FAIRSHARE=on (gateway/fairshare.py), scheduling_policy = priority
The platform's admission cap (max_inflight per instance) is the same in both arms.

Backends:
  stub   the stand-in vLLM (tests/support/stub_vllm.py) with --max-num-seqs SEATS: at most SEATS
         requests generate at once, each at 1/stub_delay tokens/s (50), the rest wait (in priority
         order under ``priority``), like a real instance's batch slots; max_inflight
         --stub-inflight. Heavy replies are 105 to 315 tokens (2 to 6 s), light ones 7. The
         router admits at most max_inflight requests of the same or a better priority, and
         2 x max_inflight in all (hpcside/admission.py): with SEATS = 2 x max_inflight (16 and 8,
         the defaults) the instance has room for a better-priority request beside a full heavy
         backlog; with SEATS = max_inflight it has none, and a light request waits for a heavy
         one to end even with fair share.
  vllm   vLLM for CPU serving SmolLM2-135M-Instruct (scripts/lib.sh prepares both; heavy replies
         96 to 160 tokens with ignore_eos, light ones 8), max_inflight --vllm-inflight. Its batch
         shares the 2 cores: more streams, slower each.

    flock /tmp/chatai-tests.lock .venv/bin/python bench/fairshare.py [--seconds 40] [--warmup 20]
        [--heavy 32] [--backends stub,vllm] [--stub-inflight 8] [--seats 16] [--vllm-inflight 16]

Writes bench/results/fairshare.json, or --out (with the command that made it).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform as pyplatform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import aiohttp  # noqa: E402
import redis  # noqa: E402
from loadgen import step  # noqa: E402

from chatai.management.commands.embedded import SMOLLM2_VLLM_ARGS  # noqa: E402
from tests.live import LiveApp, stub_service  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/11"
SUPPORT = ROOT / "tests" / "support"
REAL = "SmolLM2-135M-Instruct"
# The stand-in's template with the service's vllm_args (the test template leaves them out).
STUB_TEMPLATE = """#!/bin/bash
{{ sbatch_header }}
# Bench template: the stand-in vLLM with the service's vllm_args (--max-num-seqs).
{{ preamble }}
exec {{ python }} {{ model_path }} --host {{ bind_host }} --port "$PORT" --model {{ model }}{{ scheduling_args }} \\
  {{ vllm_args }}
"""


@dataclass
class Backend:
    name: str
    model: str
    services: str  # the [service:...] section, without scheduling_policy
    heavy_body: dict[str, Any]
    light_body: dict[str, Any]
    hpcside: dict[str, str] = field(default_factory=dict)
    ready_timeout: float = 60.0
    vary: tuple[str, int, int] = ("", 0, 0)  # a heavy body field drawn per request from [low, high]

    def heavy(self, rng: random.Random) -> dict[str, Any]:
        """One heavy request's body; lengths vary so the streams do not end in lockstep."""
        name, low, high = self.vary
        return {"model": self.model, **self.heavy_body, **({name: rng.randint(low, high)} if name else {})}


def stub_backend(workdir: Path, inflight: int, seats: int) -> Backend:
    template = workdir / "bench-stub.sh"
    template.write_text(STUB_TEMPLATE)
    section = stub_service("bench", "stub-model", template=template, min_instances="1", max_instances="1",
                           max_inflight=str(inflight), vllm_args=f"--max-num-seqs {seats}", idle_timeout="1h")
    ask = [{"role": "user", "content": "hello"}]
    return Backend("stub", "stub-model", section,
                   {"messages": ask, "stub_delay": 0.02},  # 105 to 315 tokens at 50/s: 2 to 6 s
                   {"messages": ask, "stub_delay": 0.02},  # 7 tokens
                   vary=("stub_repeat", 15, 45))


def vllm_backend(inflight: int) -> Backend | None:
    from paper import runtime_paths  # the one place that knows the vLLM cache layout

    python, model_dir = runtime_paths()
    if not python.exists() or not model_dir.exists():
        print("vLLM runtime or model missing: run scripts/test.sh once", file=sys.stderr)
        return None
    section = "\n".join([
        "[service:smollm2]", f"model = {REAL}", "template = vllm-cpu", f"model_path = {model_dir}",
        f"vllm_args = {SMOLLM2_VLLM_ARGS}", "max_model_len = 2048", "cpus = 2", "min_instances = 1",
        "max_instances = 1", f"max_inflight = {inflight}",
        "walltime = 1h", "renewal_margin = 5m", "readiness_timeout = 5m", "idle_timeout = 1h"]) + "\n"
    return Backend("vllm", REAL, section,
                   {"messages": [{"role": "user", "content": "Tell me a long story about Paris."}],
                    "ignore_eos": True, "temperature": 0},
                   {"messages": [{"role": "user", "content": "What is the capital of France?"}],
                    "max_tokens": 8, "temperature": 0},
                   hpcside={"python": str(python), "hold_timeout": "5m", "probe_timeout": "2s"},
                   ready_timeout=300.0, vary=("max_tokens", 96, 160))


async def stream(session: aiohttp.ClientSession, url: str, key: str, body: dict[str, Any],
                 on_token: Any = None) -> float | None:
    """One streamed chat; the seconds to its first content token (None if none came)."""
    started = time.monotonic()
    first: float | None = None
    async with session.post(f"{url}/v1/chat/completions", json={**body, "stream": True},
                            headers={"Authorization": f"Bearer {key}"}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue  # SSE comments (": busy (3s)"), blank lines, [DONE]
            event = json.loads(line[6:])
            for choice in event.get("choices") or ():
                if (choice.get("delta") or {}).get("content"):
                    if first is None:
                        first = time.monotonic() - started
                    if on_token is not None:
                        on_token()
    return first


def summary(samples: list[float]) -> dict[str, Any]:
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)
    return {"n": len(ordered), "p50_ms": round(statistics.median(ordered) * 1000, 1),
            "p90_ms": round(ordered[max(0, int(len(ordered) * 0.9 + 0.5) - 1)] * 1000, 1)}


async def light_loop(session: aiohttp.ClientSession, url: str, key: str, body: dict[str, Any], start: float,
                     end: float, out: list[float], errors: list[str]) -> None:
    """One chat every 2 s (open loop: a slow answer does not delay the next); TTFTs of those started
    in [start, end) are kept; each may take up to 120 s."""
    tasks = []

    async def one(keep: bool) -> None:
        try:
            ttft = await asyncio.wait_for(stream(session, url, key, body), 120)
            if keep and ttft is not None:
                out.append(ttft)
        except Exception as exc:  # noqa: BLE001 - counted, shown in the report
            errors.append(f"{type(exc).__name__}: {str(exc)[:120]}")

    while time.monotonic() < end:
        tasks.append(asyncio.ensure_future(one(time.monotonic() >= start)))
        await asyncio.sleep(2.0)
    await asyncio.gather(*tasks)


async def run_arm(url: str, heavy_key: str, light_key: str, backend: Backend, heavy: int, warmup: float,
                  seconds: float) -> dict[str, Any]:
    """Heavy streams and the light user's chats together; the light user alone when heavy == 0."""
    counted = {"tokens": 0}
    window = {"open": False}
    errors: list[str] = []
    ttfts: list[float] = []
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        now = time.monotonic()
        start, end = now + warmup, now + warmup + seconds
        stop = asyncio.Event()

        def token() -> None:
            if window["open"]:
                counted["tokens"] += 1

        rng = random.Random(14)  # the same lengths in every arm

        async def heavy_worker() -> None:
            while not stop.is_set():
                try:
                    await stream(session, url, heavy_key, backend.heavy(rng), token)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    errors.append(f"heavy {type(exc).__name__}: {str(exc)[:120]}")
                    await asyncio.sleep(0.5)

        workers = [asyncio.ensure_future(heavy_worker()) for _ in range(heavy)]

        async def open_window() -> None:
            await asyncio.sleep(max(0.0, start - time.monotonic()))
            window["open"] = True
            await asyncio.sleep(max(0.0, end - time.monotonic()))
            window["open"] = False
            stop.set()

        opener = asyncio.ensure_future(open_window())
        await light_loop(session, url, light_key, {"model": backend.model, **backend.light_body}, start, end,
                         ttfts, errors)
        await opener
        for w in workers:
            w.cancel()  # the heavy user's open streams are cut (and charged their estimates)
        await asyncio.gather(*workers, return_exceptions=True)
    result: dict[str, Any] = {"light_ttft": summary(ttfts)}
    if heavy:
        result["heavy_tokens_per_s"] = round(counted["tokens"] / seconds, 1)
    result["errors"] = len(errors)
    if errors:
        result["sample_errors"] = sorted(set(errors))[:3]
    return result


def wait_ready(app: LiveApp, model: str, timeout: float) -> None:
    """Until the instance answers through the whole path (the first answer ends its cold start)."""
    import urllib.error
    import urllib.request

    key = app.create_key("probe")
    deadline = time.monotonic() + timeout
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()
    while True:
        req = urllib.request.Request(f"{app.url}/v1/chat/completions", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback
                resp.read()
                return
        except (urllib.error.URLError, OSError) as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{model} not ready after {timeout:.0f}s: {exc}") from None
            time.sleep(2)


def arm(backend: Backend, policy: str, args: argparse.Namespace, with_idle: bool) -> dict[str, Any]:
    redis.Redis.from_url(REDIS_URL).flushdb()  # no usage from an earlier arm or run
    scheduling = "priority" if policy == "fairshare" else "fcfs"
    services = backend.services.rstrip("\n") + f"\nscheduling_policy = {scheduling}\n\n"
    env = {"FAIRSHARE": "on" if policy == "fairshare" else "off", "LIMIT_PARALLEL_STREAMS": "1000",
           "LIMIT_REQUESTS_PER_MINUTE": "1000000"}
    app = LiveApp(db="postgresql", redis_url=REDIS_URL, services=services, extra_env=env, hpcside=backend.hpcside)
    try:
        app.start()
        for name in ("heavy", "light", "probe"):
            app.create_user(name)
        heavy_key, light_key = app.create_key("heavy"), app.create_key("light")
        step(f"{backend.name}/{policy}: waiting for the instance")
        wait_ready(app, backend.model, backend.ready_timeout)
        out: dict[str, Any] = {}
        if with_idle:
            step(f"{backend.name}: the light user alone for {args.idle_seconds:.0f} s (idle baseline)")
            out["idle"] = asyncio.run(run_arm(app.url, heavy_key, light_key, backend, 0, 0, args.idle_seconds))
            print(json.dumps(out["idle"]), flush=True)
            step(f"{backend.name}: the light user alone, straight to the instance (no gateway, no hpcside)")
            routing = json.loads((app.dir / "hpcside" / "routing.json").read_text())
            (inst,) = routing["models"][backend.model]
            out["idle_direct"] = asyncio.run(run_arm(inst["url"], inst["token"], inst["token"], backend, 0, 0,
                                                     args.idle_seconds / 2))
            print(json.dumps(out["idle_direct"]), flush=True)
            redis.Redis.from_url(REDIS_URL).flushdb()  # both arms' loaded runs start with no usage on record
        step(f"{backend.name}/{policy}: {args.heavy} heavy streams + a light chat every 2 s "
             f"({args.warmup:.0f} s warm-up, {args.seconds:.0f} s measured)")
        out["loaded"] = asyncio.run(run_arm(app.url, heavy_key, light_key, backend, args.heavy, args.warmup,
                                            args.seconds))
        print(json.dumps(out["loaded"]), flush=True)
        return out
    finally:
        app.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--warmup", type=float, default=20)
    parser.add_argument("--idle-seconds", type=float, default=20)
    parser.add_argument("--heavy", type=int, default=32)
    parser.add_argument("--backends", default="stub,vllm")
    parser.add_argument("--stub-inflight", type=int, default=8)
    parser.add_argument("--seats", type=int, default=16)
    parser.add_argument("--vllm-inflight", type=int, default=16)
    parser.add_argument("--out", default="bench/results/fairshare.json")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-fairshare-"))
    workdir.chmod(0o755)
    report: dict[str, Any] = {
        "date": datetime.date.today().isoformat(), "command": " ".join([".venv/bin/python", *sys.argv]),
        "machine": f"{pyplatform.machine()}, {os.cpu_count()} cores, {pyplatform.platform()}",
        "heavy_streams": args.heavy, "warmup_s": args.warmup, "seconds": args.seconds, "backends": {}}
    for name in args.backends.split(","):
        backend = (stub_backend(workdir, args.stub_inflight, args.seats) if name == "stub"
                   else vllm_backend(args.vllm_inflight))
        if backend is None:
            continue
        fcfs = arm(backend, "fcfs", args, with_idle=False)
        fair = arm(backend, "fairshare", args, with_idle=True)
        idle = fair["idle"]["light_ttft"].get("p50_ms")
        res: dict[str, Any] = {"max_inflight": args.stub_inflight if name == "stub" else args.vllm_inflight,
                               **({"seats": args.seats} if name == "stub" else {}),
                               "idle": fair["idle"], "idle_direct": fair["idle_direct"], "fcfs": fcfs["loaded"],
                               "fairshare": fair["loaded"]}
        for policy in ("fcfs", "fairshare"):
            p50 = res[policy]["light_ttft"].get("p50_ms")
            res[policy]["light_p50_vs_idle"] = round(p50 / idle, 1) if p50 and idle else None
        if res["fcfs"].get("heavy_tokens_per_s"):
            res["heavy_throughput_change_pct"] = round(
                100 * (res["fairshare"]["heavy_tokens_per_s"] / res["fcfs"]["heavy_tokens_per_s"] - 1), 1)
        report["backends"][name] = res
        step(f"{name}: " + json.dumps(res))
    out = ROOT / args.out
    out.write_text(json.dumps(report, indent=2) + "\n")
    step(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
