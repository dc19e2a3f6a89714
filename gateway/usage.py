"""Usage rows written in batches, off the request's path.

A request's row (never content; the UsageRecord fields as a dict) is queued in memory and written with the others of the
last half second in one ``bulk_create``: one thread hop and one transaction for many
requests instead of one each. Rows still queued when the process exits are written by an
``atexit`` hook; if the database is down, rows wait (at most MAX_PENDING) and are retried.

Budgets (gateway/budgets.py) rebuild a lost counter from the database plus the rows not yet
written: ``unwritten_with`` reads both with no batch moving from one to the other meanwhile.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from django.contrib.auth import get_user_model
from django.db import DataError, IntegrityError, close_old_connections
from django.db.models import Model

from gateway.models import ApiKey, Project, UsageRecord
from gateway.threads import in_thread

log = logging.getLogger("gateway.usage")
FLUSH_EVERY = 0.5
MAX_PENDING = 100_000
T = TypeVar("T")


class UsageWriter:
    def __init__(self, flush_every: float = FLUSH_EVERY) -> None:
        self.flush_every = flush_every
        self.pending: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.scheduled: asyncio.Handle | None = None
        self.writing: list[list[dict[str, Any]]] = []  # batches taken from pending, not yet committed
        self.commit = threading.Lock()  # held while a batch is committed and leaves ``writing``

    def add(self, record: dict[str, Any]) -> None:
        with self.lock:
            if len(self.pending) >= MAX_PENDING:
                self.pending.pop(0)  # the database has been down for long: the oldest row goes
            self.pending.append(record)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush_sync()
            return
        if self.scheduled is None:
            self.scheduled = loop.call_later(self.flush_every, lambda: loop.create_task(self.flush()))

    def _take(self) -> list[dict[str, Any]]:
        with self.lock:
            batch, self.pending = self.pending, []
            if batch:
                self.writing.append(batch)
        return batch

    def _write(self, batch: list[dict[str, Any]]) -> None:
        close_old_connections()
        with self.commit:
            try:
                try:
                    UsageRecord.objects.bulk_create([UsageRecord(**row) for row in batch], batch_size=500)
                except (IntegrityError, DataError):
                    # A row names a user, key or project deleted since its request began (staff deleted
                    # a project while its member's stream ran): retried as is, the batch and every later
                    # one would fail for ever. Such a row gets NULL there, as the deletion gives the rows
                    # already written (SET_NULL). A row the database refuses for another reason (a
                    # count out of its column's range) is left out alone, the rest written.
                    _forget_deleted(batch)
                    _write_each(batch)
            except Exception as exc:  # the database is down: keep the rows for the next flush
                log.warning("usage: could not write %d rows (%s); will retry", len(batch), type(exc).__name__)
                with self.lock:
                    self._written(batch)
                    self.pending[:0] = batch[: max(0, MAX_PENDING - len(self.pending))]
                raise
            with self.lock:
                self._written(batch)

    def _written(self, batch: list[dict[str, Any]]) -> None:
        self.writing = [b for b in self.writing if b is not batch]

    def unwritten_with(self, read: Callable[[], T]) -> tuple[T, list[dict[str, Any]]]:
        """``read()`` (a database query) and the rows not yet in the database, taken so that each row
        is in exactly one of them: no batch commits between the two. Sync."""
        with self.commit:
            result = read()
            with self.lock:
                return result, [*self.pending, *(row for batch in self.writing for row in batch)]

    async def flush(self) -> None:
        self.scheduled = None
        batch = self._take()
        if not batch:
            return
        try:
            await in_thread(self._write, batch)
        except Exception:  # noqa: BLE001 - logged in _write
            loop = asyncio.get_running_loop()
            if self.scheduled is None:
                self.scheduled = loop.call_later(5.0, lambda: loop.create_task(self.flush()))

    def flush_sync(self) -> None:
        batch = self._take()
        if batch:
            try:
                self._write(batch)
            except Exception:  # noqa: BLE001 - nothing more can be done at exit
                log.error("usage: %d rows lost at exit", len(batch))


def _write_each(batch: list[dict[str, Any]]) -> None:
    """Write the rows one by one, each leaving ``batch`` (in place) once written or refused, leaving out
    (and logging, without content: rows hold none) those the database refuses. An unreachable database
    still raises, with only the rows not yet written left in ``batch`` to be kept and retried."""
    refused = done = 0
    try:
        for row in batch:
            try:
                UsageRecord.objects.create(**row)
            except (IntegrityError, DataError):
                _forget_deleted([row])  # deleted since the batch was checked: once more without it
                try:
                    UsageRecord.objects.create(**row)
                except (IntegrityError, DataError):
                    refused += 1
            done += 1
    finally:
        if refused:
            log.error("usage: the database refused %d of %d rows; they are left out", refused, len(batch))
        del batch[:done]  # once, not row by row: a batch after an outage may hold many thousands


# The usage row's references, each nullable with SET_NULL: the model behind each column.
REFERENCES: dict[str, type[Model]] = {"user_id": get_user_model(), "api_key_id": ApiKey, "project_id": Project}


def _forget_deleted(batch: list[dict[str, Any]]) -> None:
    """Set to None, in place, the references of ``batch`` whose row no longer exists."""
    for column, model in REFERENCES.items():
        ids = {row[column] for row in batch if row.get(column) is not None}
        if not ids:
            continue
        gone = ids - set(model._default_manager.filter(pk__in=ids).values_list("pk", flat=True))
        for row in batch:
            if row.get(column) in gone:
                row[column] = None


writer = UsageWriter()
atexit.register(writer.flush_sync)
