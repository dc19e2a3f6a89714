"""A cold start through the whole pipe on a REAL Slurm: held with progress, never dropped."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from hpcbridge.client import Head, Platform, Progress
from hpcbridge.config import PlatformConfig
from tests.conftest import Hpcside
from tests.harness.slurm import SlurmCluster
from tests.harness.sshd import SSHServer

pytestmark = [pytest.mark.slurm, pytest.mark.sshd, pytest.mark.root]


def test_a_request_for_a_model_at_zero_is_held_through_the_slurm_cold_start(
        slurm1: SlurmCluster, hpcside_on: Callable[[SlurmCluster | None], Hpcside]) -> None:
    h = hpcside_on(slurm1)
    # The stub "loads" for 2 s, like a model, so the starting stage is visible.
    h.write_config(h.stub_service(min_instances=0, env="STUB_MODE=slow:2"), hold_timeout="60s")
    env_line = f"SLURM_CONF={slurm1.conf}"
    with SSHServer(h.account, h.deployment, h.config, slurm_env=env_line) as sshd:
        plat = Platform(PlatformConfig(name="hpc", transport="ssh", host="127.0.0.1", port=sshd.port,
                                       user=h.account.name, key_file=str(sshd.client_key),
                                       known_hosts=str(sshd.known_hosts))).start()
        try:
            async def ask() -> list[Any]:
                body = json.dumps({"model": "stub-model", "stream": True,
                                   "messages": [{"role": "user", "content": "What is the capital of France?"}]})
                return [e async for e in plat.stream("POST", "/v1/chat/completions", "stub-model", {},
                                                     body.encode())]

            events = asyncio.run(ask())
        finally:
            plat.stop()
    stages = [e.stage for e in events if isinstance(e, Progress)]
    assert "starting" in stages and stages[-1] == "ready", stages
    assert any(e.stage == "starting" and "loading the model on n1" in e.message
               for e in events if isinstance(e, Progress))
    assert next(e for e in events if isinstance(e, Head)).status == 200
    assert b"Paris" in b"".join(e for e in events if isinstance(e, bytes))
    # Job output and hpcside's files hold no prompt text.
    for path in h.state.rglob("*"):
        if path.is_file():
            assert b"capital of France" not in path.read_bytes(), path
