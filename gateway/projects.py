"""Projects: which a user belongs to, and which one a request is charged to.

A user's projects are those naming one of the user's groups (from the OIDC groups claim) and those
listing the user by hand, re-read at most every GATEWAY_POLICY_TTL seconds. A key's requests are
charged to the key's project; the chat page's to the project the user chose in the chat (kept in the
session), else the user's default: the first of their projects by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db.models import Q

from common.expiring import Expiring

SESSION_KEY = "chatai_project"


@dataclass(frozen=True)
class ProjectRef:
    """What a request needs of its project, without holding a model instance across threads."""

    id: int
    name: str
    slurm_account: str
    shares: int


_projects: Expiring[tuple[int, frozenset[int]], tuple[ProjectRef, ...]] = Expiring(
    lambda: settings.GATEWAY_POLICY_TTL, max_size=50_000)


def _ref(project: Any) -> ProjectRef:
    return ProjectRef(project.pk, project.name, project.slurm_account, project.shares)


def projects_of(user: Any, group_ids: frozenset[int]) -> tuple[ProjectRef, ...]:
    """The user's projects, by name. Sync (it may read the database)."""
    from gateway.models import Project

    def load() -> tuple[ProjectRef, ...]:
        rows = Project.objects.filter(Q(members=user.pk) | Q(groups__in=group_ids)).distinct().order_by("name")
        return tuple(_ref(p) for p in rows)

    return _projects.get_or_load((user.pk, group_ids), load)


def project_for_session(user: Any, group_ids: frozenset[int], chosen: Any) -> ProjectRef | None:
    """The project of a chat request: the one chosen in the chat if the user is still a member, else the
    user's default (the first of their projects), else none."""
    mine = projects_of(user, group_ids)
    for project in mine:
        if project.id == chosen:
            return project
    return mine[0] if mine else None


class NotAMember(ValueError):
    """A project was named that the user is not a member of (or that does not exist: the same to them)."""


def project_of_user(user: Any, group_ids: frozenset[int], name: str | None) -> ProjectRef | None:
    """The user's project called ``name``; without a name, the user's default (the first by name, or
    none). Raises NotAMember when the user has no project of that name. Sync."""
    mine = projects_of(user, group_ids)
    if name is None:
        return mine[0] if mine else None
    for project in mine:
        if project.name == name:
            return project
    have = ", ".join(p.name for p in mine) or "none"
    raise NotAMember(f"{user.get_username()} is not a member of a project named {name!r} (their projects: {have}).")


def project_for_key(key: Any) -> ProjectRef | None:
    """The key's project (loaded with the key), or none."""
    project = getattr(key, "project", None) if key.project_id is not None else None
    return _ref(project) if project is not None else None


def forget() -> None:
    """Drop the cached memberships (tests, and the admin after a change)."""
    _projects.data.clear()
