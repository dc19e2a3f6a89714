"""A user's fair-share standing, like Slurm's ``sshare``: ``manage.py fairshare USER [USER ...]
[--project NAME]``. Shows the decayed usage (tokens) of the user, of the project their chat
requests are charged to (or ``--project``), and of the whole service, the project's normalised
share, the factor F and the priority their API and chat requests get now."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from gateway.fairshare import fairshare, total_shares
from gateway.limits import group_ids_of
from gateway.projects import ProjectRef, project_for_session, projects_of


class Command(BaseCommand):
    help = "Show users' fair-share standing: decayed usage, share, factor and priority (lower = earlier)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("usernames", nargs="+")
        parser.add_argument("--project", help="the project a key of theirs is charged to (default: the chat's)")

    def handle(self, *args: Any, usernames: list[str], project: str | None, **opts: Any) -> None:
        if not settings.FAIRSHARE:
            self.stdout.write("fair share is off (FAIRSHARE): every request has priority 0")
        half_life = settings.FAIRSHARE_HALF_LIFE
        self.stdout.write(f"half-life {half_life} s, chat boost {settings.FAIRSHARE_CHAT_BOOST}, "
                          f"shares of all projects {total_shares()}")
        self.stdout.write(f"{'user':<20} {'project':<20} {'user tokens':>12} {'project tokens':>14} "
                          f"{'all tokens':>12} {'share':>7} {'F':>7} {'API':>5} {'chat':>5}")
        for name in usernames:
            user = get_user_model().objects.filter(username=name).first()
            if user is None:
                raise CommandError(f"no user {name!r}")
            ref = self._project(user, project)
            api = fairshare.standing_sync(user.pk, ref, False, total_shares())
            chat = fairshare.standing_sync(user.pk, ref, True, total_shares())
            self.stdout.write(f"{name:<20} {ref.name if ref else '-':<20} {api.user_usage:>12.0f} "
                              f"{api.project_usage if ref else 0:>14.0f} {api.total_usage:>12.0f} "
                              f"{api.share:>7.3f} {api.factor:>7.3f} {api.priority:>5} {chat.priority:>5}")

    def _project(self, user: Any, name: str | None) -> ProjectRef | None:
        groups = group_ids_of(user)
        if name is None:
            return project_for_session(user, groups, None)
        for ref in projects_of(user, groups):
            if ref.name == name:
                return ref
        raise CommandError(f"{user.username} is not a member of project {name!r}")
