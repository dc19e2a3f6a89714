"""The bridge: persistent session(s) to each HPC platform, one async call for the app.

``await platform.stream(...)`` yields ``Head``, ``Progress`` and body ``bytes`` as they
arrive. Many streams share one link; a reader thread decodes frames and hands each
stream's frames to the event loop that is waiting for them. Closing the generator early
(the client went away) sends CANCEL, which closes the upstream connection to vLLM.

A supervisor thread per platform keeps links up: ping every ``keepalive`` seconds (which
also triggers hpcside's scheduler), reconnect with exponential backoff and jitter, and a
circuit breaker: while no link is up, calls fail at once with ``PlatformUnavailable``
carrying a retry-after, instead of hanging.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from common.upstream import Event, Head, Progress, UpstreamError
from hpcbridge.config import PlatformConfig
from hpcbridge.links import HostKeyRefused, Link, LinkError, open_link
from hpcside import protocol as p

log = logging.getLogger("hpcbridge")


class BridgeError(UpstreamError):
    """A request over an HPC platform's link failed; safe to show to the API client."""


class PlatformUnavailable(BridgeError):
    pass


_LOST = object()  # sentinel: the link went down


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any]


def _deliver(deliveries: list[tuple[asyncio.Queue[Any], list[p.Frame]]]) -> None:
    for queue, frames in deliveries:
        queue.put_nowait(frames)


