"""Start and stop a REAL Slurm cluster on this machine for the tests.

One slurmctld and one slurmd per node (Debian's build supports several slurmd on one
host), munge for authentication, a private configuration and state directory, and a
clean stop: jobs cancelled and drained, then slurmd, then slurmctld. Every failure to
start raises ``HarnessError`` with the daemon's own log tail, so a broken CI run says why.

``accounting=True`` adds slurmdbd on the machine's MariaDB (127.0.0.1:3306, root) with a
database of its own, dropped at stop, so that ``sacct`` works. It is off by default: it
adds about 2 s to a start and only the charge-back tests need it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .accounts import Account, HarnessError, kill_user_processes, stop_process_group

REQUIRED = ("slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol", "munged")
REQUIRED_ACCOUNTING = ("slurmdbd", "sacct", "sacctmgr", "mariadb")
MARIADB = ("mariadb", "--protocol=tcp", "-h", "127.0.0.1", "-P", "3306", "-u", "root")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def munge_works() -> bool:
    cred = subprocess.run(["munge", "-n"], capture_output=True, check=False)
    if cred.returncode != 0:
        return False
    return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, check=False).returncode == 0


def ensure_munge() -> None:
    """munged must be running; start it (as user munge) if it is not."""
    if munge_works():
        return
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        subprocess.run(["mungekey", "-c", "-k", str(key)], check=True)
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
    proc = subprocess.run(
        ["runuser", "-u", "munge", "--", "munged"], capture_output=True, text=True, check=False
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if munge_works():
            return
        time.sleep(0.1)
    raise HarnessError(f"munged did not start: {proc.stderr.strip()}")


@dataclass
class SlurmCluster:
    """A running cluster; use as a context manager or call ``stop()``."""

    nodes: list[str]
    account: Account
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="chatai-slurm-")))
    slurmd_timeout: int = 5
    accounting: bool = False  # slurmdbd + MariaDB, for sacct
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    database: str = ""  # slurmdbd's database, while it exists
    dbd_port: int = 0

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm client commands against this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- start -----------------------------------------------------------------

    def start(self) -> SlurmCluster:
        try:
            return self._start()
        except BaseException:
            self.stop()  # nothing half-started outlives the error: daemons, jobs, the database
            raise

    def _start(self) -> SlurmCluster:
        missing = [c for c in REQUIRED if shutil.which(c) is None]
        if missing:
            raise HarnessError(
                f"Slurm is not installed (missing {', '.join(missing)}): "
                "apt-get install -y --no-install-recommends slurm-wlm munge"
            )
        if self.accounting:
            missing = [c for c in REQUIRED_ACCOUNTING if shutil.which(c) is None]
            if missing:
                raise HarnessError(
                    f"Slurm accounting is not installed (missing {', '.join(missing)}): "
                    "apt-get install -y --no-install-recommends slurmdbd mariadb-client"
                )
        ensure_munge()
        self.root.chmod(0o755)
        for sub in ("etc", "state", "log", "spool"):
            (self.root / sub).mkdir(exist_ok=True)
        for node in self.nodes:
            (self.root / "spool" / node).mkdir(exist_ok=True)
        self.conf.write_text(self._render_conf())
        # slurmd reads cgroup.conf beside slurm.conf; linuxproc tracking does not need it,
        # but an empty one keeps slurmd from logging a missing-file error.
        (self.root / "etc" / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")
        self.conf.chmod(0o644)
        if self.accounting:
            self._start_slurmdbd()
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-i", "-f", str(self.conf)])
        self._wait(lambda: self._ctl_ping(), "slurmctld", 15)
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        self._wait(self._all_nodes_idle, "slurmd", 20)
        if self.accounting:
            self._register_account()
        return self

    # -- accounting: slurmdbd on MariaDB ------------------------------------------

    def _start_slurmdbd(self) -> None:
        # One database per cluster: parallel or leftover runs never share accounting data.
        self.database = f"chatai_acct_{os.getpid()}_{self.root.name.rsplit('-', 1)[-1].lower()}"
        self.database = "".join(c if c.isalnum() else "_" for c in self.database)
        self._drop_stale_databases()
        self.mariadb(f"CREATE DATABASE `{self.database}`")
        # slurmdbd reads slurmdbd.conf beside the slurm.conf named by SLURM_CONF; it must be
        # owned by SlurmUser and unreadable by others (it may hold the database password).
        dbd_conf = self.root / "etc" / "slurmdbd.conf"
        dbd_conf.write_text("\n".join([
            "AuthType=auth/munge",
            "DbdHost=localhost",
            "DbdAddr=127.0.0.1",
            f"DbdPort={self.dbd_port}",
            "SlurmUser=root",
            "StorageType=accounting_storage/mysql",
            "StorageHost=127.0.0.1",
            "StoragePort=3306",
            "StorageUser=root",
            f"StorageLoc={self.database}",
            f"PidFile={self.root}/slurmdbd.pid",
            f"LogFile={self.root}/log/slurmdbd.log",
            "DebugLevel=info",
        ]) + "\n")
        dbd_conf.chmod(0o600)
        self._spawn("slurmdbd", ["slurmdbd", "-D"])
        self._wait(self._dbd_listening, "slurmdbd", 20)

    def _dbd_listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.dbd_port), timeout=0.5):
                return True
        except OSError:
            return False

    def _register_account(self) -> None:
        """The functional account under a Slurm account, as on a real cluster (slurmctld has
        registered the cluster itself by now)."""
        cluster = self.cluster_name
        deadline = time.monotonic() + 20
        while True:
            shown = self.sacctmgr("-n", "-P", "show", "cluster", "format=cluster")
            if cluster in shown.stdout.split():
                break
            if time.monotonic() > deadline:
                raise HarnessError(f"slurmctld did not register cluster {cluster} with slurmdbd:\n"
                                   + self.log_tail("slurmdbd") + "\n" + self.log_tail("slurmctld"))
            time.sleep(0.2)
        for args in (("add", "account", "chatai", f"cluster={cluster}"),
                     ("add", "user", self.account.name, "account=chatai", f"cluster={cluster}")):
            proc = self.sacctmgr("-i", *args)
            if proc.returncode != 0:
                raise HarnessError(f"sacctmgr {' '.join(args)} failed: {proc.stderr.strip()}")

    def sacctmgr(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sacctmgr", *args], capture_output=True, text=True, env=self.env,
                              check=False, timeout=30)

    def _drop_stale_databases(self) -> None:
        """Databases of earlier runs whose process is gone (killed before it could drop them)."""
        for name in self.mariadb("SHOW DATABASES LIKE 'chatai\\_acct\\_%'").split():
            pid = name.split("_")[2]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                self.mariadb(f"DROP DATABASE IF EXISTS `{name}`")

    def mariadb(self, sql: str) -> str:
        proc = subprocess.run([*MARIADB, "-N", "-B", "-e", sql], capture_output=True, text=True, check=False,
                              timeout=30)
        if proc.returncode != 0:
            raise HarnessError(f"MariaDB at 127.0.0.1:3306 refused {sql!r}: {proc.stderr.strip()} (is mariadbd "
                               "running? start-stop-daemon --start --background --exec /usr/sbin/mariadbd)")
        return proc.stdout

    def _drop_database(self) -> None:
        if self.database:
            try:
                self.mariadb(f"DROP DATABASE IF EXISTS `{self.database}`")
            except (HarnessError, subprocess.TimeoutExpired):
                pass
            self.database = ""

    @property
    def cluster_name(self) -> str:
        # Unique per cluster, not per process: accounting keys its tables by cluster name.
        tail = "".join(c for c in self.root.name.rsplit("-", 1)[-1].lower() if c.isalnum())[:4]
        return f"chatai{os.getpid() % 10000}{tail}"

    def _render_conf(self) -> str:
        ctl_port = free_port()
        host = socket.gethostname().split(".")[0]
        if self.accounting:
            self.dbd_port = free_port()
            storage = ["AccountingStorageType=accounting_storage/slurmdbd",
                       "AccountingStorageHost=localhost", f"AccountingStoragePort={self.dbd_port}"]
        else:
            storage = ["AccountingStorageType=accounting_storage/none"]
        lines = [
            f"ClusterName={self.cluster_name}",
            f"SlurmctldHost={host}",
            f"SlurmctldPort={ctl_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"StateSaveLocation={self.root}/state",
            f"SlurmdSpoolDir={self.root}/spool/%n",
            f"SlurmctldPidFile={self.root}/slurmctld.pid",
            f"SlurmdPidFile={self.root}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.root}/log/slurmctld.log",
            f"SlurmdLogFile={self.root}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            *storage,
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.root}/log/jobcomp.txt",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            f"SlurmdTimeout={self.slurmd_timeout}",
            "SlurmctldTimeout=10",
            "MessageTimeout=5",
            "KillWait=2",
            "MinJobAge=30",
            "InactiveLimit=0",
            "SchedulerParameters=sched_min_interval=0,batch_sched_delay=0,sched_interval=1",
        ]
        for node in self.nodes:
            lines.append(
                f"NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 Port={free_port()} "
                "CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 "
                "RealMemory=2000 State=UNKNOWN"
            )
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stderr", "wb")  # noqa: SIM115 - lives with the daemon
        self.procs[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )

    def _wait(self, ready: object, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if callable(ready) and ready():
                return
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise HarnessError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            time.sleep(0.1)
        raise HarnessError(f"{what} not ready after {timeout}s:\n" + "\n".join(
            self.log_tail(n) for n in self.procs))

    def log_tail(self, name: str, lines: int = 15) -> str:
        out = []
        for path in (self.root / "log" / f"{name}.stderr", self.root / "log" / f"{name}.log"):
            if path.exists():
                out += path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- {name} ---\n" + "\n".join(out)

    def _ctl_ping(self) -> bool:
        proc = self.scontrol("ping")
        return proc.returncode == 0 and "UP" in proc.stdout

    def _all_nodes_idle(self) -> bool:
        states = self.node_states()
        return len(states) == len(self.nodes) and all(s.startswith("idle") for s in states.values())

    # -- queries used by the tests ---------------------------------------------

    def scontrol(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["scontrol", *args], capture_output=True, text=True, env=self.env, check=False, timeout=20
        )

    def node_states(self) -> dict[str, str]:
        proc = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, env=self.env,
            check=False, timeout=20,
        )
        states = {}
        for line in proc.stdout.splitlines():
            name, state = line.split()
            states[name] = state
        return states

    def jobs(self) -> list[dict[str, str]]:
        """Pending and running jobs of the functional account: id, name, state, node."""
        proc = subprocess.run(
            ["squeue", "-h", "-u", self.account.name, "-o", "%i|%j|%T|%N"],
            capture_output=True, text=True, env=self.env, check=False, timeout=20,
        )
        rows = []
        for line in proc.stdout.splitlines():
            jid, name, state, node = line.split("|")
            rows.append({"id": jid, "name": name, "state": state, "node": node})
        return rows

    def kill_node(self, node: str) -> None:
        """Simulate a node failure: its slurmd dies and so does everything it was running."""
        proc = self.procs[f"slurmd-{node}"]
        job_ids = [j["id"] for j in self.jobs() if j["node"] == node]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for jid in job_ids:
            # slurmstepd of the job and the job's processes (the machine "lost power").
            subprocess.run(["pkill", "-KILL", "-f", f"slurmstepd: \\[{jid}\\."], check=False)
            self.kill_job_processes(jid)

    def kill_job_processes(self, job_id: str) -> int:
        """SIGKILL the processes a job runs (its server crashed); returns how many."""
        killed = 0
        pids = subprocess.run(["pgrep", "-u", self.account.name], capture_output=True, text=True,
                              check=False).stdout.split()
        for pid in pids:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            if f"SLURM_JOB_ID={job_id}\0".encode() in environ:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
        return killed

    def stop_controller(self) -> None:
        """Make Slurm itself unresponsive (slurmctld killed)."""
        proc = self.procs.pop("slurmctld")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def restart_controller(self) -> None:
        """slurmctld back after an outage, recovering its saved state (jobs keep running)."""
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self._ctl_ping(), "slurmctld", 30)

    # -- stop --------------------------------------------------------------------

    def stop(self) -> None:
        if "slurmctld" in self.procs:
            subprocess.run(["scancel", "-u", self.account.name], env=self.env, capture_output=True,
                           check=False, timeout=20)
            deadline = time.monotonic() + 15
            while self.jobs() and time.monotonic() < deadline:
                time.sleep(0.2)
        order = {"slurmctld": 1, "slurmdbd": 2}  # slurmd first, slurmdbd last (slurmctld reports to it)
        for name in sorted(self.procs, key=lambda n: order.get(n, 0)):
            stop_process_group(self.procs[name])
        self.procs.clear()
        self._drop_database()
        # slurmstepd of jobs whose node or controller was killed, and what the account left running.
        for pid in self.leftover_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        kill_user_processes(self.account)
        shutil.rmtree(self.root, ignore_errors=True)

    def leftover_processes(self) -> list[int]:
        """Processes started for this cluster (they carry its SLURM_CONF), other than our daemons."""
        marker = f"SLURM_CONF={self.conf}\0".encode()
        ours = {proc.pid for proc in self.procs.values()}
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in ours or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
