#!/usr/bin/env python3
"""Faults under load on the real stack, with figures (a benchmark, not a test).

The stack is the fault tests' (tests/test_faults_live.py build_stack): a 3-node Slurm, sshd with
the ForceCommand key, hpcside, the gateway on daphne with PostgreSQL and Redis, two stand-in
instances emitting 20 tokens/s as Slurm jobs. ``--clients`` official openai async clients each
send streaming chats back to back; one fault is injected ``--fault-at`` seconds in; after
``--seconds`` no new request starts and the ones in flight get 90 s to end (those that do not
are "hung"). Per fault it reports: requests, completed whole, client-visible errors (split into
requests started before and after the fault), hung, the longest stall between two events of one
stream, and the time until two instances were ready again.

    .venv/bin/python bench/chaos.py [--clients 32] [--seconds 30] [--only a,b,...] [--vllm]
    .venv/bin/python bench/chaos.py --soak [--soak-clients 500] [--soak-seconds 300]

``--vllm`` adds the scenario on the real model (vLLM for CPU serving SmolLM2 in a Slurm job, its
only instance killed mid-stream). ``--soak`` runs many streaming clients (aiohttp, lighter than
the openai client at this count) with no fault and reports errors and daphne's memory. Needs root
(Slurm, sshd, the functional account). Writes bench/results/chaos.json and docs/reliability.md's
table.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform as pyplatform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from loadgen import step  # noqa: E402

from chatai.management.commands.embedded import SMOLLM2_VLLM_ARGS  # noqa: E402
from tests.harness.accounts import ensure_functional_account  # noqa: E402
from tests.test_faults_live import ASK, DELAY, REPEAT, SENTENCE, Stack, build_stack  # noqa: E402

SCENARIOS = {
    "a": "SIGKILL one of two instances",
    "b": "SIGKILL every instance",
    "e": "slurmctld stopped",
    "f": "the SSH link cut",
    "g": "the hpcside session server killed",
    "c": "a node lost (its slurmd and jobs killed)",
    "d": "walltime renewal (2 min walltime)",
}


@dataclass
class Outcome:
    started: float
    ended: float = 0.0
    error: str = ""
    whole: bool = False
    longest_gap: float = 0.0


@dataclass
class Run:
    outcomes: list[Outcome] = field(default_factory=list)
    fault_at: float = 0.0
    recovered_at: float | None = None


async def stream_once(client: Any, run: Run, repeat: int, extra: dict[str, Any]) -> None:
    out = Outcome(time.monotonic())
    run.outcomes.append(out)
    text, last = "", out.started
    try:
        stream = await client.chat.completions.create(model="stub-model", messages=ASK, stream=True,
                                                      extra_body=extra)
        async for chunk in stream:
            now = time.monotonic()
            out.longest_gap, last = max(out.longest_gap, now - last), now
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
        out.whole = text == SENTENCE * repeat
        if not out.whole:
            out.error = "text lost or repeated"
    except Exception as exc:  # noqa: BLE001 - what the client sees is the result
        out.error = f"{type(exc).__name__}: {str(exc)[:120]}"
    out.ended = time.monotonic()


async def drive(stack: Stack, clients: int, seconds: float, fault_at: float, fault: Callable[[], None],
                repeat: int = REPEAT) -> Run:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{stack.app.url}/v1", api_key=stack.key, max_retries=0, timeout=180)
    run = Run()
    start = time.monotonic()
    stop_at = start + seconds
    extra = {"stub_delay": DELAY, "stub_repeat": repeat}

    async def worker() -> None:
        while time.monotonic() < stop_at:
            await stream_once(client, run, repeat, extra)

    async def inject() -> None:
        await asyncio.sleep(fault_at)
        run.fault_at = time.monotonic()
        await asyncio.to_thread(fault)

    tasks = [asyncio.ensure_future(worker()) for _ in range(clients)]
    injector = asyncio.ensure_future(inject())
    watcher = threading.Thread(target=watch_recovery, args=(stack, run, start + seconds + 90), daemon=True)
    watcher.start()
    done, pending = await asyncio.wait(tasks, timeout=seconds + 90)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    await injector
    await client.close()
    for out in run.outcomes:
        if not out.ended:
            out.error = "hung"
    watcher.join(timeout=1)
    return run


def watch_recovery(stack: Stack, run: Run, until: float) -> None:
    """When, after the fault, two instances were ready again (hpcside's own status)."""
    while time.monotonic() < until and run.recovered_at is None:
        if run.fault_at and time.monotonic() > run.fault_at + 1:
            try:
                if len(stack.ready()) >= 2:
                    run.recovered_at = time.monotonic()
            except Exception:  # noqa: BLE001, S110 - status may fail while Slurm is down
                pass
        time.sleep(0.5)


def summarize(name: str, run: Run) -> dict[str, Any]:
    before = [o for o in run.outcomes if o.started < run.fault_at]
    after = [o for o in run.outcomes if o.started >= run.fault_at]
    return {
        "fault": SCENARIOS.get(name, name), "requests": len(run.outcomes),
        "completed": sum(1 for o in run.outcomes if o.whole),
        "errors_in_flight": sum(1 for o in before if o.error and o.error != "hung"),
        "errors_after": sum(1 for o in after if o.error and o.error != "hung"),
        "hung": sum(1 for o in run.outcomes if o.error == "hung"),
        "longest_stall_s": round(max((o.longest_gap for o in run.outcomes), default=0.0), 2),
        "recovered_s": round(run.recovered_at - run.fault_at, 1) if run.recovered_at else None,
        "sample_errors": sorted({o.error for o in run.outcomes if o.error})[:3],
    }


def faults(stack: Stack, outage: float) -> dict[str, Callable[[], None]]:
    def kill_one() -> None:
        stack.cluster.kill_job_processes(stack.ready()[0]["job_id"])

    def kill_all() -> None:
        for inst in stack.ready():
            stack.cluster.kill_job_processes(inst["job_id"])

    def slurm_down() -> None:
        stack.cluster.stop_controller()
        time.sleep(outage)
        stack.cluster.restart_controller()

    def cut_link() -> None:
        stack.sshd.kill_sessions()

    def kill_server() -> None:
        subprocess.run(["pkill", "-KILL", "-u", stack.h.account.name, "-f", "hpcside.*forcecommand"], check=False)

    def lose_node() -> None:
        stack.cluster.kill_node(stack.ready()[0]["node"])

    return {"a": kill_one, "b": kill_all, "e": slurm_down, "f": cut_link, "g": kill_server, "c": lose_node}


def scenario_runs(args: argparse.Namespace, account: Any, deployment: Path) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    wanted = [s for s in "abefgc" if s in args.only]
    if wanted:
        with build_stack(account, deployment) as stack:
            table = faults(stack, args.outage)
            for name in wanted:  # c last: the cluster keeps two nodes after it
                stack.wait_ready(2)
                step(f"{name}: {SCENARIOS[name]} under {args.clients} streaming clients")
                seconds = max(args.seconds, args.outage + 15) if name == "e" else args.seconds
                run = asyncio.run(drive(stack, args.clients, seconds, args.fault_at, table[name]))
                results[name] = summarize(name, run)
                if name in ("e", "f", "g"):
                    results[name]["recovered_s"] = None  # no instance was lost: nothing to come back
                print(json.dumps(results[name]), flush=True)
    if "d" in args.only:
        # A 2-minute walltime with a 100 s renewal margin: each instance is renewed 20 s after it
        # starts and its successor takes over while the streams run.
        with build_stack(account, deployment, walltime="2m", renewal_margin="100s") as stack:
            step(f"d: {SCENARIOS['d']} under {args.clients} streaming clients for 60 s")
            first = {i["id"] for i in stack.ready()}
            run = asyncio.run(drive(stack, args.clients, 60, 0.1, lambda: None))
            results["d"] = summarize("d", run)
            results["d"]["renewed"] = len({i["id"] for i in stack.ready()} - first)
            results["d"]["recovered_s"] = None
            print(json.dumps(results["d"]), flush=True)
    return results


def vllm_run(args: argparse.Namespace, account: Any, deployment: Path) -> dict[str, Any] | None:
    """The real model: its only instance SIGKILLed mid-stream; streams go on once it is replaced."""
    import openai
    from paper import runtime_paths  # the one place that knows the vLLM cache layout

    from tests.conftest import Hpcside
    from tests.harness.slurm import SlurmCluster
    from tests.harness.sshd import SSHServer
    from tests.live import LiveApp

    python, model_dir = runtime_paths()
    if not python.exists() or not model_dir.exists():
        print("vLLM runtime or model missing: run scripts/test.sh once", file=sys.stderr)
        return None
    with SlurmCluster(["n1"], account) as cluster:
        h = Hpcside(deployment, account, cluster)
        h.write_config("\n".join([
            "[service:smollm2]", "model = SmolLM2-135M-Instruct", "template = vllm-cpu", f"model_path = {model_dir}",
            f"vllm_args = {SMOLLM2_VLLM_ARGS}", "max_model_len = 2048", "cpus = 2", "min_instances = 1",
            "max_instances = 1", "walltime = 30m",
            "renewal_margin = 5m", "readiness_timeout = 5m"]) + "\n", python=str(python), hold_timeout="5m",
            probe_timeout="2s")
        try:
            with SSHServer(h.account, h.deployment, h.config, slurm_env=f"SLURM_CONF={cluster.conf}") as sshd:
                app = LiveApp(extra_env={"HPC_PLATFORMS": json.dumps([{
                    "name": "hpc", "transport": "ssh", "host": "127.0.0.1", "port": sshd.port,
                    "user": h.account.name, "key_file": str(sshd.client_key), "known_hosts": str(sshd.known_hosts)}])})
                app.start()
                try:
                    app.create_user("alice")
                    key = app.create_key("alice")
                    (inst,) = h.until(lambda: h.ready("smollm2"), timeout=300, what="vLLM ready")
                    step("vLLM: its only instance SIGKILLed under 4 streaming clients")

                    async def go() -> dict[str, Any]:
                        client = openai.AsyncOpenAI(base_url=f"{app.url}/v1", api_key=key, max_retries=0,
                                                    timeout=600)
                        outs: list[Outcome] = []

                        async def one() -> None:
                            out = Outcome(time.monotonic())
                            outs.append(out)
                            text, last = "", out.started
                            try:
                                stream = await client.chat.completions.create(
                                    model="SmolLM2-135M-Instruct", stream=True, temperature=0, max_tokens=400,
                                    messages=[{"role": "user", "content": "Tell me about Paris."}])
                                async for chunk in stream:
                                    now = time.monotonic()
                                    out.longest_gap, last = max(out.longest_gap, now - last), now
                                    if chunk.choices:
                                        text += chunk.choices[0].delta.content or ""
                                out.whole = bool(text.strip())
                            except Exception as exc:  # noqa: BLE001
                                out.error = f"{type(exc).__name__}: {str(exc)[:120]}"
                            out.ended = time.monotonic()

                        tasks = [asyncio.ensure_future(one()) for _ in range(4)]
                        while len(outs) < 4 or any(o.longest_gap == 0.0 for o in outs):
                            await asyncio.sleep(0.2)  # every stream has tokens: now the cut is mid-stream
                        await asyncio.sleep(1.0)
                        fault_at = time.monotonic()
                        cluster.kill_job_processes(inst["job_id"])
                        await asyncio.wait_for(asyncio.gather(*tasks), 600)
                        await client.close()
                        cut = sum(1 for o in outs if o.ended > fault_at)
                        return {"fault": f"vLLM (SmolLM2): its only instance SIGKILLed mid-stream ({cut} of 4 "
                                         "streams running)",
                                "requests": len(outs), "completed": sum(1 for o in outs if o.whole),
                                "errors_in_flight": sum(1 for o in outs if o.error), "errors_after": 0, "hung": 0,
                                "longest_stall_s": round(max(o.longest_gap for o in outs), 2),
                                "recovered_s": round(max(o.ended for o in outs) - fault_at, 1),
                                "sample_errors": sorted({o.error for o in outs if o.error})[:3]}

                    result = asyncio.run(go())
                    print(json.dumps(result), flush=True)
                    return result
                finally:
                    app.stop()
        finally:
            h.cleanup()


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def soak(args: argparse.Namespace, account: Any, deployment: Path) -> dict[str, Any]:
    """Many streaming clients for minutes, no fault: errors and daphne's memory after warm-up."""
    import aiohttp

    with build_stack(account, deployment, extra_env={"PYTHONASYNCIODEBUG": ""}) as stack:
        daphne = stack.app.procs[0].pid
        step(f"soak: {args.soak_clients} streaming clients for {args.soak_seconds} s")
        body = json.dumps({"model": "stub-model", "messages": ASK, "stream": True,
                           "stub_delay": 0.2, "stub_repeat": 4}).encode()
        headers = {"Authorization": f"Bearer {stack.key}", "Content-Type": "application/json"}
        counts = {"requests": 0, "completed": 0, "errors": 0}
        errors: list[str] = []
        rss: dict[str, int] = {}

        async def go() -> None:
            stop_at = time.monotonic() + args.soak_seconds
            conn = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=180)) as session:
                async def worker() -> None:
                    while time.monotonic() < stop_at:
                        counts["requests"] += 1
                        try:
                            async with session.post(f"{stack.app.url}/v1/chat/completions", data=body,
                                                    headers=headers) as resp:
                                raw = await resp.read()
                            if resp.status == 200 and raw.endswith(b"data: [DONE]\n\n") and b'"error"' not in raw:
                                counts["completed"] += 1
                            else:
                                counts["errors"] += 1
                                errors.append(f"{resp.status} {raw[-200:]!r}")
                        except Exception as exc:  # noqa: BLE001
                            counts["errors"] += 1
                            errors.append(f"{type(exc).__name__}: {exc}")

                async def sample() -> None:
                    await asyncio.sleep(min(60, args.soak_seconds / 3))
                    rss["warm_kb"] = rss_kb(daphne)
                    while time.monotonic() < stop_at:
                        await asyncio.sleep(5)
                        rss["end_kb"] = rss_kb(daphne)

                await asyncio.gather(sample(), *[worker() for _ in range(args.soak_clients)])

        asyncio.run(go())
        result = {**counts, "clients": args.soak_clients, "seconds": args.soak_seconds,
                  "daphne_rss_after_warmup_mb": round(rss.get("warm_kb", 0) / 1024, 1),
                  "daphne_rss_end_mb": round(rss.get("end_kb", 0) / 1024, 1),
                  "rss_growth_mb": round((rss.get("end_kb", 0) - rss.get("warm_kb", 0)) / 1024, 1),
                  "sample_errors": errors[:3]}
        print(json.dumps(result), flush=True)
        return result