class Connection:
    """One link carrying one session; thread-safe."""

    def __init__(self, link: Link, name: str, on_dead: Callable[[Connection, str], None]) -> None:
        self.link, self.name, self.on_dead = link, name, on_dead
        self.streams: dict[int, _Stream] = {}
        self.lock = threading.Lock()
        self.ids = itertools.count(1, 2)
        self.alive = True
        self.last_pong = time.monotonic()
        self.server: dict[str, Any] = {}
        self.pong: dict[str, Any] = {}
        self._hello = threading.Event()
        self.decoder = p.Decoder()
        self.link.send(p.hello_client("hpcbridge"))
        self.reader = threading.Thread(target=self._read, name=f"hpcbridge-{name}", daemon=True)
        self.reader.start()

    def wait_hello(self, timeout: float) -> None:
        if not self._hello.wait(timeout) or not self.alive:
            self.close("no protocol handshake")
            raise LinkError(f"{self.name}: the session server did not answer the handshake")
        p.check_hello(self.server, server_side=False)

    @property
    def active(self) -> int:
        return len(self.streams)

    def _read(self) -> None:
        why = "the link closed"
        try:
            while True:
                data = self.link.recv()
                if not data:
                    break
                batches: dict[int, list[p.Frame]] = defaultdict(list)
                for frame in self.decoder.feed(data):
                    if frame.stream == 0:
                        self._control(frame)
                    else:
                        batches[frame.stream].append(frame)
                # One wake-up of each event loop per read, however many streams it carried.
                by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], list[p.Frame]]]] = {}
                for sid, frames in batches.items():
                    stream = self.streams.get(sid)
                    if stream is not None:
                        by_loop.setdefault(stream.loop, []).append((stream.queue, frames))
                for loop, deliveries in by_loop.items():
                    loop.call_soon_threadsafe(_deliver, deliveries)
        except p.ProtocolError as exc:
            why = f"protocol error: {exc}"
        except Exception as exc:  # noqa: BLE001 - any failure of the link ends it the same way
            why = f"link error: {type(exc).__name__}"
        self.close(why)

    def _control(self, frame: p.Frame) -> None:
        if frame.type == p.HELLO:
            self.server = frame.json()
            self._hello.set()
        elif frame.type == p.PONG:
            self.last_pong = time.monotonic()
            self.pong = frame.json()
        elif frame.type == p.ERROR:
            raise p.ProtocolError(str(frame.json().get("message", "session error")))

    def close(self, why: str) -> None:
        with self.lock:
            if not self.alive:
                return
            self.alive = False
            streams, self.streams = self.streams, {}
        self._hello.set()
        for stream in streams.values():
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, _LOST)
        try:
            self.link.close()
        except Exception:  # noqa: BLE001, S110 - closing a broken link may fail in any way
            pass
        self.on_dead(self, why)

    def ping(self) -> None:
        self.send(p.encode_json(p.PING, 0, {"t": time.time()}))

    def send(self, data: bytes) -> None:
        try:
            self.link.send(data)
        except Exception as exc:  # noqa: BLE001
            self.close(f"send failed: {type(exc).__name__}")
            raise LinkError("the link to the platform broke") from None

    def open_stream(self, loop: asyncio.AbstractEventLoop) -> tuple[int, asyncio.Queue[Any]]:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        with self.lock:
            if not self.alive:
                raise LinkError("the link to the platform is down")
            sid = next(self.ids)
            self.streams[sid] = _Stream(loop, queue)
        return sid, queue

    def finish_stream(self, sid: int, cancel: bool) -> None:
        with self.lock:
            known = self.streams.pop(sid, None) is not None
        if cancel and known and self.alive:
            try:
                self.send(p.encode(p.CANCEL, sid))
            except LinkError:
                pass


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Platform:
    def __init__(self, cfg: PlatformConfig, opener: Callable[[PlatformConfig], Link] = open_link) -> None:
        self.cfg = cfg
        self.opener = opener
        self.connections: list[Connection] = []
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.failures = 0
        self.next_attempt = 0.0
        self.last_error = ""
        self.connecting = False
        self.ever_connected = threading.Event()
        # Requests sent while the first link comes up: (loop, future) in arrival order, woken in that
        # order when it is up (each waiting in a thread of its own woke in any order).
        self.starters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self.thread: threading.Thread | None = None
        self.want_more = False

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> Platform:
        with self.lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self._supervise, name=f"hpcbridge-{self.cfg.name}",
                                               daemon=True)
                self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        for conn in list(self.connections):
            conn.close("bridge stopped")
        if self.thread is not None:
            self.thread.join(timeout=5)

    def state(self) -> dict[str, Any]:
        up = [c for c in self.connections if c.alive]
        return {"name": self.cfg.name, "up": bool(up), "connections": len(up),
                "streams": sum(c.active for c in up), "failures": self.failures,
                "last_error": self.last_error, "retry_in": max(0.0, round(self.next_attempt - time.monotonic(), 1)),
                "last_pong": (up[0].pong if up else {})}

    def _on_dead(self, conn: Connection, why: str) -> None:
        with self.lock:
            if conn in self.connections:
                self.connections.remove(conn)
        if not self.stopping.is_set():
            log.warning("%s: link lost: %s", self.cfg.name, why)
            self.last_error = why
        self.wake.set()

    def _connect_one(self) -> None:
        self.connecting = True
        try:
            link = self.opener(self.cfg)
            conn = Connection(link, self.cfg.name, self._on_dead)
            conn.wait_hello(self.cfg.connect_timeout)
        except (LinkError, p.ProtocolError) as exc:
            self.failures += 1
            self.last_error = str(exc)
            # Exponential backoff with full jitter; a refused host key is not retried quickly.
            base = self.cfg.backoff_max if isinstance(exc, HostKeyRefused) else min(
                self.cfg.backoff_max, 0.25 * 2 ** min(self.failures - 1, 10))
            self.next_attempt = time.monotonic() + base * random.uniform(0.5, 1.0)  # noqa: S311
            log.warning("%s: connect failed (%d): %s", self.cfg.name, self.failures, exc)
            return
        finally:
            self.connecting = False
        with self.lock:
            self.connections.append(conn)
        self.failures, self.last_error, self.next_attempt = 0, "", 0.0
        self.ever_connected.set()
        log.info("%s: connected (%d connection(s))", self.cfg.name, len(self.connections))
        with self.lock:
            starters, self.starters = self.starters, []
        for loop, waiter in starters:
            try:
                loop.call_soon_threadsafe(_settle, waiter)
            except RuntimeError:  # that request's event loop is closed
                pass

    def _supervise(self) -> None:
        last_ping = 0.0
        while not self.stopping.is_set():
            now = time.monotonic()
            alive = [c for c in self.connections if c.alive]
            need = not alive or (self.want_more and len(alive) < self.cfg.max_connections)
            if need and now >= self.next_attempt:
                self.want_more = False
                self._connect_one()
                continue
            if now - last_ping >= self.cfg.keepalive:
                last_ping = now
                for conn in alive:
                    if now - conn.last_pong > self.cfg.dead_after:
                        conn.close(f"no answer to pings for {self.cfg.dead_after:.0f}s")
                        continue
                    try:
                        conn.ping()
                    except LinkError:
                        pass
            timeout = min(self.cfg.keepalive, max(0.05, self.next_attempt - now)) if need else self.cfg.keepalive
            self.wake.wait(timeout)
            self.wake.clear()

    # -- requests ----------------------------------------------------------------------

    async def _pick(self) -> Connection:
        alive = [c for c in self.connections if c.alive]
        if not alive and not self.ever_connected.is_set() and (self.connecting or self.next_attempt == 0.0):
            # Starting up: give the first connection its chance instead of failing at once, without
            # blocking the event loop; requests waiting together go out in the order they came.
            await self._first_link()
            alive = [c for c in self.connections if c.alive]
        if not alive:
            retry = max(1.0, round(self.next_attempt - time.monotonic(), 1))
            raise PlatformUnavailable(503, "platform_unavailable",
                                      f"HPC platform {self.cfg.name!r} is unavailable; retry later", retry_after=retry)
        conn = min(alive, key=lambda c: c.active)
        if conn.active >= self.cfg.streams_per_connection and len(alive) < self.cfg.max_connections:
            self.want_more = True
            self.wake.set()
        return conn

    async def _first_link(self) -> None:
        """Wait up to connect_timeout for the first link (woken by ``_connect_one``, in arrival order)."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        entry = (loop, waiter)
        with self.lock:  # checked under the lock that _connect_one empties the list under
            if self.ever_connected.is_set():
                return
            self.starters.append(entry)
        try:
            await asyncio.wait_for(waiter, self.cfg.connect_timeout)
        except TimeoutError:
            pass
        finally:
            with self.lock:
                if entry in self.starters:
                    self.starters.remove(entry)

    async def stream(self, method: str, path: str, model: str = "", headers: dict[str, str] | None = None,
                     body: bytes = b"") -> AsyncIterator[Event]:
        """Send one request; yield Head, Progress and body chunks as they arrive."""
        if len(body) > p.MAX_REQUEST_BODY:
            raise BridgeError(413, "payload_too_large", "request body too large")
        loop = asyncio.get_running_loop()
        conn = await self._pick()
        try:
            sid, queue = conn.open_stream(loop)
        except LinkError:
            raise PlatformUnavailable(503, "platform_unavailable", f"HPC platform {self.cfg.name!r} is unavailable",
                                      retry_after=1.0) from None
        done = False
        try:
            head = {"method": method, "path": path, "model": model, "headers": headers or {}}
            try:
                conn.send(p.encode_json(p.REQUEST, sid, head) + p.encode_data(sid, body) + p.encode(p.END, sid))
            except LinkError:
                raise PlatformUnavailable(503, "platform_unavailable", "the link to the HPC platform broke",
                                          retry_after=1.0) from None
            while True:
                batch = await queue.get()
                if batch is _LOST:
                    done = True
                    raise BridgeError(502, "platform_link_lost",
                                      "the link to the HPC platform was lost during the request", retry_after=1.0)
                for frame in batch:
                    if frame.type == p.DATA:
                        yield frame.payload
                    elif frame.type == p.RESPONSE:
                        obj = frame.json()
                        yield Head(int(obj.get("status", 502)), dict(obj.get("headers") or {}),
                                   str(obj.get("instance", "")))
                    elif frame.type == p.PROGRESS:
                        obj = frame.json()
                        yield Progress(str(obj.get("stage", "")), str(obj.get("message", "")),
                                       float(obj.get("elapsed", 0)))
                    elif frame.type == p.END:
                        done = True
                        return
                    elif frame.type == p.ERROR:
                        done = True
                        obj = frame.json()
                        raise BridgeError(int(obj.get("status", 502)), str(obj.get("code", "upstream_error")),
                                          str(obj.get("message", "error")), obj.get("retry_after"))
        finally:
            conn.finish_stream(sid, cancel=not done)

    async def request(self, method: str, path: str, model: str = "", headers: dict[str, str] | None = None,
                      body: bytes = b"") -> tuple[Head, bytes]:
        """The whole response at once (for small answers such as /v1/models)."""
        head: Head | None = None
        chunks: list[bytes] = []
        async for event in self.stream(method, path, model, headers, body):
            if isinstance(event, Head):
                head = event
            elif isinstance(event, bytes):
                chunks.append(event)
        if head is None:
            raise BridgeError(502, "upstream_error", "no response")
        return head, b"".join(chunks)


@dataclass
class Bridge:
    """All configured platforms, started lazily."""

    platforms: dict[str, Platform] = field(default_factory=dict)

    @classmethod
    def from_configs(cls, configs: list[PlatformConfig]) -> Bridge:
        return cls({c.name: Platform(c) for c in configs})

    def get(self, name: str) -> Platform:
        return self.platforms[name].start()

    def stop(self) -> None:
        for platform in self.platforms.values():
            platform.stop()
