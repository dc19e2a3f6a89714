"""The web side's leaf helpers (common/): env readers, the upstream events and error, the expiring cache.
Pure, in process; the layering checks read the source files' imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from common.expiring import Expiring
from common.upstream import Head, Progress, UpstreamError

ROOT = Path(__file__).resolve().parent.parent
WEB = {"chatai", "gateway", "hpcbridge", "api", "django", "rest_framework"}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


class FakeClock:
    """A clock the test moves by hand (a fake for pure logic)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_leaf_package_imports_nothing_of_the_web_side_nor_django() -> None:
    for path in sorted((ROOT / "common").glob("*.py")):
        assert not imported_packages(path) & WEB, path.name


def test_external_providers_reach_neither_into_the_project_package_nor_into_hpcbridge() -> None:
    assert not imported_packages(ROOT / "gateway" / "external.py") & {"chatai", "hpcbridge"}


def test_the_gateway_views_speak_of_upstream_events_not_of_the_bridges_types() -> None:
    source = (ROOT / "gateway" / "views.py").read_text()
    assert "hpcbridge.client" not in source and "BridgeError" not in source


def test_the_bridges_error_is_an_upstream_error_and_its_events_are_the_shared_ones() -> None:
    from gateway.errors import ApiError
    from hpcbridge import client

    assert issubclass(client.BridgeError, UpstreamError) and issubclass(client.PlatformUnavailable, UpstreamError)
    assert client.Head is Head and client.Progress is Progress
    api = ApiError.from_upstream(client.PlatformUnavailable(503, "platform_unavailable", "down", retry_after=4.2))
    assert (api.status, api.code, api.message) == (503, "platform_unavailable", "down")
    assert api.response()["Retry-After"] == "4"
    assert api.body()["error"]["type"] == "api_error"


def test_the_stream_splitter_and_the_transcript_need_only_the_standard_library() -> None:
    check = ("import sys; before = set(sys.modules); import hpcside.sse, hpcside.resume; "
             "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
             "bad = sorted(m for m in new if m != 'hpcside' and m not in sys.stdlib_module_names); "
             "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-S", "-c", check], cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_a_value_is_kept_for_its_ttl_then_loaded_again() -> None:
    clock, loads = FakeClock(), []
    cache: Expiring[str, int] = Expiring(lambda: 5.0, clock=clock)

    def load() -> int:
        loads.append(clock.now)
        return len(loads)

    assert cache.get_or_load("a", load) == 1
    clock.now += 4.9
    assert cache.get_or_load("a", load) == 1 and cache.get("a") == 1
    clock.now += 0.1
    assert cache.get("a") is None and cache.stale("a") == 1  # expired, but what was last known is there
    assert cache.get_or_load("a", load) == 2
    assert loads == [1000.0, 1005.0]


def test_the_ttl_is_read_when_a_value_is_stored() -> None:
    clock, ttl = FakeClock(), [5.0]
    cache: Expiring[str, str] = Expiring(lambda: ttl[0], clock=clock)
    cache.put("a", "x")
    ttl[0] = 60.0
    cache.put("b", "y")
    clock.now += 10
    assert (cache.get("a"), cache.get("b")) == (None, "y")


def test_a_full_cache_forgets_everything_rather_than_growing() -> None:
    cache: Expiring[int, int] = Expiring(lambda: 60.0, max_size=3, clock=FakeClock())
    for i in range(3):
        cache.put(i, i)
    cache.put(1, 10)  # replacing an entry does not count
    assert [cache.get(i) for i in range(3)] == [0, 10, 2]
    cache.put(3, 3)
    assert [cache.get(i) for i in range(4)] == [None, None, None, 3]


def test_popping_and_clearing_forget_values() -> None:
    cache: Expiring[str, int] = Expiring(lambda: 60.0, clock=FakeClock())
    cache.put("a", 1)
    cache.put("b", 2)
    cache.pop("a")
    cache.pop("missing")
    assert (cache.get("a"), cache.get("b")) == (None, 2)
    cache.clear()
    assert cache.stale("b") is None


def test_env_reads_a_secret_from_its_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from common.env import env, envbool, envint, envlist

    secret = tmp_path / "key"
    secret.write_text("s3cret\n")
    monkeypatch.setenv("X_KEY", "plain")
    monkeypatch.setenv("X_KEY_FILE", str(secret))
    monkeypatch.setenv("X_FLAG", "yes")
    monkeypatch.setenv("X_NUM", "7")
    monkeypatch.setenv("X_LIST", "a, b,,c")
    assert env("X_KEY") == "s3cret"
    assert envbool("X_FLAG", False) is True and envint("X_NUM", 1) == 7
    assert envlist("X_LIST") == ["a", "b", "c"]
