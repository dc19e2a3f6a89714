"""Collect each HPC platform's node time into NodeTime rows: ``manage.py collect_nodetime``.

Run it every 15 minutes from a systemd timer or cron (docs/deploy.md); it is idempotent, so a
run that overlaps another or repeats a period does no harm. Exit status 1 when a platform could
not be asked (the others are still collected).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from gateway.nodetime import Collected, nodetime_collect
from hpcbridge.client import Bridge
from hpcbridge.config import parse_platforms


class Command(BaseCommand):
    help = "Ask every HPC platform for its instances' node time (sacct or hpcside's records) and store it."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--platform", action="append", default=[], metavar="NAME",
                            help="only this platform (repeatable); default: all of HPC_PLATFORMS")
        parser.add_argument("--since", type=float, metavar="EPOCH",
                            help="ask from this time (seconds since the epoch, the platform's clock) instead "
                                 "of where the last collection left off; --since 0 collects all it keeps")

    def handle(self, *args: Any, platform: list[str], since: float | None, **opts: Any) -> None:
        configs = parse_platforms(settings.HPC_PLATFORMS)
        names = [c.name for c in configs]
        unknown = sorted(set(platform) - set(names))
        if unknown:
            raise CommandError(f"unknown platform {unknown[0]!r}; HPC_PLATFORMS has: {', '.join(names) or 'none'}")
        if since is not None and since < 0:
            raise CommandError("--since must be seconds since the epoch (>= 0)")
        bridge = Bridge.from_configs([c for c in configs if not platform or c.name in platform])
        failed = []
        try:
            for name in bridge.platforms:
                self.stdout.write(f"{name}: asking for node time ...")
                done = nodetime_collect(bridge, name, since)
                self.report(done)
                if done.error:
                    failed.append(name)
        finally:
            bridge.stop()
        if failed:
            raise CommandError(f"node time not collected from {', '.join(failed)}")

    def report(self, done: Collected) -> None:
        when = dt.datetime.fromtimestamp(done.since, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        if done.error:
            self.stderr.write(f"{done.platform}: FAILED: {done.error}")
            return
        self.stdout.write(f"{done.platform}: {done.received} instance(s) since {when}: {done.created} new, "
                          f"{done.updated} updated, {done.unchanged} unchanged; sacct {done.sacct}")
        if done.closed:
            self.stdout.write(f"{done.platform}: {done.closed} running instance(s) no longer listed by the platform "
                              "(its records lost): closed when last seen running")
        for why in done.skipped:
            self.stderr.write(f"{done.platform}: a record was refused: {why}")
        if not done.complete:
            self.stdout.write(f"{done.platform}: incomplete (sacct not caught up or unavailable): the same "
                              "period is asked again next time")
