#!/usr/bin/env python3
"""Benchmark the whole gateway path (not a test), side by side in one run on this machine.

  direct    the fast backend (bench/fast_backend.py) called directly: the floor
  gateway   our path: daphne -> gateway (key, limits, registry, accounting) -> hpcbridge
            (local transport) -> hpcside router -> an instance of the same fast backend,
            started by hpcside's local launcher; one daphne process
  litellm   a LiteLLM proxy (1 worker, no database, its master key as the API key: its
            fastest set-up that still checks a key)
            in front of the same backend

Plain requests are driven by wrk (requests/s, p50, p99); streaming time to first byte is
measured by an asyncio client at concurrency 8 (time from sending the request to the first
``data:`` event). "added" is a target's figure minus direct's. Each figure is the median of
--repeat runs. Writes bench/results/gateway.json. Installs wrk (apt) and LiteLLM (its own
venv, bench/.venv-litellm) if they are missing.

    .venv/bin/python bench/gateway.py [--seconds 10] [--repeat 3] [--concurrency 1,8,64]
                                      [--db sqlite|postgresql] [--redis] [--no-litellm]
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
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness.accounts import stop_process_group  # noqa: E402
from tests.harness.net import wait_http  # noqa: E402
from tests.harness.slurm import free_port  # noqa: E402
from tests.live import LiveApp, stub_service  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from loadgen import LITELLM_KEY, ensure_tools, median_of, start_litellm, step, wrk  # noqa: E402

BACKEND_TOKEN = "bench-backend-token"  # noqa: S105 - a loopback stub's token
MODEL = "bench-model"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def start_backend(port: int) -> subprocess.Popen:  # type: ignore[type-arg]
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "fast_backend.py"), "--port", str(port),
                             "--model", MODEL], env={**os.environ, "VLLM_API_KEY": BACKEND_TOKEN},
                            stdout=subprocess.DEVNULL, start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/health", 15, "the fast backend")
    return proc


def start_gateway(db: str, redis: bool) -> tuple[LiveApp, str]:
    services = stub_service("bench", MODEL, min_instances=1, model_path=ROOT / "bench" / "fast_backend.py",
                            walltime="2h", idle_timeout="1h")
    app = LiveApp(db=db, redis_url="redis://127.0.0.1:6379/15" if redis else "", services=services,
                  extra_env={"LOG_LEVEL": "WARNING", "GATEWAY_POLICY_TTL": "5"}).start()
    app.create_user("bench")
    key = app.create_key("bench")
    # A user policy with no rate limits (the default has some; a user's limits hold across all keys).
    app.limit_user("bench", parallel_streams=100000)
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()
    req = urllib.request.Request(f"{app.url}/v1/chat/completions", data=body, method="POST",
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=120).close()  # noqa: S310 - waits through the cold start
    return app, key


async def ttfb(url: str, token: str, concurrency: int, seconds: float) -> dict[str, float]:
    """Streaming: time from sending the request to the first ``data:`` event, on keep-alive connections."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    samples: list[float] = []
    stop = time.monotonic() + seconds

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        while time.monotonic() < stop:
            started = time.perf_counter()
            writer.write(request)
            buf = b""
            while b"data: " not in buf:
                data = await reader.read(65536)
                if not data:
                    raise RuntimeError(f"{url} closed the connection")
                buf += data
            samples.append(time.perf_counter() - started)
            while not buf.endswith(b"0\r\n\r\n"):  # the rest of the chunked stream
                data = await reader.read(65536)
                if not data:
                    raise RuntimeError(f"{url} closed the connection")
                buf += data
        writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    samples.sort()
    return {"ttfb_p50_ms": round(statistics.median(samples) * 1000, 2),
            "ttfb_p99_ms": round(samples[max(0, int(len(samples) * 0.99) - 1)] * 1000, 2), "streams": len(samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--concurrency", default="1,8,64")
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--redis", action="store_true", help="share limits through Redis (db 15)")
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gateway.json"))
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    ensure_tools(not args.no_litellm)
    workdir = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    procs: list[Any] = []
    app: LiveApp | None = None
    try:
        backend_port = free_port()
        step("starting the fast backend")
        procs.append(start_backend(backend_port))
        targets = {"direct": (f"http://127.0.0.1:{backend_port}", BACKEND_TOKEN)}
        step(f"starting the gateway (daphne, {args.db}{', redis' if args.redis else ''}) and its instance")
        app, key = start_gateway(args.db, args.redis)
        targets["gateway"] = (app.url, key)
        if not args.no_litellm:
            step("starting LiteLLM (1 worker)")
            proc, port = start_litellm({MODEL: (f"http://127.0.0.1:{backend_port}", BACKEND_TOKEN)}, workdir)
            procs.append(proc)
            targets["litellm"] = (f"http://127.0.0.1:{port}", LITELLM_KEY)
        results: dict[str, dict[str, Any]] = {name: {} for name in targets}
        for name, (url, token) in targets.items():
            wrk(f"{url}/v1/chat/completions", token, 4, 2, workdir, BODY)  # warm up
            for c in levels:
                runs = []
                for i in range(args.repeat):
                    step(f"{name}: plain requests at concurrency {c}, run {i + 1}/{args.repeat} ({args.seconds}s)")
                    runs.append(wrk(f"{url}/v1/chat/completions", token, c, args.seconds, workdir, BODY))
                results[name][f"c{c}"] = median_of(runs)
            runs = []
            for i in range(args.repeat):
                step(f"{name}: streaming time to first byte at concurrency 8, run {i + 1}/{args.repeat}")
                runs.append(asyncio.run(ttfb(url, token, 8, args.seconds)))
            results[name]["stream_c8"] = median_of(runs)
        added = {name: {
            **{f"c{c}_p50_added_ms": round(r[f"c{c}"]["p50_ms"] - results["direct"][f"c{c}"]["p50_ms"], 2)
               for c in levels},
            "stream_c8_ttfb_added_ms": round(r["stream_c8"]["ttfb_p50_ms"]
                                             - results["direct"]["stream_c8"]["ttfb_p50_ms"], 2),
        } for name, r in results.items() if name != "direct"}
        report = {"date": datetime.date.today().isoformat(), "command": " ".join([".venv/bin/python", *sys.argv]),
                  "machine": f"{pyplatform.machine()}, {os.cpu_count()} cores, {pyplatform.platform()}",
                  "python": pyplatform.python_version(), "db": args.db, "redis": args.redis,
                  "results": results, "added": added}
        if "litellm" in results:
            report["gateway_vs_litellm_rps"] = {
                f"c{c}": round(results["gateway"][f"c{c}"]["rps"] / results["litellm"][f"c{c}"]["rps"], 1)
                for c in levels}
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print_table(results, added, levels)
        print(f"\nwrote {args.out}")
    finally:
        for proc in procs:
            stop_process_group(proc)
        if app is not None:
            app.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def print_table(results: dict[str, dict[str, Any]], added: dict[str, dict[str, float]], levels: list[int]) -> None:
    print(f"\n{'target':<9} {'conc':>5} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'p50 added':>10}")
    for name, r in results.items():
        for c in levels:
            row = r[f"c{c}"]
            extra = f"{added[name][f'c{c}_p50_added_ms']:>10.2f}" if name in added else f"{'':>10}"
            print(f"{name:<9} {c:>5} {row['rps']:>9.1f} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f} {extra}")
    print(f"\n{'target':<9} {'stream TTFB p50 @8':>19} {'added':>8}")
    for name, r in results.items():
        extra = f"{added[name]['stream_c8_ttfb_added_ms']:>8.2f}" if name in added else ""
        print(f"{name:<9} {r['stream_c8']['ttfb_p50_ms']:>19.2f} {extra}")


if __name__ == "__main__":
    main()
