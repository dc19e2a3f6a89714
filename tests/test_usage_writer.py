"""The usage writer (gateway/usage.py) against the test database: a row that names a project, user or
key deleted while its request ran is written with NULL there, as the deletion gives the rows already
written, and a row the database refuses is left out alone, instead of failing its batch and every
later one for ever. On SQLite, and again on PostgreSQL
in a child pytest (both check foreign keys when the batch commits)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import OperationalError, connection
from django.utils import timezone

from gateway import keys
from gateway.models import Project, UsageRecord
from gateway.usage import UsageWriter

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parent.parent


def row(user: Any, key: Any, project: Any, tokens: int) -> dict[str, Any]:
    return {"user_id": user.pk if user else None, "api_key_id": key.pk if key else None,
            "project_id": project.pk if project else None, "model": "m", "endpoint": "chat", "status": 200,
            "prompt_tokens": tokens, "completion_tokens": 0, "duration_ms": 1, "streamed": True,
            "created_at": timezone.now()}


def test_a_row_naming_what_was_deleted_meanwhile_is_written_without_it_and_blocks_nothing() -> None:
    ann, bob = User.objects.create(username="ann"), User.objects.create(username="bob")
    kept, gone = Project.objects.create(name="kept"), Project.objects.create(name="gone")
    key, _ = keys.api_key_create(user=bob, name="k")
    w = UsageWriter()
    w.pending = [row(ann, None, gone, 1), row(ann, None, kept, 2), row(bob, key, None, 3)]
    gone.delete()  # staff delete a project while its member's stream runs...
    key.delete()
    bob.delete()  # ...and a user (with their key) goes
    w._write(w._take())
    assert list(UsageRecord.objects.order_by("prompt_tokens").values_list(
        "prompt_tokens", "user__username", "project__name", "api_key")) == [
        (1, "ann", None, None), (2, "ann", "kept", None), (3, None, None, None)]
    assert w.pending == [] and w.writing == []
    w.pending = [row(ann, None, kept, 4)]  # the next batch is not held up by anything left over
    w._write(w._take())
    assert UsageRecord.objects.count() == 4


def test_a_row_the_database_refuses_is_left_out_alone_and_blocks_nothing() -> None:
    """A count out of its column's range (an external provider's usage of -1 or 3e9): the batch failed
    and was put back in front of every later one, so that worker wrote no usage row again."""
    ann = User.objects.create(username="ann")
    w = UsageWriter()
    w.pending = [row(ann, None, None, 1), row(ann, None, None, -1), row(ann, None, None, 3_000_000_000),
                 row(ann, None, None, 2)]
    w._write(w._take())
    fits = [1, 2] if connection.vendor == "postgresql" else [1, 2, 3_000_000_000]  # SQLite has no int4
    assert sorted(UsageRecord.objects.values_list("prompt_tokens", flat=True)) == fits
    assert w.pending == [] and w.writing == []
    w.pending = [row(ann, None, None, 3)]
    w._write(w._take())
    assert UsageRecord.objects.count() == len(fits) + 1


def test_an_outage_half_way_through_the_rows_one_by_one_writes_none_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """The database goes away while the rows of a refused batch are written one by one: only the rows
    not yet written are kept for the next flush (the whole batch was, and the first ones were written
    twice, their tokens charged twice)."""
    ann = User.objects.create(username="ann")
    w = UsageWriter()
    w.pending = [row(ann, None, None, -1), row(ann, None, None, 1), row(ann, None, None, 2), row(ann, None, None, 3)]
    create = UsageRecord.objects.create
    calls = {"n": 0}

    def failing_third(**fields: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 4:  # -1 refused (and tried again), 1 written, then the database is gone
            raise OperationalError("server closed the connection unexpectedly")
        return create(**fields)

    monkeypatch.setattr(UsageRecord.objects, "create", failing_third)
    with pytest.raises(OperationalError):
        w._write(w._take())
    assert [r["prompt_tokens"] for r in w.pending] == [2, 3] and w.writing == []
    monkeypatch.undo()
    w._write(w._take())
    assert sorted(UsageRecord.objects.values_list("prompt_tokens", flat=True)) == [1, 2, 3]


def test_the_database_checked_is_the_one_asked_for() -> None:
    assert connection.vendor == os.environ.get("CHATAI_USAGE_DB", "sqlite")


@pytest.mark.postgres
def test_the_same_tests_pass_on_postgresql() -> None:
    if os.environ.get("CHATAI_USAGE_DB"):
        pytest.skip("already the child run")
    name = f"chatai_usage_{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "DB_ENGINE": "postgresql", "DB_NAME": name, "DB_USER": "postgres", "DB_HOST": "127.0.0.1",
           "CHATAI_USAGE_DB": "postgresql"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", __file__, "-k",
                           "not on_postgresql", "--create-db"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
