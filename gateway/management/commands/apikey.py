"""Create, list and revoke API keys: ``manage.py apikey create USER --name NAME [--expires-days N] [--model M]
[--project P]``."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from gateway.keys import api_key_create, api_key_revoke
from gateway.limits import group_ids_of
from gateway.models import ApiKey
from gateway.projects import NotAMember, project_of_user


class Command(BaseCommand):
    help = "Create, list and revoke API keys. The secret is printed once, at creation."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        create = sub.add_parser("create", help="create a key and print its secret once")
        create.add_argument("username")
        create.add_argument("--name", required=True)
        create.add_argument("--expires-days", type=int, help="the key stops working after N days")
        create.add_argument("--model", action="append", default=[], help="allow only this model (repeatable)")
        create.add_argument("--project", help="charge its usage to this project (the user must be a member); "
                            "without it, to the user's default project at each request (as the chat is), or to none "
                            "for a user of no project")
        listing = sub.add_parser("list", help="list keys (never their secrets)")
        listing.add_argument("--user")
        revoke = sub.add_parser("revoke", help="revoke a key by its prefix (cai-PREFIX...)")
        revoke.add_argument("prefix")

    def handle(self, *args: Any, **opts: Any) -> None:
        getattr(self, f"do_{opts['action']}")(**opts)

    def do_create(self, username: str, name: str, expires_days: int | None, model: list[str],
                  project: str | None, **_: Any) -> None:
        try:
            user = get_user_model().objects.get(username=username)
        except get_user_model().DoesNotExist:
            raise CommandError(f"no user {username!r}") from None
        try:
            charged = project_of_user(user, group_ids_of(user), project) if project is not None else None
        except NotAMember as exc:
            raise CommandError(str(exc)) from None
        expires = timezone.now() + dt.timedelta(days=expires_days) if expires_days else None
        key, secret = api_key_create(user=user, name=name, expires_at=expires, allowed_models=model,
                                     project_id=charged.id if charged else None)
        self.stdout.write(f"API key {key.name!r} for {username} (shown once, store it now):\n{secret}")
        if charged is not None:
            self.stdout.write(f"project: {charged.name}")
        else:
            default = project_of_user(user, group_ids_of(user), None)
            self.stdout.write("project: none named; charged to the user's default project at each request "
                              f"(now {default.name})" if default else "project: none (the user has no project)")
        if expires:
            self.stdout.write(f"expires {expires:%Y-%m-%d %H:%M %Z}")

    def do_list(self, user: str | None, **_: Any) -> None:
        keys = ApiKey.objects.select_related("user", "project").order_by("user__username", "-created_at")
        if user:
            keys = keys.filter(user__username=user)
        self.stdout.write(f"{'PREFIX':<18} {'USER':<16} {'NAME':<20} {'PROJECT':<16} {'STATE':<8} {'EXPIRES':<16} "
                          "LAST USED")
        for k in keys:
            state = "active" if k.is_active() else ("revoked" if k.revoked_at else "expired")
            expires = f"{k.expires_at:%Y-%m-%d %H:%M}" if k.expires_at else "never"
            used = f"{k.last_used_at:%Y-%m-%d %H:%M}" if k.last_used_at else "never"
            charged = k.project.name[:16] if k.project else "-"
            self.stdout.write(f"cai-{k.prefix:<14} {k.user.username:<16} {k.name[:20]:<20} {charged:<16} {state:<8} "
                              f"{expires:<16} {used}")

    def do_revoke(self, prefix: str, **_: Any) -> None:
        prefix = prefix.removeprefix("cai-").split(".")[0]
        try:
            key = ApiKey.objects.get(prefix=prefix)
        except ApiKey.DoesNotExist:
            raise CommandError(f"no key with prefix cai-{prefix}") from None
        api_key_revoke(key)
        self.stdout.write(f"revoked cai-{key.prefix} ({key.name!r} of {key.user})")
