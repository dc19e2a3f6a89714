"""HPC platforms from settings: each a dict, validated with messages that name the field."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


class PlatformConfigError(ValueError):
    pass


@dataclass(frozen=True)
class JumpHost:
    """A bastion in front of the login node (ProxyJump): its own pinned host key, port forwarding only."""

    host: str
    port: int = 22
    user: str = ""
    key_file: str = ""  # default: the platform's key
    known_hosts: str = ""  # default: the platform's known_hosts


@dataclass(frozen=True)
class PlatformConfig:
    name: str
    transport: str = "ssh"  # ssh | local
    host: str = ""
    port: int = 22
    user: str = ""
    key_file: str = ""
    known_hosts: str = ""
    command: str = "serve"
    hpcside_config: str = ""  # local transport: the services file
    python: str = ""  # local transport: interpreter for hpcside (default: this one)
    connect_timeout: float = 5.0
    keepalive: float = 5.0  # seconds between pings (which also trigger the scheduler)
    dead_after: float = 15.0  # no answer to pings for this long: the link is dropped
    max_connections: int = 2
    streams_per_connection: int = 64  # above this on every connection, open another
    backoff_max: float = 30.0
    proxy_jump: JumpHost | None = None  # {"host", "port", "user", "key_file", "known_hosts"}


def parse_platform(raw: Any, index: int) -> PlatformConfig:
    where = f"HPC_PLATFORMS[{index}]"
    if not isinstance(raw, dict):
        raise PlatformConfigError(f"{where}: must be an object")
    known = set(PlatformConfig.__dataclass_fields__)
    for key in raw:
        if key not in known:
            raise PlatformConfigError(f"{where}.{key}: unknown field")
    name = raw.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise PlatformConfigError(f"{where}.name: required, lowercase letters, digits, '-' or '_'")
    where = f"HPC_PLATFORMS[{name}]"
    values = dict(raw)
    for key in ("port", "max_connections", "streams_per_connection"):
        if key in values and (not isinstance(values[key], int) or values[key] < 1):
            raise PlatformConfigError(f"{where}.{key}: must be a positive whole number")
    for key in ("connect_timeout", "keepalive", "dead_after", "backoff_max"):
        if key in values and (not isinstance(values[key], (int, float)) or values[key] <= 0):
            raise PlatformConfigError(f"{where}.{key}: must be a positive number of seconds")
    if values.get("proxy_jump") is not None:
        values["proxy_jump"] = parse_jump(values["proxy_jump"], values, f"{where}.proxy_jump")
    cfg = PlatformConfig(**values)
    if cfg.transport not in ("ssh", "local"):
        raise PlatformConfigError(f"{where}.transport: must be 'ssh' or 'local'")
    if cfg.command not in ("serve",):
        raise PlatformConfigError(f"{where}.command: only 'serve' carries requests")
    if cfg.transport == "ssh":
        for key in ("host", "user", "key_file", "known_hosts"):
            if not getattr(cfg, key):
                raise PlatformConfigError(f"{where}.{key}: required for the ssh transport")
        for key in ("key_file", "known_hosts"):
            if not Path(getattr(cfg, key)).is_file():
                raise PlatformConfigError(f"{where}.{key}: {getattr(cfg, key)} is not a readable file")
    elif not cfg.hpcside_config:
        raise PlatformConfigError(f"{where}.hpcside_config: required for the local transport")
    return cfg


def parse_jump(raw: Any, platform: dict[str, Any], where: str) -> JumpHost:
    if not isinstance(raw, dict):
        raise PlatformConfigError(f"{where}: must be an object with host, user and optionally port, key_file, "
                                  "known_hosts")
    for key in raw:
        if key not in JumpHost.__dataclass_fields__:
            raise PlatformConfigError(f"{where}.{key}: unknown field")
    for key in ("host", "user"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise PlatformConfigError(f"{where}.{key}: required")
    port = raw.get("port", 22)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise PlatformConfigError(f"{where}.port: must be a port number")
    jump = JumpHost(raw["host"], port, raw["user"], str(raw.get("key_file") or platform.get("key_file") or ""),
                    str(raw.get("known_hosts") or platform.get("known_hosts") or ""))
    for key in ("key_file", "known_hosts"):
        if not Path(getattr(jump, key)).is_file():
            raise PlatformConfigError(f"{where}.{key}: {getattr(jump, key)} is not a readable file")
    return jump


def parse_platforms(raw: Any) -> list[PlatformConfig]:
    if not isinstance(raw, list):
        raise PlatformConfigError("HPC_PLATFORMS: must be a list of platforms")
    platforms = [parse_platform(item, i) for i, item in enumerate(raw)]
    names = [p.name for p in platforms]
    for name in names:
        if names.count(name) > 1:
            raise PlatformConfigError(f"HPC_PLATFORMS[{name}].name: used twice")
    return platforms