def write_doc(report: dict[str, Any]) -> None:
    doc = ROOT / "docs" / "reliability.md"
    text = doc.read_text()
    marker_a, marker_b = "<!-- chaos:begin -->", "<!-- chaos:end -->"
    rows = ["| fault | requests | completed whole | errors (in flight / started after) | hung | longest stall | "
            "instances back after |", "|---|---|---|---|---|---|---|"]
    for result in report.get("scenarios", {}).values():
        rec = f"{result['recovered_s']} s" if result.get("recovered_s") is not None else "-"
        rows.append(f"| {result['fault']} | {result['requests']} | {result['completed']} | "
                    f"{result['errors_in_flight']} / {result['errors_after']} | {result['hung']} | "
                    f"{result['longest_stall_s']} s | {rec} |")
    soak_result = report.get("soak")
    if soak_result:
        rows += ["", f"Soak: {soak_result['clients']} streaming clients for {soak_result['seconds']} s: "
                     f"{soak_result['requests']} requests, {soak_result['completed']} completed, "
                     f"{soak_result['errors']} errors; daphne RSS {soak_result['daphne_rss_after_warmup_mb']} MB "
                     f"after warm-up, {soak_result['daphne_rss_end_mb']} MB at the end "
                     f"({soak_result['rss_growth_mb']:+} MB)."]
    commands = ", ".join(f"`{c}`" for c in report.get("commands", []))
    block = "\n".join([marker_a, f"Measured {report['date']} on {report['machine']}; commands: {commands}.",
                       "", *rows, marker_b])
    if marker_a in text:
        text = text[:text.index(marker_a)] + block + text[text.index(marker_b) + len(marker_b):]
    else:
        text += "\n" + block + "\n"
    doc.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--fault-at", type=float, default=8)
    parser.add_argument("--outage", type=float, default=60, help="seconds slurmctld stays down")
    parser.add_argument("--only", default="abefgcd", help="scenario letters (a b c d e f g)")
    parser.add_argument("--vllm", action="store_true", help="also the scenario on the real model")
    parser.add_argument("--soak", action="store_true", help="only the soak")
    parser.add_argument("--soak-clients", type=int, default=500)
    parser.add_argument("--soak-seconds", type=float, default=300)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "chaos.json"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/chaos.py needs root: it starts Slurm and sshd and runs jobs as the functional account")
    account = ensure_functional_account()
    deployment = Path(tempfile.mkdtemp(prefix="chatai-chaos-"))
    deployment.chmod(0o755)
    shutil.copytree(ROOT / "hpcside", deployment / "hpcside", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("stub_vllm.py", "stub.sh"):
        shutil.copy(ROOT / "tests" / "support" / name, deployment / name)
    for path in deployment.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    out = Path(args.out)
    report: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    command = "python bench/chaos.py " + " ".join(sys.argv[1:])
    report.update({"date": datetime.date.today().isoformat(),
                   "machine": f"{os.cpu_count()} cores, {pyplatform.machine()}, {pyplatform.platform()}",
                   "commands": sorted(set(report.get("commands", [])) | {command})})
    try:
        if args.soak:
            report["soak"] = soak(args, account, deployment)
        else:
            # Merged into the last report: a rerun of some scenarios keeps the others' figures.
            report.setdefault("scenarios", {}).update(scenario_runs(args, account, deployment))
            if args.vllm:
                result = vllm_run(args, account, deployment)
                if result:
                    report["scenarios"]["vllm"] = result
    finally:
        shutil.rmtree(deployment, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    write_doc(report)
    step(f"wrote {out} and docs/reliability.md")


if __name__ == "__main__":
    main()
