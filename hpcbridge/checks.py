"""System checks: a broken platform configuration is reported at start-up, naming the field."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import Error, register

from hpcbridge.config import PlatformConfigError, parse_platforms


@register()
def check_platforms(app_configs: Any, **kwargs: Any) -> list[Error]:
    try:
        parse_platforms(settings.HPC_PLATFORMS)
    except PlatformConfigError as exc:
        return [Error(str(exc), hint="Fix HPC_PLATFORMS (or HPC_PLATFORMS_FILE); see .env.example.",
                      id="hpcbridge.E001")]
    return []
