"""Launchers: one interface, two implementations (Slurm and local processes).

Both run the same rendered job script. Slurm reads its ``#SBATCH`` lines; for the local
launcher they are comments. The parsers are pure functions so they are tested without
Slurm; the thin subprocess calls around them are tested against a real Slurm.
"""

from __future__ import annotations

import datetime
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .state import read_json, write_json
from .watchdog import group_members

WATCHDOG = Path(__file__).resolve().with_name("watchdog.py")
OWNER_ENV = "HPCSIDE_OWNER_PID"  # the embedded default's web app: its jobs end with it


class LauncherError(Exception):
    """The batch system did not answer or refused; the message says which command and why."""


class SubmissionError(LauncherError):
    """sbatch (or the local spawn) failed for this job."""


@dataclass(frozen=True)
class Job:
    job_id: str
    name: str
    state: str  # Slurm's long state name: PENDING, RUNNING, COMPLETING, ...
    node: str = ""
    time_left: Optional[float] = None  # seconds, None when unlimited/unknown
    reason: str = ""


class Launcher:
    """Submit, list and cancel the functional account's service jobs."""

    def submit(self, script: Path, name: str, output: Path, walltime: float) -> str:
        raise NotImplementedError

    def list_jobs(self, prefix: str) -> List[Job]:
        """Jobs whose name starts with ``prefix``; raises LauncherError if unanswerable."""
        raise NotImplementedError

    def cancel(self, job_ids: Sequence[str]) -> None:
        raise NotImplementedError

    def start_estimate(self, script: Path, now: float) -> Optional[float]:
        """Seconds until a job of ``script`` could start, None if unknown. Local jobs start at once."""
        return 0.0


# -- Slurm ------------------------------------------------------------------------------

SQUEUE_FORMAT = "%i|%j|%T|%N|%L|%r"
ACTIVE_STATES = "PENDING,CONFIGURING,RUNNING,COMPLETING,SUSPENDED,REQUEUED,RESIZING,SIGNALING,STAGE_OUT"


def parse_sbatch(stdout: str) -> str:
    """``sbatch --parsable`` prints ``JOBID`` or ``JOBID;CLUSTER``."""
    first = stdout.strip().splitlines()[0] if stdout.strip() else ""
    job_id = first.split(";", 1)[0]
    if not re.fullmatch(r"\d+", job_id):
        raise SubmissionError(f"sbatch printed no job id: {stdout.strip()[:200]!r}")
    return job_id


def parse_test_only(text: str, now: float) -> Optional[float]:
    """``sbatch --test-only``: "sbatch: Job 12 to start at 2026-12-02T07:50:00 using 1 processors on
    nodes n1 in partition debug" -> seconds from ``now`` (local time, as Slurm prints it)."""
    m = re.search(r"to start at (\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})", text)
    if not m:
        return None
    when = datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").timestamp()
    return max(0.0, round(when - now, 1))


def parse_time_left(text: str) -> Optional[float]:
    """squeue's %L: ``[D-][HH:]MM:SS``, or UNLIMITED / NOT_SET / INVALID."""
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text.strip())
    if not m:
        return None
    days, hours, mins, secs = (int(g or 0) for g in m.groups())
    return float(days * 86400 + hours * 3600 + mins * 60 + secs)


def parse_squeue(stdout: str, prefix: str) -> List[Job]:
    """Rows of ``squeue -h -o SQUEUE_FORMAT``; names not starting with prefix are skipped."""
    jobs = []
    for line in stdout.splitlines():
        parts = line.split("|")
        if len(parts) != 6:
            continue
        job_id, name, state, node, left, reason = (p.strip() for p in parts)
        if not name.startswith(prefix) or not re.fullmatch(r"\d+(_\d+)?", job_id):
            continue
        node = "" if node in ("", "(null)") else node
        reason = "" if reason in ("None", "(null)") else reason
        jobs.append(Job(job_id, name, state, node, parse_time_left(left), reason))
    return jobs


