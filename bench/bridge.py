#!/usr/bin/env python3
"""Benchmark the secure pipe (not a test): hpcbridge -> real sshd ForceCommand -> hpcside router -> upstream.

Side by side in one run on this machine, against the same trivial upstream:
  direct      the upstream called directly over HTTP/1.1 keep-alive (the floor)
  pipe        one long-lived SSH session, requests multiplexed (our design)
  exec        one SSH exec per request on an open connection (the reference's design, at its best:
              the reference even starts a new ssh process per request)

Reports requests/s and latency p50/p99; "added" is pipe minus direct. Needs root (it starts
sshd and uses the functional account). Writes bench/results/bridge.json.

    .venv/bin/python bench/bridge.py [--seconds 5] [--concurrency 1,16,64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform as pyplatform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import paramiko  # noqa: E402

from hpcbridge.client import Platform  # noqa: E402
from hpcbridge.config import PlatformConfig  # noqa: E402
from hpcside import protocol as p  # noqa: E402
from hpcside.state import ensure_dirs, write_json  # noqa: E402
from hpcside.upstream import Pool  # noqa: E402
from tests.harness.accounts import ensure_functional_account  # noqa: E402
from tests.harness.slurm import free_port  # noqa: E402
from tests.harness.sshd import SSHServer  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from loadgen import load, summarize  # noqa: E402

BODY = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "hi"}]}).encode()
ANSWER = json.dumps({"id": "x", "object": "chat.completion", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]}).encode()


def start_upstream(port: int) -> None:
    """A trivial, fast HTTP/1.1 keep-alive server in its own thread (the 'instance')."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if length:
                    await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(ANSWER)).encode() + b"\r\n\r\n" + ANSWER)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    threading.Thread(target=lambda: asyncio.run(main()), daemon=True).start()
    time.sleep(0.3)


def exec_per_request(sshd: SSHServer, concurrency: int, seconds: float) -> dict[str, float]:
    """The reference's design: a fresh exec (channel + session server) for every request."""
    client = paramiko.SSHClient()
    client.load_host_keys(str(sshd.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect("127.0.0.1", port=sshd.port, username=sshd.account.name, key_filename=str(sshd.client_key),
                   look_for_keys=False, allow_agent=False)
    transport = client.get_transport()
    assert transport is not None
    transport.sock.setsockopt(6, 1, 1)  # TCP_NODELAY, as the best case for this design
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def one() -> None:
        chan = transport.open_session()
        chan.exec_command("serve")
        chan.sendall(p.hello_client("bench") + p.encode_json(p.REQUEST, 1, {
            "method": "POST", "path": "/v1/chat/completions", "model": "bench", "headers": {}})
            + p.encode_data(1, BODY) + p.encode(p.END, 1))
        decoder = p.Decoder()
        while True:
            data = chan.recv(65536)
            if not data or any(f.type in (p.END, p.ERROR) and f.stream == 1 for f in decoder.feed(data)):
                break
        chan.close()

    def worker() -> None:
        while time.monotonic() < stop:
            t = time.perf_counter()
            one()
            with lock:
                latencies.append(time.perf_counter() - t)

    start = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client.close()
    return summarize(latencies, time.monotonic() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", default="1,16,64")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    account = ensure_functional_account()
    work = Path(tempfile.mkdtemp(prefix="chatai-bench-"))
    work.chmod(0o755)
    shutil.copytree(ROOT / "hpcside", work / "hpcside", ignore=shutil.ignore_patterns("__pycache__"))
    state = work / "state"
    ensure_dirs(state)
    upstream_port = free_port()
    start_upstream(upstream_port)
    write_json(state / "routing.json", {"version": 1, "generated_at": time.time(), "slurm_ok": True, "models": {
        "bench": [{"id": "bbbbbbbbbbbb", "url": f"http://127.0.0.1:{upstream_port}", "token": "t", "job_id": "1"}]}})
    write_json(state / "last-reconcile", {"started_at": time.time()})
    config = work / "services.ini"
    config.write_text(f"[hpcside]\nstate_dir = {state}\nlauncher = local\nmin_interval = 1h\n\n"
                      "[service:bench]\ntemplate = vllm-cpu\nmodel_path = /nonexistent\n")
    for path in [work, *work.rglob("*")]:
        shutil.chown(path, account.name, account.name)

    results: dict[str, Any] = {"machine": f"{pyplatform.node()} {os.cpu_count()} cores {pyplatform.machine()}",
                               "python": pyplatform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M"),
                               "command": "python bench/bridge.py " + " ".join(sys.argv[1:]), "runs": {}}
    with SSHServer(account, work, config) as sshd:
        plat = Platform(PlatformConfig(name="bench", transport="ssh", host="127.0.0.1", port=sshd.port,
                                       user=account.name, key_file=str(sshd.client_key),
                                       known_hosts=str(sshd.known_hosts), keepalive=5.0)).start()
        pool = Pool()

        async def direct() -> None:
            resp = await pool.request("127.0.0.1", upstream_port, "POST", "/v1/chat/completions",
                                      {"content-type": "application/json"}, BODY)
            async for _ in resp.body:
                pass

        async def pipe() -> None:
            await plat.request("POST", "/v1/chat/completions", "bench", {"content-type": "application/json"}, BODY)

        async def run_async(level: int) -> dict[str, dict[str, float]]:
            return {"direct": await load(direct, level, args.seconds), "pipe": await load(pipe, level, args.seconds)}

        for level in levels:
            print(f"concurrency {level}: direct and pipe ...", file=sys.stderr, flush=True)
            run = asyncio.run(run_async(level))
            pool = Pool()  # the old one belonged to the finished loop
            # sshd allows MaxSessions (10) channels per connection: the exec design cannot go beyond.
            print(f"concurrency {min(level, 8)}: one exec per request ...", file=sys.stderr, flush=True)
            run["exec"] = exec_per_request(sshd, min(level, 8), args.seconds)
            run["exec"]["concurrency"] = min(level, 8)
            run["pipe_added_p50_ms"] = round(run["pipe"]["p50_ms"] - run["direct"]["p50_ms"], 3)
            results["runs"][str(level)] = run
        plat.stop()
    shutil.rmtree(work, ignore_errors=True)

    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bridge.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"\n{results['machine']}, Python {results['python']}, {results['date']}")
    print(f"{'concurrency':>11} {'path':>7} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for level, run in results["runs"].items():
        for name in ("direct", "pipe", "exec"):
            if name in run:
                r = run[name]
                print(f"{level:>11} {name:>7} {r['rps']:>9} {r['p50_ms']:>8} {r['p99_ms']:>8}")
        print(f"{level:>11} {'added':>7} {'':>9} {run['pipe_added_p50_ms']:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
