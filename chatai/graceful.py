"""A daphne worker that is stopped (SIGTERM: a restart, a deploy) finishes its requests first.

Twisted's own SIGTERM handler stops the reactor at once, and daphne then cancels every running
application: each stream in flight is cut. Here SIGTERM (and SIGINT) instead stop the worker
listening, so the reverse proxy sends new requests to the other workers (a connection refused is
retried there), let the requests in flight finish, and stop the reactor when none is left or
after ``GRACEFUL_STOP_TIMEOUT`` seconds. A second signal stops at once.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from django.conf import settings

log = logging.getLogger("chatai.graceful")

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Draining:
    """Counts the HTTP requests in flight; stops the reactor gracefully when told to."""

    def __init__(self) -> None:
        self.inflight = 0
        self.stopping_since = 0.0

    def wrap(self, app: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        async def application(scope: dict[str, Any], receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            self.inflight += 1
            try:
                await app(scope, receive, send)
            finally:
                self.inflight -= 1

        return application

    def install(self) -> None:
        """Take over SIGTERM and SIGINT once daphne's reactor runs (it installs its own first)."""
        if "twisted.internet.reactor" not in sys.modules or "daphne.server" not in sys.modules:
            return  # not under daphne
        _reactor().callWhenRunning(self._take_signals)

    def _take_signals(self) -> None:
        reactor = _reactor()

        def on_signal(signum: int, _frame: Any) -> None:
            if self.stopping_since:
                reactor.callFromThread(reactor.stop)  # a second signal: now
                return
            reactor.callFromThread(self._begin, signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def _begin(self, why: str) -> None:
        from twisted.internet.tcp import Port

        reactor = _reactor()
        self.stopping_since = time.monotonic()
        for reader in reactor.getReaders():
            if isinstance(reader, Port):
                reader.stopListening()
        log.warning("%s: not accepting new connections; stopping once %d request(s) in flight finish "
                    "(at most %ss)", why, self.inflight, settings.GRACEFUL_STOP_TIMEOUT)
        self._check()

    def _check(self) -> None:
        reactor = _reactor()
        waited = time.monotonic() - self.stopping_since
        if self.inflight <= 0 or waited >= settings.GRACEFUL_STOP_TIMEOUT:
            log.warning("stopping now (%d request(s) in flight after %.1fs)", self.inflight, waited)
            reactor.stop()
        else:
            reactor.callLater(0.1, self._check)


def _reactor() -> Any:
    """Twisted's installed reactor (daphne installs the asyncio one); its module-level name is untyped."""
    from twisted.internet import reactor

    return reactor


draining = Draining()
