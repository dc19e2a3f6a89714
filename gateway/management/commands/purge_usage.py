"""Delete usage rows older than a retention period: ``manage.py purge_usage --days 90``."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.utils import timezone

from gateway.models import UsageRecord


class Command(BaseCommand):
    help = "Delete usage records older than --days (default 90)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--days", type=int, default=90)

    def handle(self, *args: Any, days: int, **opts: Any) -> None:
        cutoff = timezone.now() - dt.timedelta(days=days)
        deleted, _ = UsageRecord.objects.filter(created_at__lt=cutoff).delete()
        self.stdout.write(f"deleted {deleted} usage record(s) older than {days} days ({cutoff:%Y-%m-%d})")
