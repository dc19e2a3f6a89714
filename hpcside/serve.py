"""The session server (``forcecommand`` verb ``serve``) and the router inside it.

One process per SSH channel: frames in on stdin, frames out on stdout (docs/protocol.md).
Many requests share the channel, each in its own asyncio task. The router forwards only
allow-listed paths and headers to the instance with the fewest requests in flight, adds
the instance's own token, retries another instance when a connection could not be made,
and holds a request while its model starts (asking the scheduler at once, sending
progress frames). Request and response bodies pass through memory only: nothing here
writes them to a file or a log.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import os
import re
import sys
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, List, Optional, Tuple

from . import __version__, nodetime
from . import protocol as p
from .admission import PRIORITY_HEADER, AdmissionQueue, Ticket, fits, parse_priority
from .config import Config, ServiceConfig
from .lifecycle import Stage, service_status
from .resume import Transcript
from .state import Load, ModelLoad, ServiceState, inflight_path, load_scheduler_state, publish_inflight, read_json
from .upstream import ConnectFailed, Pool, Response, UpstreamFailed

log = logging.getLogger("hpcside.serve")

ALLOWED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health"})
ALLOWED_METHODS = {"/v1/models": "GET", "/health": "GET"}  # the others are POST
# Answered by the session server itself, never forwarded: GET with a query string.
NODETIME_PATH = "/hpcside/nodetime"  # ?since=<epoch seconds>: each instance's node time
REQUEST_HEADERS = frozenset({"content-type", "accept", "x-request-id"})
RESPONSE_HEADERS = frozenset({"content-type", "x-request-id", "retry-after"})
HEADER_VALUE_RE = re.compile(r"[\x20-\x7e]{0,512}")  # fullmatch: no trailing newline slips through
_OBJECT_START = re.compile(rb"\s*(\{)\s*(\})?")  # a JSON object's opening brace; group 2: it is empty
MAX_STREAMS = 1024
# Attempts per request (each one on an instance that was not known to have failed); the hold bound
# limits the time they take.
MAX_ATTEMPTS = 8
CONTINUABLE = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
HOLD_POLL = 0.5
# A request waiting for a free slot gets its first progress frame after this long (most waits are
# shorter: a frame each would be noise), then one every PROGRESS_EVERY.
BUSY_NOTICE = 1.0
PROGRESS_EVERY = 5.0
PUBLISH_EVERY = 1.0


@dataclass
class Upload:
    """A request body being received: REQUEST came, END not yet; ``timer`` enforces body_timeout."""

    head: Dict[str, Any]
    data: bytearray
    timer: asyncio.TimerHandle


class StreamError(Exception):
    def __init__(self, status: int, code: str, message: str, retry_after: Optional[float] = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after

    def payload(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"status": self.status, "code": self.code, "message": self.message}
        if self.retry_after is not None:
            out["retry_after"] = self.retry_after
        return out


@dataclass
class Instance:
    iid: str
    host: str
    port: int
    token: str


class InstanceFailed(Exception):
    """The instance refused, reset or died during a request."""


@dataclass
class Reply:
    """What the client has of one response so far, across the instances that served it."""

    head_sent: bool = False
    transcript: Optional[Transcript] = None


class Router:
    """Picks instances from routing.json (re-read when it changes) and counts load."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.path = config.settings.state_dir / "routing.json"
        self._stamp: Tuple[int, int] = (0, 0)
        self._table: Dict[str, List[Instance]] = {}
        self.slurm_ok = True
        self.inflight: Dict[str, int] = {}  # per instance
        self.models: Dict[str, ModelLoad] = {}
        self.dirty = False
        # Instances that failed a request here, with when: out of routing at once, until a
        # reconcile that started after the failure lists them as ready again (or drops them).
        self.suspect: Dict[str, float] = {}
        # Admission (hpcside/admission.py): per instance, at most max_inflight of this session's
        # requests with the same or a better priority (twice that in all); the others wait in their
        # model's queue, lowest priority number first. ``running``: the priorities in flight.
        self.caps = {svc.model: svc.max_inflight for svc in config.services.values()}
        self.running: Dict[str, List[int]] = {}
        self.queues: Dict[str, AdmissionQueue] = {}
        self.arrivals = itertools.count()  # a request's place among equal priorities

    def table(self) -> Dict[str, List[Instance]]:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_ino)
        except OSError:
            return self._table
        if stamp != self._stamp:
            data = read_json(self.path)
            if isinstance(data, dict):
                self._stamp = stamp
                self.slurm_ok = bool(data.get("slurm_ok", True))
                table: Dict[str, List[Instance]] = {}
                for model, entries in (data.get("models") or {}).items():
                    for e in entries:
                        try:
                            host, port = e["url"][len("http://"):].rsplit(":", 1)
                            table.setdefault(model, []).append(
                                Instance(e["id"], host.strip("[]"), int(port), e["token"]))
                        except (KeyError, ValueError, TypeError):
                            continue
                self._table = table
                self._settle_suspects(data.get("generated_at"), table)
        return self._table

    def _settle_suspects(self, generated_at: Any, table: Dict[str, List[Instance]]) -> None:
        if not self.suspect:
            return
        listed = {i.iid for instances in table.values() for i in instances}
        for iid, since in list(self.suspect.items()):
            checked_after = isinstance(generated_at, (int, float)) and generated_at > since
            if iid not in listed or checked_after:
                del self.suspect[iid]

    def mark_failed(self, iid: str) -> None:
        self.suspect[iid] = time.time()

    def routable(self, model: str) -> List[Instance]:
        """The ready instances of a model, leaving out those that just failed here."""
        return [i for i in self.table().get(model, []) if i.iid not in self.suspect]

    def pick(self, model: str, priority: int = 0) -> Optional[Instance]:
        """Of the routable instances with a slot for this priority, the one with the fewest requests
        in flight."""
        cap = self.caps.get(model, 1)
        candidates = [i for i in self.routable(model) if fits(self.running.get(i.iid, ()), priority, cap)]
        if not candidates:
            return None
        return min(candidates, key=lambda i: self.inflight.get(i.iid, 0))

    def admit(self, model: str, ticket: Ticket) -> Optional[Instance]:
        """An instance with a slot taken for this request when one fits it and nobody waits before
        it; else the ticket joins the model's queue (and is woken by ``dispatch``)."""
        queue = self.queues.get(model)
        first = queue.first() if queue else None
        if first is None or ticket.key < first.key:
            inst = self.pick(model, ticket.priority)
            if inst is not None:
                self.begin(model, inst.iid, ticket.priority)
                return inst
        self.queues.setdefault(model, AdmissionQueue()).push(ticket)
        return None

    def dispatch(self, model: str) -> None:
        """Admit waiting requests, in order, while the first one fits an instance (when it does
        not, no later one does: those have the same or a worse priority)."""
        queue = self.queues.get(model)
        while queue:
            first = queue.first()
            inst = self.pick(model, first.priority) if first is not None else None
            if inst is None:
                return
            ticket = queue.pop()
            self.begin(model, inst.iid, ticket.priority)
            ticket.wake.set_result(inst)

    def leave(self, model: str, ticket: Ticket) -> None:
        """A waiting request gives up (cancelled, timed out): out of the queue or, if a slot was
        given to it in the meantime, the slot back to the next one."""
        queue = self.queues.get(model)
        if queue is not None and queue.discard(ticket):
            return
        wake = ticket.wake
        if wake is not None and wake.done() and not wake.cancelled():
            self.end(model, wake.result().iid, ticket.priority)

    def load(self, model: str) -> ModelLoad:
        return self.models.setdefault(model, ModelLoad())

    def begin(self, model: str, iid: str, priority: int = 0) -> None:
        self.inflight[iid] = self.inflight.get(iid, 0) + 1
        self.running.setdefault(iid, []).append(priority)
        m = self.load(model)
        m.inflight += 1
        m.last_request_at = time.time()
        self.dirty = True

    def end(self, model: str, iid: str, priority: int = 0) -> None:
        self.inflight[iid] = max(0, self.inflight.get(iid, 0) - 1)
        if not self.inflight[iid]:
            del self.inflight[iid]
        running = self.running.get(iid)
        if running is not None and priority in running:
            running.remove(priority)
            if not running:
                del self.running[iid]
        m = self.load(model)
        m.inflight = max(0, m.inflight - 1)
        m.last_request_at = time.time()
        self.dirty = True
        self.dispatch(model)  # the freed slot goes to the first waiting request at once

    def snapshot(self) -> Load:
        return Load(models={k: ModelLoad(v.inflight, v.waiting, v.last_request_at) for k, v in self.models.items()},
                    instances=dict(self.inflight))


