"""A daphne worker stopped with SIGTERM (a restart, a deploy) finishes its streams first."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Iterator

import pytest

from tests.live import LiveApp
from tests.test_faults_live import ASK, SENTENCE, one_stream


@pytest.fixture
def app() -> Iterator[LiveApp]:
    live = LiveApp(extra_env={"GRACEFUL_STOP_TIMEOUT": "60"}).start()
    try:
        live.create_user("alice")
        yield live
    finally:
        live.stop()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except OSError:
        return True


def test_sigterm_lets_the_streams_in_flight_finish_and_takes_no_new_connection(app: LiveApp) -> None:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{app.url}/v1", api_key=app.create_key("alice"), max_retries=0,
                                timeout=60)
    daphne = app.procs[0]

    async def run() -> tuple[list[tuple[str, str | None]], bool]:
        assert (await client.chat.completions.create(model="stub-model", messages=ASK)).choices  # warm
        streams = [asyncio.ensure_future(one_stream(client, repeat=8)) for _ in range(8)]  # 2.8 s each
        await asyncio.sleep(1.0)
        os.kill(daphne.pid, signal.SIGTERM)
        closed, deadline = False, time.monotonic() + 1.5  # the handler stops listening on daphne's own loop
        while not closed and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            closed = refused(app.ports[0])
        return list(await asyncio.wait_for(asyncio.gather(*streams), 60)), closed

    done, closed = asyncio.run(run())
    errors = [e for _, e in done if e]
    assert not errors, f"{len(errors)} of 8 streams were cut: {errors[:2]}"
    assert [t for t, _ in done] == [SENTENCE * 8] * 8
    assert closed, "the stopping worker still accepted connections"
    deadline = time.monotonic() + 15
    while daphne.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert daphne.poll() is not None, "the worker did not exit once its streams had finished"
    assert "not accepting new connections" in app.logs()
