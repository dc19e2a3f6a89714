"""The command line: ``python3 -m hpcside COMMAND``. Standard library only.

``main(argv, env)`` takes its environment as arguments so tests drive it in-process.
Exit status: 0 done, 1 the operation failed (the message says why), 2 usage or config.
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import os
import signal
import sys
import time
from pathlib import Path
from typing import List, Mapping, Optional, TextIO

from . import __version__
from .config import Config, ConfigError, load

DEFAULT_CONFIG = "~/.config/hpcside/services.ini"


def config_path(arg: Optional[str], env: Mapping[str, str]) -> Path:
    return Path(os.path.expanduser(arg or env.get("HPCSIDE_CONFIG") or DEFAULT_CONFIG))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m hpcside",
        description="The HPC side of Chat AI: keeps vLLM instances alive as Slurm jobs.",
        epilog=f"The services file is --config, else $HPCSIDE_CONFIG, else {DEFAULT_CONFIG}.",
    )
    parser.add_argument("--version", action="version", version=f"hpcside {__version__}")
    parser.add_argument("--config", metavar="FILE", help="the services configuration (INI)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    sub.add_parser("check-config", help="validate the services file; name every mistake",
                   description="Validate the services file. Every mistake is printed with the file, "
                               "the service and the field; exit status 2 if there is any.")
    sched = sub.add_parser("schedule", help="run one reconcile (for cron or the bridge's ping)",
                           description="Compare wanted and actual instances and submit, drain or cancel "
                                       "Slurm jobs. Runs at most once per min_interval; concurrent "
                                       "calls return at once.")
    sched.add_argument("--force", action="store_true", help="ignore min_interval")
    sched.add_argument("--loop", type=float, metavar="SECONDS",
                       help="keep reconciling every SECONDS until SIGTERM or Ctrl-C")
    sub.add_parser("forcecommand", help="the SSH ForceCommand entry (reads SSH_ORIGINAL_COMMAND)",
                   description="Run the verb in SSH_ORIGINAL_COMMAND: serve, ping, status or version. "
                               "Anything else is refused. Put this in authorized_keys with "
                               "`authorized-key`.")
    key = sub.add_parser("authorized-key", help="print the restricted authorized_keys line for a key",
                         description="Print the authorized_keys line that locks the web server's public key "
                                     "to the ForceCommand (no shell, no forwarding, no pty).")
    key.add_argument("--pubkey", required=True, metavar="FILE", help="the web server's public key file")
    key.add_argument("--python", default="/usr/bin/python3", help="python on the login node")
    key.add_argument("--root", help="directory that holds the hpcside package (default: its parent)")
    stat = sub.add_parser("status", help="services and instances as a table",
                          description="What the last reconcile saw and decided.")
    stat.add_argument("--json", action="store_true", help="machine-readable output")
    nt = sub.add_parser("nodetime", help="each instance's node time as JSON (what the web side collects)",
                        description="Instances that ended at or after --since and those running, with their "
                                    "start, end, nodes, cpus and gpus: from sacct when Slurm keeps accounts, "
                                    "else from hpcside's own records.")
    nt.add_argument("--since", type=float, default=0.0, metavar="EPOCH", help="seconds since the epoch (default 0)")
    return parser


def setup_logging(state_dir: Path, stderr: TextIO, verbose: bool) -> None:
    """Events to state_dir/hpcside.log (owner-only); to stderr too when verbose."""
    logger = logging.getLogger("hpcside")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    if verbose:
        sh = logging.StreamHandler(stderr)
        sh.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(sh)
    old = os.umask(0o077)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.handlers.RotatingFileHandler(state_dir / "hpcside.log", maxBytes=5_000_000, backupCount=3)
    except OSError as exc:
        if verbose:
            print(f"hpcside: cannot write {state_dir / 'hpcside.log'}: {exc.strerror}", file=stderr)
        return
    finally:
        os.umask(old)
    fh.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logger.addHandler(fh)


def main(argv: Optional[List[str]] = None, env: Optional[Mapping[str, str]] = None,
         stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr) -> int:
    env = os.environ if env is None else env
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse printed usage or help
        return int(exc.code or 0)
    path = config_path(args.config, env)
    if args.command == "authorized-key":
        return cmd_authorized_key(args, path, stdout, stderr)
    try:
        config = load(path)
    except ConfigError as exc:
        if args.command == "forcecommand":  # the client sees one line; the operator runs check-config
            print(f"hpcside: the services configuration has {len(exc.problems)} problem(s); "
                  "run check-config on the login node", file=stderr)
            return 2
        print(f"{len(exc.problems)} problem(s) in the services configuration:", file=stderr)
        for line in exc.problems:
            print(f"  {line}", file=stderr)
        return 2
    if args.command == "check-config":
        return cmd_check_config(config, stdout)
    if args.command == "status":
        return cmd_status(config, args.json, stdout)
    if args.command == "nodetime":
        from .nodetime import collect, shared_sacct

        json.dump(collect(config, max(0.0, args.since), shared_sacct(config)), stdout, indent=1, sort_keys=True)
        stdout.write("\n")
        return 0
    if args.command == "forcecommand":
        from .forcecommand import run

        setup_logging(config.settings.state_dir, stderr, verbose=False)
        try:
            return run(config, env, stdout, stderr)
        except Exception as exc:  # the SSH client gets one line, never a traceback
            logging.getLogger("hpcside.forcecommand").error("failed: %s", type(exc).__name__)
            print(f"hpcside: internal error ({type(exc).__name__}); see hpcside.log on the login node", file=stderr)
            return 1
    return cmd_schedule(config, args.force, args.loop, stdout, stderr)


def cmd_authorized_key(args: argparse.Namespace, config: Path, stdout: TextIO, stderr: TextIO) -> int:
    from .forcecommand import authorized_key_line

    root = args.root or str(Path(__file__).resolve().parent.parent)
    try:
        pubkey = Path(args.pubkey).read_text(encoding="utf-8")
        line = authorized_key_line(pubkey, args.python, root, str(config.resolve()))
    except (OSError, ValueError) as exc:
        print(f"hpcside: {args.pubkey}: {getattr(exc, 'strerror', None) or exc}", file=stderr)
        return 1
    print(line, file=stdout)
    return 0


def cmd_check_config(config: Config, stdout: TextIO) -> int:
    from .templates import JobFiles, TemplateError, render

    problems = []
    for svc in config.services.values():
        try:
            render(svc, config.settings, JobFiles(config.settings.state_dir, "0" * 12))
        except TemplateError as exc:
            problems.append(f"{config.path}: [service:{svc.name}] template: {exc}")
    if problems:
        print("\n".join(problems), file=stdout)
        return 2
    print(f"{config.path}: OK, {len(config.services)} service(s)", file=stdout)
    for svc in config.services.values():
        windows = "; ".join(w.text for w in svc.capacity) or "none"
        print(f"  {svc.name}: model {svc.model}, template {Path(svc.template).name}, "
              f"{svc.min_instances}-{svc.max_instances} instances, capacity windows: {windows}", file=stdout)
    return 0


def cmd_status(config: Config, as_json: bool, stdout: TextIO) -> int:
    from .status import collect, render_text

    info = collect(config)
    if as_json:
        json.dump(info, stdout, indent=1, sort_keys=True)
        stdout.write("\n")
    else:
        print(render_text(info), file=stdout)
    return 0


def cmd_schedule(config: Config, force: bool, loop: Optional[float], stdout: TextIO, stderr: TextIO) -> int:
    from .reconcile import Scheduler

    setup_logging(config.settings.state_dir, stderr, verbose=loop is not None)
    scheduler = Scheduler(config)
    if loop is None:
        outcome = scheduler.reconcile(force=force)
        if not outcome.ran:
            print(f"skipped: {outcome.why_skipped}", file=stdout)
            return 0
        for line in outcome.events:
            print(line, file=stdout)
        print(f"reconciled in {outcome.seconds:.2f}s: submitted {len(outcome.submitted)}, "
              f"cancelled {len(outcome.cancelled)}", file=stdout)
        if not outcome.slurm_ok:
            print("Slurm is not answering: nothing was started or stopped; "
                  "see `python3 -m hpcside status`", file=stderr)
            return 1
        return 0
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    try:
        while not stopping:
            scheduler.reconcile(force=True)
            deadline = time.monotonic() + max(loop, 0.2)
            while not stopping and time.monotonic() < deadline:
                time.sleep(0.1)
    except KeyboardInterrupt:
        pass
    return 0
