"""manage.py hpcside deploy PLATFORM: put the HPC side on a platform's login node (hpcbridge/deploy.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from hpcbridge.config import PlatformConfigError, parse_platforms
from hpcbridge.deploy import Deployer, DeployError, DeployOptions


class Command(BaseCommand):
    help = "Deploy hpcside to an HPC platform of HPC_PLATFORMS (docs/deploy.md)."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        d = sub.add_parser("deploy", help="upload hpcside, write or check the services file, run check-config, "
                                          "install the ForceCommand key line, check the version")
        d.add_argument("platform", help="a name from HPC_PLATFORMS (transport ssh)")
        d.add_argument("--login", help="the account to log in with (a normal shell): yours, the functional "
                                       "account's commands then run through sudo -u; default: ssh_config's User")
        d.add_argument("--host", help="an ssh_config Host alias (default: the platform's host and port)")
        d.add_argument("--ssh-config", help="ssh_config to read (default: ~/.ssh/config)")
        d.add_argument("-i", "--identity", help="private key for the login (default: ssh_config, agent)")
        d.add_argument("--remote-root", default="~/chatai", help="hpcside-VERSION-HASH/ goes here")
        d.add_argument("--remote-config", default="~/.config/hpcside/services.ini", help="the services file there")
        d.add_argument("--services", type=Path, help="a local services file to write there (default: check)")
        d.add_argument("--authorized-keys", default="~/.ssh/authorized_keys",
                       help="the functional account's authorized_keys (as sshd's AuthorizedKeysFile)")
        d.add_argument("--python", default="/usr/bin/python3", help="python on the login node")
        d.add_argument("--pubkey", type=Path, help="the web server's public key (default: key_file + .pub)")
        d.add_argument("--dry-run", action="store_true", help="print each step; connect to nothing")

    def handle(self, *args: Any, **o: Any) -> None:
        try:
            platforms = {p.name: p for p in parse_platforms(settings.HPC_PLATFORMS)}
        except PlatformConfigError as exc:
            raise CommandError(str(exc)) from None
        cfg = platforms.get(o["platform"])
        if cfg is None or cfg.transport != "ssh":
            raise CommandError(f"{o['platform']}: not an ssh platform of HPC_PLATFORMS ({', '.join(platforms)})")
        opts = DeployOptions(cfg, login=o["login"], host=o["host"], ssh_config=o["ssh_config"],
                             identity=o["identity"], remote_root=o["remote_root"], remote_config=o["remote_config"],
                             services=o["services"], authorized_keys=o["authorized_keys"], python=o["python"],
                             pubkey=o["pubkey"], dry_run=o["dry_run"])
        try:
            Deployer(opts, self.stdout.write).deploy()
        except DeployError as exc:
            raise CommandError(f"{cfg.name}: {exc}") from None
        if not opts.dry_run:
            self.stdout.write(f"{cfg.name}: deployed; the bridge can connect")
