"""Live model status over a WebSocket (channels): the chat page and the admin see a model queue,
start and become ready as it happens, instead of polling.

``/ws/status/`` takes a signed-in session (channels' AuthMiddlewareStack; the origin is checked
against ALLOWED_HOSTS). Each socket joins the group ``model-status`` and gets the models its user
may use (status, instances, demand; for staff also the platforms' link state), first at once,
then whenever it changes. One publisher per worker reads the registry every
``LIVE_STATUS_INTERVAL`` seconds while sockets are open; with Redis (channels-redis) only the
worker holding a short lease in the cache publishes, and every worker's sockets get its updates.
A user disabled or signed out is told so (close code 4401) at the next update.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from types import SimpleNamespace
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.layers import get_channel_layer
from django.conf import settings
from django.core.cache import caches

from gateway import registry
from gateway.limits import group_ids_of

log = logging.getLogger("gateway.live")
GROUP = "model-status"
LEASE_KEY = "live-status-publisher"
_me = f"{os.getpid()}-{id(object())}"
_publisher: asyncio.Task[None] | None = None
_sockets = 0


def snapshot_of(entries: list[registry.ModelEntry]) -> list[dict[str, Any]]:
    """What every socket may be sent, before filtering per user (no content, no secrets)."""
    return [{"id": e.id, "status": e.status, "instances": e.instances, "demand": e.demand,
             "group_ids": list(e.group_ids), "platforms": [o.platform for o in e.offers]}
            for e in entries]


async def current_status() -> dict[str, Any]:
    """Every model's status and every platform's link, before filtering per user."""
    entries = list((await registry.all_models()).values())
    states = {name: p.state() for name, p in registry.get_bridge().platforms.items()}
    return {"models": snapshot_of(entries),
            "platforms": [{"name": n, "up": s["up"], "connections": s["connections"], "streams": s["streams"],
                           "last_error": s["last_error"]} for n, s in sorted(states.items())]}


async def publish_once(layer: Any, last: str | None) -> str | None:
    """Send the models' status to the group if it changed since ``last``; returns its digest."""
    message = await current_status()
    digest = hashlib.sha256(json.dumps(message, sort_keys=True).encode()).hexdigest()
    if digest != last:
        await layer.group_send(GROUP, {"type": "status.update", "status": message})
    return digest


async def _publish_loop() -> None:
    layer = get_channel_layer()
    cache = caches["default"]
    last: str | None = None
    interval = settings.LIVE_STATUS_INTERVAL
    while _sockets > 0:
        try:
            # One publisher among the workers sharing Redis; alone in memory, always this one.
            holder = await cache.aget(LEASE_KEY)
            if holder in (None, _me):
                await cache.aset(LEASE_KEY, _me, timeout=max(3, int(interval * 3)))
                last = await publish_once(layer, last)
        except Exception as exc:  # noqa: BLE001 - a failed round is retried; the loop must live
            log.warning("live status: %s", type(exc).__name__)
        await asyncio.sleep(interval)
    if await cache.aget(LEASE_KEY) == _me:
        await cache.adelete(LEASE_KEY)


def _ensure_publisher() -> None:
    global _publisher
    if _publisher is None or _publisher.done():
        _publisher = asyncio.ensure_future(_publish_loop())


class StatusConsumer(AsyncJsonWebsocketConsumer):
    """One signed-in page's live view of the models it may use."""

    async def connect(self) -> None:
        global _sockets
        user = self.scope.get("user")
        if user is None or not user.is_authenticated or not user.is_active:
            await self.close(code=4401)
            return
        self.group_ids = set(await database_sync_to_async(group_ids_of)(user))
        await self.channel_layer.group_add(GROUP, self.channel_name)
        await self.accept()
        _sockets += 1
        _ensure_publisher()
        await self.send_json(self.message(await current_status()))

    async def disconnect(self, code: int) -> None:
        global _sockets
        if getattr(self, "group_ids", None) is not None:
            _sockets = max(0, _sockets - 1)
            await self.channel_layer.group_discard(GROUP, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        pass  # the page only listens

    async def status_update(self, event: dict[str, Any]) -> None:
        user = self.scope["user"]
        if not await database_sync_to_async(_still_active)(user.pk):
            await self.close(code=4401)
            return
        await self.send_json(self.message(event["status"]))

    def message(self, status: dict[str, Any]) -> dict[str, Any]:
        """What this socket's user may see: their models; the platforms' links for staff."""
        out: dict[str, Any] = {"type": "status", "models": self.visible(status["models"])}
        if self.scope["user"].is_staff:
            out["platforms"] = status["platforms"]
        return out

    def visible(self, models: list[dict[str, Any]]) -> list[dict[str, Any]]:
        user = self.scope["user"]
        caller: Any = SimpleNamespace(user=user, key=None, group_ids=frozenset(self.group_ids))  # a session
        out = []
        for m in models:
            entry = registry.ModelEntry(m["id"], "", m["status"], group_ids=tuple(m["group_ids"]))
            if registry.may_use(entry, caller):
                out.append({k: v for k, v in m.items() if k != "group_ids" and (k != "platforms" or user.is_staff)})
        return out


def _still_active(user_id: int) -> bool:
    from django.contrib.auth import get_user_model
    from django.db import close_old_connections

    close_old_connections()
    return get_user_model().objects.filter(pk=user_id, is_active=True).exists()
