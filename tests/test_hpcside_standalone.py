"""hpcside runs on a login node with nothing but Python's standard library (3.9 and up)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = ["hpcside", "hpcside.cli", "hpcside.config", "hpcside.decide", "hpcside.launchers",
           "hpcside.reconcile", "hpcside.state", "hpcside.status", "hpcside.templates"]
CHECK = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
before = set(sys.modules)
for name in {MODULES!r}:
    __import__(name)
stdlib = set(sys.stdlib_module_names) if hasattr(sys, "stdlib_module_names") else None
loaded = {{m.split(".")[0] for m in set(sys.modules) - before}}
foreign = sorted(m for m in loaded if m != "hpcside" and stdlib is not None and m not in stdlib)
assert not foreign, foreign
print("ok")
"""


def pythons() -> list[str]:
    """Real interpreters (not pyenv shims) from 3.9 up, and Debian's /usr/bin/python3."""
    try:
        found = {str(p) for p in Path("/root/.pyenv/versions").glob("3.*/bin/python3")
                 if tuple(map(int, p.parent.parent.name.split(".")[:2])) >= (3, 9)}
    except PermissionError:  # a developer without root: root's interpreters are not theirs to run
        found = set()
    if Path("/usr/bin/python3").exists():
        found.add("/usr/bin/python3")
    return sorted(found) or [sys.executable]


def test_help_works_without_site_packages() -> None:
    proc = subprocess.run([sys.executable, "-S", "-m", "hpcside", "--help"], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "check-config" in proc.stdout and "schedule" in proc.stdout


@pytest.mark.parametrize("python", pythons())
def test_it_imports_only_the_standard_library(python: str) -> None:
    proc = subprocess.run([python, "-S", "-I", "-c", CHECK], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_no_module_of_hpcside_imports_the_web_side() -> None:
    for path in (ROOT / "hpcside").rglob("*.py"):
        text = path.read_text()
        for banned in ("django", "gateway", "hpcbridge", "chatai", "paramiko", "fabric"):
            assert f"import {banned}" not in text and f"from {banned}" not in text, (path, banned)


@pytest.mark.parametrize("command", ["check-config", "schedule", "status"])
def test_every_command_has_help(command: str) -> None:
    proc = subprocess.run([sys.executable, "-S", "-m", "hpcside", command, "--help"], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "usage:" in proc.stdout
