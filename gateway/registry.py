"""The model registry: models from the HPC platforms (cached briefly) plus the admin overlay."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import close_old_connections

from common.expiring import Expiring
from gateway.caller import Caller
from gateway.errors import ApiError
from gateway.external import Provider
from gateway.limits import Limits
from gateway.models import ModelOverlay
from gateway.threads import in_thread
from hpcbridge.client import BridgeError
from hpcbridge.failover import Offer
from hpcbridge.registry import get_bridge

STATUS_ORDER = {"ready": 0, "starting": 1, "queued": 2, "backoff": 3, "failed": 4, "offline": 5}
# Each platform's /v1/models and the admin overlay, re-read at most every GATEWAY_MODELS_TTL seconds.
platform_lists: Expiring[str, list[dict[str, Any]]] = Expiring(lambda: settings.GATEWAY_MODELS_TTL)
_overlays: Expiring[str, list[ModelOverlay]] = Expiring(lambda: settings.GATEWAY_MODELS_TTL)


@dataclass
class ModelEntry:
    id: str
    platform: str
    status: str
    demand: int = 0
    instances: int = 0
    max_model_len: int | None = None
    display_name: str = ""
    description: str = ""
    group_ids: tuple[int, ...] = ()
    provider: Provider | None = None  # an external OpenAI-compatible provider instead of a platform
    limits: Limits | None = None  # per user (or key) for this model, from the overlay
    limits_id: str = ""
    offers: tuple[Offer, ...] = ()  # every platform offering the model (hpcbridge.failover ranks them)

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id, "object": "model", "created": 0, "owned_by": self.platform,
                "name": self.display_name or self.id, "description": self.description, "status": self.status,
                "demand": self.demand, "instances": self.instances, "max_model_len": self.max_model_len}


async def platform_models(name: str) -> list[dict[str, Any]]:
    models = platform_lists.get(name)
    if models is not None:
        return models
    try:
        head, body = await get_bridge().get(name).request("GET", "/v1/models")
        models = [m for m in json.loads(body).get("data", []) if isinstance(m, dict) and isinstance(m.get("id"), str)]
    except (BridgeError, ValueError):
        # The platform is down: its models stay known, marked offline, so clients see why.
        models = [{**m, "status": "offline", "instances": 0} for m in platform_lists.stale(name) or []]
    return platform_lists.put(name, models)


def _load_overlays() -> list[ModelOverlay]:
    close_old_connections()
    return list(ModelOverlay.objects.prefetch_related("groups"))


async def overlays() -> list[ModelOverlay]:
    """The admin overlay, re-read at most every GATEWAY_MODELS_TTL seconds (like the platforms' lists)."""
    current = _overlays.get("")
    if current is None:
        current = _overlays.put("", await in_thread(_load_overlays))
    return current


async def all_models() -> dict[str, ModelEntry]:
    entries: dict[str, ModelEntry] = {}
    for name in get_bridge().platforms:
        for m in await platform_models(name):
            estimate = m.get("start_estimate")
            offer = Offer(name, str(m.get("status", "offline")), int(m.get("instances") or 0),
                          float(estimate) if isinstance(estimate, (int, float)) else None)
            entry = entries.get(m["id"])
            if entry is None:
                entries[m["id"]] = ModelEntry(m["id"], name, offer.status, int(m.get("demand") or 0),
                                              offer.instances, m.get("max_model_len"), offers=(offer,))
                continue
            # Offered by several platforms: one model, its best status, all instances and demand.
            entry.offers += (offer,)
            entry.instances += offer.instances
            entry.demand += int(m.get("demand") or 0)
            if STATUS_ORDER.get(offer.status, 9) < STATUS_ORDER.get(entry.status, 9):
                entry.status, entry.platform = offer.status, name
    for overlay in await overlays():
        entry = entries.get(overlay.model_id)
        if not overlay.enabled:
            entries.pop(overlay.model_id, None)
            continue
        if overlay.is_external:
            entry = entries[overlay.model_id] = ModelEntry(overlay.model_id, "external", "ready", instances=1)
            entry.provider = Provider(overlay.model_id, overlay.external_base_url,
                                      overlay.external_model or overlay.model_id, overlay.external_key_env)
        if entry is None:
            continue
        entry.display_name, entry.description = overlay.display_name, overlay.description
        entry.group_ids = tuple(g.pk for g in overlay.groups.all())
        if overlay.requests_per_minute or overlay.tokens_per_day or overlay.parallel_streams:
            entry.limits = Limits(requests_per_minute=overlay.requests_per_minute,
                                  tokens_per_day=overlay.tokens_per_day, parallel_streams=overlay.parallel_streams)
            entry.limits_id = f"m{overlay.pk}"
    return entries


def may_use(entry: ModelEntry, caller: Caller) -> bool:
    if caller.key is not None and not caller.key.allows(entry.id):
        return False
    return not entry.group_ids or caller.user.is_superuser or bool(caller.group_ids & set(entry.group_ids))


async def visible_models(caller: Caller) -> list[ModelEntry]:
    return [e for e in (await all_models()).values() if may_use(e, caller)]


async def resolve(model: str, caller: Caller) -> ModelEntry:
    """The model, if it exists and the caller may use it. A model the caller may not use answers
    exactly like one that does not exist: its name is not confirmed to whoever asks."""
    entry = (await all_models()).get(model)
    if entry is None or not may_use(entry, caller):
        raise ApiError(404, f"The model `{model}` does not exist.", code="model_not_found", param="model")
    return entry


def note_ready(platform: str, model: str) -> None:
    """A model that just answered is ready, whatever the cached list said a moment ago."""
    cached = platform_lists.stale(platform)
    if cached:
        for m in cached:
            if m.get("id") == model and m.get("status") != "ready":
                m["status"] = "ready"
                m["instances"] = max(1, int(m.get("instances") or 0))
