"""Projects from the ``PROJECTS`` setting: which groups (from the OIDC groups claim) make a user a member.

``PROJECTS`` is a JSON object, project name -> the Django group names whose members belong to it
(the names ``OIDC_GROUPS_MAP`` or ``OIDC_GROUPS_PREFIX`` make of the claim), or an object with
``groups`` and optionally ``slurm_account``, ``shares`` and ``description``::

    {"chemistry": {"groups": ["chem", "chem-staff"], "slurm_account": "chem01", "shares": 10},
     "physics": ["physics"]}

It is applied at every ``manage.py migrate`` (which every deployment and scripts/run.sh run when the
code or the settings change) and by ``manage.py sync_projects``, not at each login: projects must exist
before anyone signs in, for an admin to give them budgets, and a login only has to set the user's
groups (chatai/oidc.py does) for ``gateway.projects.projects_of`` to find their projects. Applying it
is idempotent: a project named here is created if missing, gets exactly the groups listed (an admin's
change to those groups is undone at the next apply; its hand-added members are never touched), and
its Slurm account, shares and description when they are given. Projects not named here are the
admin's alone. A malformed value stops the app at start with an error naming ``PROJECTS``
(chatai/settings.py parses it).

Pure parsing at the top (settings imports it, before Django is set up); the database part below.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

SETTING = "PROJECTS"
FIELDS = {"groups", "slurm_account", "shares", "description"}
SLURM_ACCOUNT = re.compile(r"[A-Za-z0-9_.-]{1,100}")  # what sacctmgr accepts, and Project.slurm_account's length


@dataclass(frozen=True)
class ProjectSpec:
    """One project as the setting names it; None: leave that field as the admin has it."""

    name: str
    groups: tuple[str, ...]
    slurm_account: str | None = None
    shares: int | None = None
    description: str | None = None


def _fail(problem: str) -> ValueError:
    return ValueError(f"{SETTING}: {problem} (docs/accounting.md, Projects)")


def _groups(name: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(g, str) and g.strip() and len(g) <= 150 for g in value):
        raise _fail(f"project {name!r}: groups must be a list of group names (1 to 150 characters each)")
    return tuple(dict.fromkeys(g.strip() for g in value))


def _spec(name: Any, value: Any) -> ProjectSpec:
    if not isinstance(name, str) or not name.strip() or len(name) > 100 or name != name.strip():
        raise _fail(f"project name {name!r} must be 1 to 100 characters without surrounding spaces")
    if name.startswith("("):
        raise _fail(f"project name {name!r} may not start with '(' (the reports use '(no project)' and '(idle)')")
    if isinstance(value, list):
        return ProjectSpec(name, _groups(name, value))
    if not isinstance(value, dict):
        raise _fail(f"project {name!r}: give a list of group names or an object with 'groups'")
    unknown = sorted(set(value) - FIELDS)
    if unknown:
        raise _fail(f"project {name!r}: unknown field {unknown[0]!r} (known: {', '.join(sorted(FIELDS))})")
    if "groups" not in value:
        raise _fail(f"project {name!r}: 'groups' is missing")
    account = value.get("slurm_account")
    if account is not None and (not isinstance(account, str) or not SLURM_ACCOUNT.fullmatch(account)):
        raise _fail(f"project {name!r}: slurm_account must be 1 to 100 letters, digits, '_', '.' or '-'")
    shares = value.get("shares")
    if shares is not None and (isinstance(shares, bool) or not isinstance(shares, int) or not 1 <= shares <= 1_000_000):
        raise _fail(f"project {name!r}: shares must be a whole number from 1 to 1000000")
    description = value.get("description")
    if description is not None and not isinstance(description, str):
        raise _fail(f"project {name!r}: description must be text")
    return ProjectSpec(name, _groups(name, value["groups"]), account, shares, description)


def parse_projects(text: str) -> tuple[ProjectSpec, ...]:
    """The projects a ``PROJECTS`` value names (empty: none); ValueError naming the setting if malformed."""
    if not text.strip():
        return ()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(data, dict):
        raise _fail("must be a JSON object: project name -> list of group names")
    return tuple(_spec(name, value) for name, value in data.items())


# -- applying it ---------------------------------------------------------------------------------

@dataclass
class SyncReport:
    created: list[str]
    updated: list[str]
    unchanged: list[str]

    def __str__(self) -> str:
        parts = [f"{len(self.created)} created", f"{len(self.updated)} updated", f"{len(self.unchanged)} unchanged"]
        names = [f"+{n}" for n in self.created] + [f"~{n}" for n in self.updated]
        return f"projects from {SETTING}: {', '.join(parts)}" + (f" ({' '.join(names)})" if names else "")


def sync_projects(specs: tuple[ProjectSpec, ...]) -> SyncReport:
    """Make the database agree with ``specs`` (idempotent; see the module's docstring)."""
    from django.contrib.auth.models import Group
    from django.db import transaction

    from gateway import projects
    from gateway.models import Project

    report = SyncReport([], [], [])
    with transaction.atomic():
        for spec in specs:
            project, created = Project.objects.get_or_create(name=spec.name)
            changed = False
            for field in ("slurm_account", "shares", "description"):
                wanted = getattr(spec, field)
                if wanted is not None and getattr(project, field) != wanted:
                    setattr(project, field, wanted)
                    changed = True
            if changed:
                project.save()
            groups = [Group.objects.get_or_create(name=g)[0] for g in spec.groups]
            if {g.pk for g in groups} != set(project.groups.values_list("pk", flat=True)):
                project.groups.set(groups)
                changed = True
            (report.created if created else report.updated if changed else report.unchanged).append(spec.name)
    projects.forget()
    return report


def apply_setting(**_: Any) -> SyncReport | None:
    """post_migrate: apply ``settings.PROJECTS`` (parsed at start) if it names any project."""
    from django.conf import settings

    specs = getattr(settings, SETTING, ())
    return sync_projects(specs) if specs else None
