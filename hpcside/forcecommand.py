"""The ForceCommand entry: the only thing the web server's SSH key can run.

sshd puts the client's command in SSH_ORIGINAL_COMMAND. It must be exactly one of the
verbs; anything else (empty, too long, unknown, with arguments or control characters) is
refused with one line on stderr and exit status 1, and logged without its content.
Nothing the client sends reaches a shell, a command line or a file path.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Mapping, Optional, TextIO

from . import __version__
from .config import Config
from .protocol import VERSION

VERBS = ("serve", "ping", "status", "version")
MAX_COMMAND = 64
log = logging.getLogger("hpcside.forcecommand")


@dataclass(frozen=True)
class Command:
    verb: str


class Refused(Exception):
    """The command is not allowed; the message is safe to show (it never echoes the input)."""


def parse_command(text: Optional[str]) -> Command:
    """Map SSH_ORIGINAL_COMMAND to a verb, or raise Refused."""
    if text is None:
        raise Refused("no command given; this key only runs: " + ", ".join(VERBS))
    if len(text) > MAX_COMMAND:
        raise Refused("command too long")
    verb = text.strip(" \t")
    if verb not in VERBS:
        raise Refused("command not allowed; this key only runs: " + ", ".join(VERBS))
    return Command(verb)


def describe(text: Optional[str]) -> str:
    """What may be logged about a refused command: its size, never its content."""
    return "none" if text is None else f"{len(text)} characters"


def run(config: Config, env: Mapping[str, str], stdout: TextIO, stderr: TextIO) -> int:
    original = env.get("SSH_ORIGINAL_COMMAND")
    client = (env.get("SSH_CLIENT") or "local").split(" ")[0]
    try:
        command = parse_command(original)
    except Refused as exc:
        log.warning("refused command from %s (%s)", client, describe(original))
        print(f"hpcside: {exc}", file=stderr)
        return 1
    if command.verb == "version":
        print(f"hpcside {__version__} protocol {VERSION}", file=stdout)
        return 0
    from .status import collect

    if command.verb == "status":
        json.dump(collect(config), stdout, sort_keys=True)
        stdout.write("\n")
        return 0
    if command.verb == "ping":
        from .reconcile import Scheduler

        outcome = Scheduler(config).reconcile(force=False)
        info = collect(config)
        print(json.dumps({"reconciled": outcome.ran, "slurm_ok": info["slurm_ok"], "routable": info["routable"]},
                         sort_keys=True), file=stdout)
        return 0
    from .serve import run_serve

    log.info("session from %s started", client)
    code = run_serve(config)
    log.info("session from %s ended", client)
    return code


def authorized_key_line(pubkey: str, python: str, root: str, config_path: str) -> str:
    """The restricted authorized_keys line for the web server's key."""
    parts = pubkey.strip().split()
    if len(parts) < 2 or not parts[0].startswith(("ssh-", "ecdsa-", "sk-")):
        raise ValueError("not an OpenSSH public key")
    for value in (python, root, config_path):
        if any(c in value for c in "\"\\\n' $`;&|<>"):
            raise ValueError(f"{value!r}: paths with quotes, spaces or shell characters are not supported")
    command = f"cd {root} && exec {python} -E -s -m hpcside --config {config_path} forcecommand"
    # restrict: no forwarding of any kind, no pty, no ~/.ssh/rc, and whatever OpenSSH adds to it later.
    options = f'restrict,command="{command}"'
    return f"{options} {' '.join(parts[:3])}"

