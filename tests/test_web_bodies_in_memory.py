"""No prompt touches a disk on the web side: a live daphne keeps request bodies in memory.

Twisted (daphne's HTTP server) spools a body of 100,000 bytes or more, or one without a
Content-Length (chunked), to an unlinked temporary file (O_TMPFILE: no directory entry, only a
``/tmp/#N (deleted)`` link in /proc/PID/fd) before the ASGI application sees it. These tests
upload a 1 MB canary prompt slowly, with a Content-Length and chunked, while a thread lists the
daphne process's open files; no new file may appear.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.live import ROOT, LiveApp

CANARY = f"CANARY{uuid.uuid4().hex[:16]}"
SPOOL_DIRS = (tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm")


@pytest.fixture(scope="module")
def app() -> Iterator[LiveApp]:
    live = LiveApp(services=" ").start()  # no model needed: the body is what is watched
    try:
        live.create_user("alice")
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="module")
def key(app: LiveApp) -> str:
    return app.create_key("alice")


def open_files(pid: int) -> set[str]:
    """What the process's file descriptors point to (files, sockets, pipes)."""
    targets = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:  # closed between listdir and readlink
            pass
    return targets


class FileWatcher(threading.Thread):
    """Lists /proc/PID/fd every millisecond; remembers every unlinked or temporary file opened that
    was not open before (the live app's own directory, with its log and database, and the project's
    code aside)."""

    def __init__(self, pid: int, ignore_under: str) -> None:
        super().__init__(daemon=True)
        self.pid, self.ignore_under = pid, ignore_under
        self.baseline = open_files(pid)
        self.seen: set[str] = set()
        self.samples = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for target in open_files(self.pid) - self.baseline:
                # The project's own code and venv are not spool files, even when the checkout is under
                # /tmp (CI clones there; Python opens a module's .pyc on a first import).
                spooled = target.startswith(SPOOL_DIRS) and not target.startswith((self.ignore_under, str(ROOT)))
                if "(deleted)" in target or spooled:
                    self.seen.add(target)
            self.samples += 1
            time.sleep(0.001)

    def __enter__(self) -> FileWatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join()


def prompt_body(size: int) -> bytes:
    filler = (CANARY + " ") * (size // (len(CANARY) + 1))
    return json.dumps({"model": "no-such-model", "messages": [{"role": "user", "content": filler}]}).encode()


def slow_post(app: LiveApp, key: str, body: bytes, *, chunked: bool, piece: int = 32 * 1024,
              pause: float = 0.02) -> tuple[int, bytes]:
    """POST /v1/chat/completions, sending the body in pieces with pauses; the status and response."""
    head = ["POST /v1/chat/completions HTTP/1.1", f"Host: 127.0.0.1:{app.ports[0]}",
            f"Authorization: Bearer {key}", "Content-Type: application/json", "Connection: close"]
    head.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}")
    with socket.create_connection(("127.0.0.1", app.ports[0]), timeout=60) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        for start in range(0, len(body), piece):
            part = body[start:start + piece]
            sock.sendall(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
            time.sleep(pause)
        if chunked:
            sock.sendall(b"0\r\n\r\n")
        response: list[bytes] = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            response.append(data)
    raw = b"".join(response)
    status = int(raw.split(b" ", 2)[1])
    return status, raw.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_1mb_prompt_sent_slowly_is_never_in_a_file(app: LiveApp, key: str, chunked: bool) -> None:
    body = prompt_body(1024 * 1024)
    with FileWatcher(app.procs[0].pid, str(app.dir)) as watcher:
        status, answer = slow_post(app, key, body, chunked=chunked)
    assert watcher.samples > 100  # it really watched through the upload
    assert not watcher.seen, f"daphne held a file during the upload: {sorted(watcher.seen)}"
    # The app got the whole body (parsed it and looked the model up): not a truncated one.
    assert status == 404 and b"no-such-model" in answer, answer[:300]
    assert CANARY.encode() not in answer


def test_a_chunked_body_over_the_limit_gets_413_and_no_file(app: LiveApp, key: str) -> None:
    body = prompt_body(17 * 1024 * 1024)  # GATEWAY_MAX_BODY is 16 MiB
    with FileWatcher(app.procs[0].pid, str(app.dir)) as watcher:
        status, answer = slow_post(app, key, body, chunked=True, piece=1024 * 1024, pause=0.0)
    assert not watcher.seen, f"daphne held a file during the upload: {sorted(watcher.seen)}"
    assert status == 413, answer[:300]
    assert json.loads(answer)["error"]["code"] == "payload_too_large"
