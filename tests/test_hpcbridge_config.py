"""Platform settings: every mistake names the field; the Django system check reports it."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcbridge.config import PlatformConfigError, parse_platforms


def test_a_local_platform_needs_only_its_services_file() -> None:
    (cfg,) = parse_platforms([{"name": "local", "transport": "local", "hpcside_config": "/x/services.ini"}])
    assert cfg.transport == "local" and cfg.keepalive == 5.0


@pytest.mark.parametrize("raw,message", [
    ({}, "HPC_PLATFORMS[0].name: required"),
    ({"name": "a", "transport": "telnet", "hpcside_config": "x"}, "HPC_PLATFORMS[a].transport"),
    ({"name": "a", "transport": "ssh"}, "HPC_PLATFORMS[a].host: required"),
    ({"name": "a", "transport": "local", "hpcside_config": "x", "port": -1}, "HPC_PLATFORMS[a].port"),
    ({"name": "a", "transport": "local", "hpcside_config": "x", "colour": 1}, "HPC_PLATFORMS[0].colour: unknown"),
    ({"name": "a", "transport": "local", "hpcside_config": "x", "command": "bash"}, "HPC_PLATFORMS[a].command"),
])
def test_mistakes_name_the_field(raw: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(PlatformConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_platforms([raw])


def test_ssh_key_files_must_exist(tmp_path: Path) -> None:
    raw = {"name": "hpc", "transport": "ssh", "host": "h", "user": "u", "key_file": str(tmp_path / "nope"),
           "known_hosts": str(tmp_path / "nope")}
    with pytest.raises(PlatformConfigError, match=r"HPC_PLATFORMS\[hpc\].key_file: .* is not a readable file"):
        parse_platforms([raw])


def test_the_system_check_reports_a_broken_setting(settings) -> None:  # type: ignore[no-untyped-def]
    from hpcbridge.checks import check_platforms

    settings.HPC_PLATFORMS = [{"name": "x", "transport": "ssh"}]
    (error,) = check_platforms(None)
    assert error.id == "hpcbridge.E001" and "HPC_PLATFORMS[x].host" in error.msg
    settings.HPC_PLATFORMS = [{"name": "x", "transport": "local", "hpcside_config": "/s.ini"}]
    assert check_platforms(None) == []
