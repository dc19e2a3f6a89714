"""The local launcher's job leader: runs one job script and makes sure nothing of it is left behind.

Started by ``LocalLauncher.submit`` as ``python watchdog.py --record FILE [--owner PID START] -- argv``
(a plain script, standard library only, so it runs with any interpreter and puts nothing on the
job's import path). It leads the job's process group and ends the whole group, TERM then KILL
after a grace, when any of these happens:

- the job's main process ended (vLLM died, say): children such as multiprocessing's
  ``resource_tracker``, which ignores SIGTERM, would otherwise stay;
- the owner (the web app that started the embedded default) is gone, even killed with SIGKILL;
- the job's record file is gone (its data directory was removed);
- the watchdog itself gets SIGTERM or SIGINT (a cancel).

Slurm jobs do not use it: Slurm owns their processes, and they outlive the web app by design.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from typing import List, Optional

POLL = 0.5
GRACE = 10.0


def start_time(pid: int) -> Optional[str]:
    """Field 22 of /proc/PID/stat (clock ticks since boot), None when gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else fields[19]


def group_members(pgid: int) -> List[int]:
    """Live processes of the process group ``pgid`` (zombies do not count)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(name))
    return out


def end_group(grace: float) -> None:
    """TERM every other process of our group, KILL what is left after ``grace``."""
    me = os.getpid()
    pgid = os.getpgrp()
    others = [pid for pid in group_members(pgid) if pid != me]
    for pid in others:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap()
        if not [pid for pid in group_members(pgid) if pid != me]:
            return
        time.sleep(0.1)
    for pid in group_members(pgid):
        if pid != me:
            _signal(pid, signal.SIGKILL)
    _reap()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="watchdog.py")
    parser.add_argument("--record", required=True, help="the job's record file; gone means stop")
    parser.add_argument("--owner", nargs=2, metavar=("PID", "START"), help="stop when this process is gone")
    parser.add_argument("--grace", type=float, default=GRACE)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command")
    stop = {"why": ""}

    def on_signal(signum: int, _frame: object) -> None:
        stop["why"] = signal.Signals(signum).name

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL)  # same group: we lead it
    code = 0
    record_seen = os.path.exists(args.record)
    while not stop["why"]:
        code_or_none = child.poll()
        if code_or_none is not None:
            code = code_or_none
            stop["why"] = "job ended"
            break
        if args.owner and start_time(int(args.owner[0])) != args.owner[1]:
            stop["why"] = "owner gone"
        elif record_seen and not os.path.exists(args.record):
            stop["why"] = "record gone"
        record_seen = record_seen or os.path.exists(args.record)
        time.sleep(POLL)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    end_group(args.grace)
    print(f"watchdog: {stop['why']}; job stopped", file=sys.stderr, flush=True)
    return code if stop["why"] == "job ended" else 143


if __name__ == "__main__":
    sys.exit(main())
