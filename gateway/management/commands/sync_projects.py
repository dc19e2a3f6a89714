"""Apply the ``PROJECTS`` setting now: ``manage.py sync_projects`` (``migrate`` does it too)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from gateway.project_sync import sync_projects


class Command(BaseCommand):
    help = "Create or update the projects the PROJECTS setting names (idempotent; migrate does it too)."

    def handle(self, *args: Any, **opts: Any) -> None:
        if not settings.PROJECTS:
            self.stdout.write("PROJECTS is not set: nothing to do")
            return
        self.stdout.write(str(sync_projects(settings.PROJECTS)))