class SlurmLauncher(Launcher):
    def __init__(self, timeout: float = 20.0, user: Optional[str] = None,
                 env: Optional[Dict[str, str]] = None) -> None:
        self.timeout = timeout
        self.user = user or pwd.getpwuid(os.geteuid()).pw_name
        self.env = env

    def _run(self, argv: List[str]) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(
                argv, capture_output=True, text=True, timeout=self.timeout, check=False, env=self.env
            )
        except FileNotFoundError:
            raise LauncherError(f"{argv[0]} not found: is Slurm installed on this node?") from None
        except subprocess.TimeoutExpired:
            raise LauncherError(f"{argv[0]} did not answer within {self.timeout:g}s") from None

    def submit(self, script: Path, name: str, output: Path, walltime: float) -> str:
        proc = self._run(
            ["sbatch", "--parsable", f"--job-name={name}", f"--output={output}", "--no-requeue", str(script)]
        )
        if proc.returncode != 0:
            raise SubmissionError(f"sbatch failed: {_first_line(proc.stderr)}")
        return parse_sbatch(proc.stdout)

    def list_jobs(self, prefix: str) -> List[Job]:
        # Not --json: on Slurm 22.05 it ignores the user filter.
        proc = self._run(["squeue", "-h", "-u", self.user, "-t", ACTIVE_STATES, "-o", SQUEUE_FORMAT])
        if proc.returncode != 0:
            raise LauncherError(f"squeue failed: {_first_line(proc.stderr)}")
        return parse_squeue(proc.stdout, prefix)

    def start_estimate(self, script: Path, now: float) -> Optional[float]:
        """Seconds until a job of this script could start, from ``sbatch --test-only`` (submits nothing)."""
        proc = self._run(["sbatch", "--test-only", str(script)])
        return parse_test_only(proc.stdout + proc.stderr, now)

    def cancel(self, job_ids: Sequence[str]) -> None:
        if not job_ids:
            return
        proc = self._run(["scancel", *job_ids])
        # scancel reports already-finished jobs as errors: those are cancelled enough.
        if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
            raise LauncherError(f"scancel failed: {_first_line(proc.stderr)}")


def _first_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[0][:300] if lines else "(no message)"


# -- local processes ---------------------------------------------------------------------


def _proc_start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":  # a zombie has finished
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return None
    return fields[19]


