"""One Bridge per process, built from settings.HPC_PLATFORMS on first use."""

from __future__ import annotations

import threading

from django.conf import settings

from hpcbridge.client import Bridge
from hpcbridge.config import parse_platforms

_bridge: Bridge | None = None
_lock = threading.Lock()


def get_bridge() -> Bridge:
    global _bridge
    with _lock:
        if _bridge is None:
            _bridge = Bridge.from_configs(parse_platforms(settings.HPC_PLATFORMS))
        return _bridge