class Session:
    def __init__(self, config: Config, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.config = config
        self.reader, self.writer = reader, writer
        self.router = Router(config)
        # 3 s covers one lost SYN (retransmitted after 1 s) on a busy instance.
        self.pool = Pool(connect_timeout=3.0)
        self.tasks: Dict[int, asyncio.Future[None]] = {}
        # Request bodies in memory, bounded (settings: session_body_budget, body_timeout,
        # held_body_budget): bodies being received, and the size of each body whose stream runs
        # (held or forwarded); ``body_bytes`` is the sum of both, ``held_bytes`` the held part.
        self.bodies: Dict[int, Upload] = {}
        self.running_bytes: Dict[int, int] = {}
        self.body_bytes = 0
        self.held_bytes = 0
        self.last_forced = -1e9  # monotonic time of the last forced reconcile of this session
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reconcile")
        # sacct may take seconds: its own thread, so neither the loop nor a reconcile waits for it.
        self.slow = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nodetime")
        self.reconciling: Optional[asyncio.Future] = None
        self.watchers: Dict[str, asyncio.Future[None]] = {}  # per model with waiting requests
        self.scheduler: Any = None
        self.closed = False

    # -- output ------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if not self.closed:
            self.writer.write(data)

    def send_json(self, type_: int, stream: int, obj: Dict[str, Any]) -> None:
        self.send(p.encode_json(type_, stream, obj))

    # -- the session loop ------------------------------------------------------------

    async def run(self) -> int:
        decoder = p.Decoder()
        publisher = asyncio.ensure_future(self.publish_loop())
        try:
            first = await asyncio.wait_for(self._read_frames(decoder, first=True), 10)
            if first is None:
                return 0
            while True:
                data = await self.reader.read(65536)
                if not data:
                    return 0
                for frame in decoder.feed(data):
                    self.handle(frame)
                await self.writer.drain()
        except p.ProtocolError as exc:
            self.send_json(p.ERROR, 0, {"status": 400, "code": "protocol_error", "message": str(exc)})
            return 1
        except asyncio.TimeoutError:
            self.send_json(p.ERROR, 0, {"status": 408, "code": "protocol_error", "message": "no HELLO within 10s"})
            return 1
        except (ConnectionError, BrokenPipeError):
            return 0
        finally:
            publisher.cancel()
            for watcher in list(self.watchers.values()):
                watcher.cancel()
            for task in list(self.tasks.values()):
                task.cancel()
            if self.tasks:
                await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            try:
                await self.writer.drain()
            except (ConnectionError, BrokenPipeError):
                pass
            self.closed = True
            self.pool.close()
            self.executor.shutdown(wait=False)
            self.slow.shutdown(wait=False)
            try:
                inflight_path(self.config.settings.state_dir).unlink()
            except OSError:
                pass

    async def _read_frames(self, decoder: p.Decoder, first: bool) -> Optional[bool]:
        """Read until the HELLO frame; handle anything that came with it."""
        while True:
            data = await self.reader.read(65536)
            if not data:
                return None
            frames = decoder.feed(data)
            if not frames:
                continue
            hello = frames[0]
            if hello.type != p.HELLO or hello.stream != 0:
                raise p.ProtocolError("the session must start with HELLO")
            p.check_hello(hello.json(), server_side=True)
            self.send(p.hello_server(f"hpcside {__version__}"))
            for frame in frames[1:]:
                self.handle(frame)
            await self.writer.drain()
            return True

    def handle(self, frame: p.Frame) -> None:
        sid = frame.stream
        if frame.type == p.PING:
            self.on_ping(frame)
        elif frame.type == p.REQUEST:
            if sid == 0 or sid in self.bodies or sid in self.tasks:
                raise p.ProtocolError(f"stream {sid} is 0 or already in use")
            if len(self.tasks) + len(self.bodies) >= MAX_STREAMS:
                self.refuse(sid, StreamError(429, "too_many_streams",
                                             f"more than {MAX_STREAMS} streams on one session"))
                return
            try:
                head = frame.json()
            except p.TooDeep as exc:  # refuse this request, keep the session
                self.refuse(sid, StreamError(400, "bad_request", str(exc)))
                return
            timer = asyncio.get_running_loop().call_later(self.config.settings.body_timeout, self._body_late, sid)
            self.bodies[sid] = Upload(head, bytearray(), timer)
        elif frame.type == p.DATA:
            pending = self.bodies.get(sid)
            if pending is None:
                return  # data for a stream that was refused or cancelled
            size = len(pending.data) + len(frame.payload)
            budget = self.config.settings.session_body_budget
            if size > p.MAX_REQUEST_BODY or size > budget:
                self.drop_upload(sid)
                self.refuse(sid, StreamError(413, "payload_too_large", "request body too large"))
            elif self.body_bytes + len(frame.payload) > budget:
                self.drop_upload(sid)
                self.refuse(sid, StreamError(429, "body_budget_exceeded", "request bodies on this session exceed "
                                             f"{budget} bytes; retry shortly", retry_after=1))
            else:
                pending.data.extend(frame.payload)
                self.body_bytes += len(frame.payload)
        elif frame.type == p.END:
            pending = self.drop_upload(sid)
            if pending is not None:
                head, body = pending.head, bytes(pending.data)
                del pending  # one copy of the body from here on
                self.running_bytes[sid] = len(body)
                self.body_bytes += len(body)
                self.tasks[sid] = asyncio.ensure_future(self.serve_stream(sid, head, body))
                self.tasks[sid].add_done_callback(partial(self._finished, sid))
        elif frame.type == p.CANCEL:
            self.drop_upload(sid)
            running = self.tasks.get(sid)
            if running is not None:
                running.cancel()
        else:
            raise p.ProtocolError(f"unexpected {p.NAMES[frame.type]} frame from the client")

    def refuse(self, sid: int, error: StreamError) -> None:
        self.send_json(p.ERROR, sid, error.payload())

    def drop_upload(self, sid: int) -> Optional[Upload]:
        """Forget a body being received (complete, refused or cancelled) and un-count its bytes."""
        pending = self.bodies.pop(sid, None)
        if pending is not None:
            pending.timer.cancel()
            self.body_bytes -= len(pending.data)
        return pending

    def _body_late(self, sid: int) -> None:
        if self.drop_upload(sid) is not None:
            self.refuse(sid, StreamError(408, "body_timeout", "the request body did not complete within "
                                         f"{self.config.settings.body_timeout:g}s"))

    def _finished(self, sid: int, _task: asyncio.Future[None]) -> None:
        self.tasks.pop(sid, None)
        self.body_bytes -= self.running_bytes.pop(sid, 0)

    # -- ping and the scheduler --------------------------------------------------------

    def on_ping(self, frame: p.Frame) -> None:
        obj = frame.json()
        self.trigger_reconcile(force=False)
        table = self.router.table()
        self.send_json(p.PONG, 0, {"t": obj.get("t"), "slurm_ok": self.router.slurm_ok,
                                   "ready": {m: len(v) for m, v in table.items()}})

    def trigger_reconcile(self, force: bool) -> None:
        if self.reconciling is not None and not self.reconciling.done():
            return
        # At most one forced reconcile per min_interval from this session (held requests ask every
        # HOLD_POLL); in between, the scheduler's own min_interval decides.
        now = time.monotonic()
        if force and now - self.last_forced < self.config.settings.min_interval:
            force = False
        if force:
            self.last_forced = now
        # Held requests count in this reconcile: the counts are written here, on the event loop like
        # publish_loop's, so a late thread can never overwrite newer counts with older ones.
        try:
            publish_inflight(self.config.settings.state_dir, self.router.snapshot())
        except OSError:
            pass
        loop = asyncio.get_running_loop()
        self.reconciling = loop.run_in_executor(self.executor, self._reconcile, force)

    def _reconcile(self, force: bool) -> None:
        try:
            if self.scheduler is None:
                from .reconcile import Scheduler

                self.scheduler = Scheduler(self.config)
            self.scheduler.reconcile(force=force)
        except Exception as exc:  # the session must survive a failing reconcile
            log.warning("reconcile failed: %s", type(exc).__name__)

    async def publish_loop(self) -> None:
        state_dir = self.config.settings.state_dir
        while True:
            await asyncio.sleep(PUBLISH_EVERY)
            if self.router.dirty or self.router.models:
                self.router.dirty = False
                try:
                    publish_inflight(state_dir, self.router.snapshot())
                except OSError:
                    pass

    # -- one request -------------------------------------------------------------------

    async def serve_stream(self, sid: int, head: Dict[str, Any], body: bytes) -> None:
        try:
            await self.route(sid, head, body)
        except StreamError as exc:
            self.send_json(p.ERROR, sid, exc.payload())
        except asyncio.CancelledError:
            pass  # the client cancelled: the upstream connection was closed on the way out
        except Exception as exc:  # never a traceback on the channel, never content in the log
            log.warning("stream failed: %s", type(exc).__name__)
            self.send_json(p.ERROR, sid, {"status": 500, "code": "internal_error",
                                          "message": f"hpcside error: {type(exc).__name__}"})

    def validate(self, head: Dict[str, Any]) -> Tuple[str, str, str, Dict[str, str], int]:
        method, path, model = head.get("method"), head.get("path"), head.get("model", "")
        if not isinstance(path, str) or path not in ALLOWED_PATHS:
            raise StreamError(404, "not_found", "path not allowed")
        if method != ALLOWED_METHODS.get(path, "POST"):
            raise StreamError(405, "method_not_allowed", f"{path} takes {ALLOWED_METHODS.get(path, 'POST')}")
        if not isinstance(model, str) or len(model) > 256:
            raise StreamError(400, "bad_request", "model must be a string")
        headers: Dict[str, str] = {}
        priority = 0
        raw = head.get("headers") or {}
        if not isinstance(raw, dict):
            raise StreamError(400, "bad_request", "headers must be an object")
        for key, value in raw.items():
            if isinstance(key, str) and key.lower() in REQUEST_HEADERS and isinstance(value, str) \
                    and HEADER_VALUE_RE.fullmatch(value):
                headers[key.lower()] = value
            elif isinstance(key, str) and key.lower() == PRIORITY_HEADER:
                priority = parse_priority(value)  # for the router and the body; never a header upstream
        return method, path, model, headers, priority

    async def route(self, sid: int, head: Dict[str, Any], body: bytes) -> None:
        raw_path = head.get("path")
        if isinstance(raw_path, str) and raw_path.split("?", 1)[0] == NODETIME_PATH:
            await self.answer_nodetime(sid, head.get("method"), raw_path)
            return
        method, path, model, headers, priority = self.validate(head)
        if not model and path in ("/v1/models", "/health"):
            self.answer_locally(sid, path)
            return
        svc = self.config.service_for_model(model)
        if svc is None:
            raise StreamError(404, "model_not_found", f"model {model!r} does not exist on this platform")
        if method == "POST":
            body = with_priority(body, priority if svc.scheduling_policy == "priority" else 0)
        ticket = Ticket(priority, next(self.router.arrivals))  # one per request, kept across attempts
        hold_from = time.monotonic()
        reply = Reply()
        attempt = body
        failures = 0
        while True:
            try:
                inst = await self.acquire(sid, svc, ticket, hold_from)
            except StreamError as exc:
                if not reply.head_sent:
                    raise
                self.end_cut(sid, reply, exc.message)
                return
            try:  # acquire took a slot on inst: given back (and passed on) below
                await self.forward(sid, inst, method, path, headers, attempt, reply)
                return
            except InstanceFailed as exc:
                # Out of routing here at once; the scheduler checks it now and replaces it if dead.
                failures += 1
                hold_from = time.monotonic()  # the hold bound counts from the failure
                self.router.mark_failed(inst.iid)
                self.trigger_reconcile(force=True)
                log.warning("instance %s failed during a request: %s", inst.iid, exc)
                if reply.head_sent:
                    next_body = self.continuation(sid, reply, body, failures)
                    if next_body is None:
                        return
                    attempt = next_body
                elif failures >= MAX_ATTEMPTS:
                    raise StreamError(502, "upstream_unreachable", "no instance of the model could be reached",
                                      retry_after=5) from None
            finally:
                self.router.end(model, inst.iid, ticket.priority)

    def continuation(self, sid: int, reply: Reply, body: bytes, failures: int) -> Optional[bytes]:
        """The request that continues a cut stream, or None when the stream was ended for the client."""
        t = reply.transcript
        if t is None or t.finished or failures > MAX_ATTEMPTS:
            self.end_cut(sid, reply, "the model instance failed during the reply")
            return None
        following = t.continuation(body)
        if following is None:
            self.end_cut(sid, reply, f"the model instance failed during the reply: {t.why_not}")
            return None
        self.send_json(p.PROGRESS, sid, {"stage": Stage.CONTINUING.value, "message": "the model instance failed; "
                                         "continuing the reply on another instance", "elapsed": 0})
        return following

    def end_cut(self, sid: int, reply: Reply, message: str) -> None:
        """A reply whose head was sent ends cleanly: error event and [DONE] for a stream, ERROR otherwise."""
        if reply.transcript is None:
            self.send_json(p.ERROR, sid, StreamError(502, "upstream_error", message).payload())
            return
        self.send(p.encode_data(sid, reply.transcript.ending(message)))
        self.send(p.encode(p.END, sid))

    def answer_locally(self, sid: int, path: str) -> None:
        if path == "/health":
            obj: Dict[str, Any] = {"status": "ok", "server": f"hpcside {__version__}",
                                   "slurm_ok": self.router.slurm_ok}
        else:
            obj = {"object": "list", "data": self.models_status()}
        self.send_local(sid, obj)

    def send_local(self, sid: int, obj: Dict[str, Any]) -> None:
        body = json.dumps(obj).encode()
        self.send_json(p.RESPONSE, sid, {"status": 200, "headers": {"content-type": "application/json"}})
        self.send(p.encode_data(sid, body))
        self.send(p.encode(p.END, sid))

    async def answer_nodetime(self, sid: int, method: Any, path: str) -> None:
        """Each instance's node time since ``since`` (hpcside/nodetime.py), for the charge-back.
        Read in a thread: sacct may take seconds and the ledger is a file."""
        if method != "GET":
            raise StreamError(405, "method_not_allowed", f"{NODETIME_PATH} takes GET")
        since = nodetime_since(path)
        sacct = nodetime.shared_sacct(self.config)
        loop = asyncio.get_running_loop()
        obj = await loop.run_in_executor(self.slow, nodetime.collect, self.config, since, sacct)
        self.send_local(sid, obj)

    def models_status(self) -> List[Dict[str, Any]]:
        """Every configured model with its state and demand, for the gateway's /v1/models."""
        table = self.router.table()
        state = load_scheduler_state(self.config.settings.state_dir)
        now = time.time()
        out = []
        for svc in self.config.services.values():
            mine = [i for i in state.instances.values() if i.service == svc.name]
            ss = state.services.get(svc.name)
            status = service_status(mine, ss, routable=len(table.get(svc.model, [])), slurm_ok=state.slurm_ok,
                                    now=now).status.value
            out.append({"id": svc.model, "object": "model", "owned_by": "hpcside", "status": status,
                        "instances": len(table.get(svc.model, [])),
                        "queued": len(self.router.queues.get(svc.model) or ()),
                        "demand": (ss.inflight + ss.waiting) if ss else 0,
                        "max_model_len": svc.max_model_len,
                        "start_estimate": start_estimate(ss, now) if status == "offline" else None})
        return out

    async def acquire(self, sid: int, svc: ServiceConfig, ticket: Ticket, started: float) -> Instance:
        """An instance with a slot taken for this request: at once when one is free and nobody waits,
        else after waiting in the model's admission queue (priority order), up to hold_timeout.
        A wait through a cold start asks the scheduler (``watch``) and reports its stage; a wait for
        a free slot reports the requests ahead. Either way it counts as waiting for the scheduler."""
        router, model = self.router, svc.model
        ticket.wake = asyncio.get_running_loop().create_future()
        inst = router.admit(model, ticket)
        if inst is not None:
            return inst
        router.dispatch(model)  # a slot may be free with others waiting (an instance just appeared)
        load = router.load(model)
        load.waiting += 1
        load.last_request_at = time.time()
        router.dirty = True
        self.watch(svc)
        waited_from = time.monotonic()
        held = 0
        cold = was_cold = False
        last_stage: Optional[Tuple[str, str]] = None
        last_sent = -PROGRESS_EVERY
        limit = self.config.settings.hold_timeout
        admitted = False
        try:
            while not ticket.wake.done():
                now = time.monotonic()
                elapsed = now - started
                cold = not router.routable(model)
                if elapsed > limit:
                    if cold:
                        raise StreamError(503, "model_unavailable", f"model {model!r} did not become ready "
                                          f"within {limit:.0f}s", retry_after=30)
                    raise StreamError(503, "model_busy", f"no free slot on model {model!r} within {limit:.0f}s; "
                                      "retry later", retry_after=10)
                if cold:
                    was_cold = True
                    waited_from = now  # a wait for a slot, if one follows, starts when the model is up
                    if not held:
                        held = self.admit_held(sid)
                    stage = self.stage_of(svc)
                    due = stage != last_stage or elapsed - last_sent >= PROGRESS_EVERY
                    timeout = HOLD_POLL
                else:
                    self.held_bytes -= held  # waiting for a slot, not for a start: not held any more
                    held = 0
                    queue = router.queues.get(model)
                    ahead = queue.ahead(ticket) if queue is not None else 0
                    stage = (Stage.BUSY.value, f"waiting for a free slot on {model}: "
                             f"{ahead} request{'' if ahead == 1 else 's'} ahead")
                    noticed = now - waited_from >= BUSY_NOTICE
                    due = noticed and (last_stage is None or stage[0] != last_stage[0]
                                       or elapsed - last_sent >= PROGRESS_EVERY)
                    timeout = (BUSY_NOTICE - (now - waited_from)) if not noticed else PROGRESS_EVERY
                if due:
                    self.send_json(p.PROGRESS, sid, {"stage": stage[0], "message": stage[1],
                                                     "elapsed": round(elapsed, 1)})
                    await self.writer.drain()
                    last_stage, last_sent = stage, elapsed
                    continue  # the wake may have come during the drain
                await asyncio.wait({ticket.wake}, timeout=max(0.01, min(timeout, limit - elapsed + 0.01)))
            inst = ticket.wake.result()
            admitted = True
            if was_cold:
                self.send_json(p.PROGRESS, sid, {"stage": Stage.READY.value,
                                                 "elapsed": round(time.monotonic() - started, 1)})
            return inst
        finally:
            if not admitted:
                router.leave(model, ticket)  # cancelled or timed out: no slot kept, none lost
            self.held_bytes -= held
            load.waiting = max(0, load.waiting - 1)
            router.dirty = True

    def watch(self, svc: ServiceConfig) -> None:
        """One watcher per model while requests wait for it (not one poll per request)."""
        if svc.model not in self.watchers:
            self.watchers[svc.model] = asyncio.ensure_future(self.watch_queue(svc))

    async def watch_queue(self, svc: ServiceConfig) -> None:
        """Admit waiting requests as instances become ready (routing.json re-read, suspects cleared)
        and, while none is, ask the scheduler for one (a forced reconcile at most once per
        min_interval). Freed slots need no watching: ``Router.end`` passes them on at once."""
        router = self.router
        try:
            while router.queues.get(svc.model):
                router.dispatch(svc.model)
                if router.queues.get(svc.model) and not router.routable(svc.model):
                    self.trigger_reconcile(force=True)
                await asyncio.sleep(HOLD_POLL)
        finally:
            self.watchers.pop(svc.model, None)

    def admit_held(self, sid: int) -> int:
        """Count this stream's body as held through a cold start, or refuse it over held_body_budget."""
        size = self.running_bytes.get(sid, 0)
        budget = self.config.settings.held_body_budget
        if size and self.held_bytes + size > budget:
            raise StreamError(503, "hold_full", "too many request bytes on this session are waiting for a model "
                              f"to start (held_body_budget {budget} bytes); retry later", retry_after=5)
        self.held_bytes += size
        return size

    def stage_of(self, svc: ServiceConfig) -> Tuple[str, str]:
        state = load_scheduler_state(self.config.settings.state_dir)
        mine = [i for i in state.instances.values() if i.service == svc.name]
        # The stage ignores the routing table: hold() asks the router itself before each look.
        words = service_status(mine, state.services.get(svc.name), routable=0, slurm_ok=state.slurm_ok,
                               now=time.time())
        return words.stage.value, words.message

    async def forward(self, sid: int, inst: Instance, method: str, path: str, headers: Dict[str, str],
                      body: bytes, reply: Reply) -> None:
        """One attempt on one instance. The head goes to the client with the first body byte, so an
        instance that fails before it is retried elsewhere without the client noticing."""
        up_headers = dict(headers)
        up_headers["authorization"] = f"Bearer {inst.token}"
        try:
            response = await self.pool.request(inst.host, inst.port, method, path, up_headers, body)
        except (ConnectFailed, UpstreamFailed) as exc:
            raise InstanceFailed(str(exc)) from None
        agen = response.body
        try:
            if reply.head_sent and response.status != 200:
                async for _ in agen:
                    pass
                self.end_cut(sid, reply, f"the reply could not be continued (the instance answered {response.status})")
                return
            async for chunk in agen:
                if not reply.head_sent:
                    self.send_head(sid, inst, path, response, reply)
                out = reply.transcript.feed(chunk) if reply.transcript is not None else chunk
                if out:
                    self.send(p.encode_data(sid, out))
                    await self.writer.drain()
        except UpstreamFailed as exc:
            raise InstanceFailed(str(exc)) from None
        finally:
            await agen.aclose()  # type: ignore[attr-defined]  # closes the connection on cancel
        if not reply.head_sent:
            self.send_head(sid, inst, path, response, reply)
        t = reply.transcript
        if t is not None:
            rest = t.tail()
            if rest:
                self.send(p.encode_data(sid, rest))
            if not t.done:
                raise InstanceFailed("the stream ended before [DONE]")
        self.send(p.encode(p.END, sid))

    def send_head(self, sid: int, inst: Instance, path: str, response: Response, reply: Reply) -> None:
        out_headers = {k.lower(): v for k, v in response.headers if k.lower() in RESPONSE_HEADERS}
        self.send_json(p.RESPONSE, sid, {"status": response.status, "headers": out_headers, "instance": inst.iid})
        reply.head_sent = True
        kind = CONTINUABLE.get(path)
        if kind and response.status == 200 and out_headers.get("content-type", "").startswith("text/event-stream"):
            reply.transcript = Transcript(kind)


def nodetime_since(path: str) -> float:
    """``since`` from ``/hpcside/nodetime?since=1764662400``: seconds since the epoch, 0 if absent."""
    query = urllib.parse.urlsplit(path).query
    try:
        fields = urllib.parse.parse_qs(query, strict_parsing=True, max_num_fields=4) if query else {}
    except ValueError:
        raise StreamError(400, "bad_request", "the query must be since=<seconds since the epoch>") from None
    unknown = set(fields) - {"since"}
    if unknown:
        raise StreamError(400, "bad_request", f"unknown query parameter {sorted(unknown)[0][:40]!r}; "
                          "only since is accepted")
    values = fields.get("since", ["0"])
    try:
        since = float(values[0]) if len(values) == 1 and len(values[0]) <= 32 else -1.0
    except ValueError:
        since = -1.0
    if not math.isfinite(since) or since < 0:
        raise StreamError(400, "bad_request", "since must be one number of seconds since the epoch (>= 0)")
    return since


def with_priority(body: bytes, priority: int) -> bytes:
    """The JSON request body with its top-level ``priority`` set to ``priority``, or absent when 0
    (vLLM's default; an fcfs server refuses any other value, and a client must not choose its own).
    Cheap in the usual case: a body without the word is only spliced, and only for a nonzero value;
    a body that has it (the client's field, or the word in a string), or that does not open with a
    plain ``{`` (a BOM, UTF-16 or UTF-32, which vLLM's JSON parser takes too), is parsed and rewritten."""
    opening = _OBJECT_START.match(body)
    if opening is not None and b'"priority"' not in body:
        if not priority:
            return body
        at = opening.end(1)
        field = b'"priority": %d' % priority if opening.group(2) else b'"priority": %d, ' % priority
        return b"".join((body[:at], field, memoryview(body)[at:]))
    try:
        req = json.loads(body)
    except ValueError:
        return body
    if not isinstance(req, dict):
        return body
    req.pop("priority", None)
    if priority:
        req["priority"] = priority
    return json.dumps(req).encode()


def start_estimate(ss: Optional[ServiceState], now: float) -> Optional[float]:
    """Seconds until Slurm could start an instance of a cold service, as last asked."""
    if ss is None or ss.start_estimate is None:
        return None
    return max(0.0, round(ss.start_estimate - (now - ss.estimated_at), 1))


async def serve(config: Config) -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=p.MAX_FRAME * 2)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, sys.stdout.buffer)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return await Session(config, reader, writer).run()


def run_serve(config: Config) -> int:
    return asyncio.run(serve(config))