class LocalLauncher(Launcher):
    """Runs job scripts as local process groups; for the single-machine default and tests.

    Job records live in ``<state>/local-jobs`` so that separate invocations (cron,
    session servers) see the same jobs. Walltime is enforced here as Slurm would.
    """

    KILL_AFTER = 10.0

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "local-jobs"
        old = os.umask(0o077)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        finally:
            os.umask(old)

    def _next_id(self) -> str:
        counter = self.dir / "counter"
        fd = os.open(counter, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.read(fd, 32).decode() or "0"
            value = int(raw) + 1 if raw.isdigit() else 1
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, str(value).encode())
        finally:
            os.close(fd)
        return f"L{value}"

    def submit(self, script: Path, name: str, output: Path, walltime: float) -> str:
        job_id = self._next_id()
        record = self.dir / f"{job_id}.json"
        env = {**os.environ, "SLURM_JOB_ID": job_id, "SLURM_JOB_NAME": name}
        # The watchdog leads the job's group: nothing of the job outlives it, its record or its owner.
        argv = [sys.executable, str(WATCHDOG), "--record", str(record), "--grace", str(self.KILL_AFTER - 2)]
        owner = env.pop(OWNER_ENV, "")
        if owner.isdigit() and _proc_start_time(int(owner)) is not None:
            argv += ["--owner", owner, str(_proc_start_time(int(owner)))]
        argv += ["--", "/bin/bash", str(script)]
        try:
            with open(output, "ab") as out:
                os.chmod(output, 0o600)
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, env=env, start_new_session=True, close_fds=True,
                )
        except OSError as exc:
            raise SubmissionError(f"cannot start {script}: {exc.strerror}") from None
        write_json(record, {
            "job_id": job_id, "name": name, "pid": proc.pid, "start": _proc_start_time(proc.pid),
            "submitted_at": time.time(), "walltime": walltime, "cancelled_at": None,
        })
        return job_id

    def _records(self) -> List[Dict]:
        out = []
        for path in sorted(self.dir.glob("L*.json")):
            data = read_json(path)
            if isinstance(data, dict) and isinstance(data.get("pid"), int):
                out.append(data)
        return out

    def _alive(self, rec: Dict) -> bool:
        start = _proc_start_time(rec["pid"])
        return start is not None and start == rec.get("start")

    def list_jobs(self, prefix: str) -> List[Job]:
        now = time.time()
        jobs = []
        for rec in self._records():
            path = self.dir / f"{rec['job_id']}.json"
            if not self._alive(rec):
                self._end_leftovers(rec)
                path.unlink(missing_ok=True)
                continue
            elapsed = now - rec["submitted_at"]
            left = rec["walltime"] - elapsed
            cancelled = rec.get("cancelled_at")
            if left <= 0 and not cancelled:  # walltime reached: Slurm would TIMEOUT it
                self._signal(rec, signal.SIGTERM)
                rec["cancelled_at"] = cancelled = now
                write_json(path, rec)
            if cancelled and now - cancelled > self.KILL_AFTER:
                self._signal(rec, signal.SIGKILL)
            if not rec["name"].startswith(prefix):
                continue
            state = "COMPLETING" if cancelled else "RUNNING"
            jobs.append(Job(rec["job_id"], rec["name"], state, socket.gethostname(), max(left, 0.0)))
        return jobs

    def _end_leftovers(self, rec: Dict) -> None:
        """The leader is gone; what is left of its group (its watchdog was killed, say) goes too.
        The group id cannot have been reused while any member lives."""
        if group_members(rec["pid"]):
            self._signal(rec, signal.SIGKILL)

    def _signal(self, rec: Dict, sig: int) -> None:
        try:
            os.killpg(rec["pid"], sig)
        except (ProcessLookupError, PermissionError):
            pass

    def cancel(self, job_ids: Sequence[str]) -> None:
        wanted = set(job_ids)
        for rec in self._records():
            if rec["job_id"] in wanted and self._alive(rec):
                self._signal(rec, signal.SIGTERM)
                rec["cancelled_at"] = rec.get("cancelled_at") or time.time()
                write_json(self.dir / f"{rec['job_id']}.json", rec)

    def kill_all(self, prefix: str) -> int:
        """Stop every job now (the embedded default's Ctrl-C): TERM, then KILL. Returns how many."""
        recs = [r for r in self._records() if r["name"].startswith(prefix) and self._alive(r)]
        for rec in recs:
            self._signal(rec, signal.SIGTERM)
        deadline = time.monotonic() + self.KILL_AFTER
        while any(group_members(r["pid"]) for r in recs) and time.monotonic() < deadline:
            time.sleep(0.1)
        for rec in recs:
            if group_members(rec["pid"]):
                self._signal(rec, signal.SIGKILL)  # a child that ignores TERM, say
            (self.dir / f"{rec['job_id']}.json").unlink(missing_ok=True)
        return len(recs)


def make_launcher(kind: str, state_dir: Path, timeout: float) -> Launcher:
    if kind == "local":
        return LocalLauncher(state_dir)
    return SlurmLauncher(timeout=timeout)


__all__ = ["Job", "Launcher", "LauncherError", "LocalLauncher", "SlurmLauncher", "SubmissionError",
           "make_launcher", "parse_sbatch", "parse_squeue", "parse_time_left"]
