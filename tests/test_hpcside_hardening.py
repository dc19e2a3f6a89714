"""One key holder must not be able to hurt the login node: the REAL session server (the process the
ForceCommand starts) under hostile frames: bodies that never end, too many bytes, JSON nested
thousands deep, header values with a newline, and requests held through a cold start that must
not hammer the scheduler.
"""

from __future__ import annotations

import json
import math
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpcside import protocol as p
from hpcside.state import ensure_dirs, write_json

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
# A template whose job ends at once: a held request stays held (the model never gets ready) and no
# process is left behind.
NEVER_READY = "#!/bin/bash\n{{ sbatch_header }}\nexit 0\n"


def write_config(tmp: Path, **settings: str) -> Path:
    (tmp / "never.sh").write_text(NEVER_READY)
    values = {"state_dir": str(tmp / "state"), "launcher": "local", "min_interval": "1h",
              "backoff_base": "1h"}
    values.update(settings)
    path = tmp / "services.ini"
    path.write_text("[hpcside]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()) +
                    f"\n[service:m]\ntemplate = {tmp / 'never.sh'}\nmodel_path = /nonexistent\n")
    return path


class ServeProcess:
    """``python -m hpcside forcecommand`` with SSH_ORIGINAL_COMMAND=serve, spoken to over its pipes."""

    def __init__(self, config: Path) -> None:
        env = {"PATH": "/usr/bin:/bin", "SSH_ORIGINAL_COMMAND": "serve"}
        self.proc = subprocess.Popen([sys.executable, "-S", "-m", "hpcside", "--config", str(config), "forcecommand"],
                                     cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.frames: queue.Queue[p.Frame | None] = queue.Queue()
        self.seen: list[p.Frame] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.send(p.hello_client("test"))
        assert self.next().type == p.HELLO

    def _read(self) -> None:
        assert self.proc.stdout is not None
        decoder = p.Decoder()
        while True:
            data = self.proc.stdout.read1(65536)  # type: ignore[attr-defined]
            if not data:
                self.frames.put(None)
                return
            for frame in decoder.feed(data):
                self.frames.put(frame)

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def next(self, timeout: float = 15) -> p.Frame:
        frame = self.frames.get(timeout=timeout)
        assert frame is not None, "the session ended"
        self.seen.append(frame)
        return frame

    def until(self, stream: int, types: tuple, timeout: float = 15) -> p.Frame:  # type: ignore[type-arg]
        """The next frame of one of ``types`` on ``stream`` (frames of other streams are kept in ``seen``)."""
        for frame in self.seen:
            if frame.stream == stream and frame.type in types:
                self.seen.remove(frame)
                return frame
        deadline = time.monotonic() + timeout
        while True:
            frame = self.next(max(0.01, deadline - time.monotonic()))
            if frame.stream == stream and frame.type in types:
                self.seen.remove(frame)
                return frame

    def ping(self) -> None:
        """A round trip: every frame sent before it has been handled."""
        self.send(p.encode_json(p.PING, 0, {"t": 1}))
        self.until(0, (p.PONG,))

    def errors(self, stream: int) -> list[dict]:  # type: ignore[type-arg]
        return [f.json() for f in self.seen if f.stream == stream and f.type == p.ERROR]

    def request(self, sid: int, head: dict, body: bytes = b"") -> None:  # type: ignore[type-arg]
        self.send(p.encode_json(p.REQUEST, sid, head) + p.encode_data(sid, body) + p.encode(p.END, sid))

    def health(self, sid: int) -> int:
        """The session still serves: its local /health answers."""
        self.request(sid, {"method": "GET", "path": "/health", "model": "", "headers": {}})
        return int(self.until(sid, (p.RESPONSE, p.ERROR)).json()["status"])

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def close(self) -> bytes:
        assert self.proc.stdin is not None and self.proc.stderr is not None
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        self.proc.wait(timeout=15)
        return self.proc.stderr.read()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    made: list[ServeProcess] = []

    def start(**settings: str) -> ServeProcess:
        s = ServeProcess(write_config(tmp_path, **settings))
        made.append(s)
        return s

    yield start
    for s in made:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


def chat_head(model: str = "m", headers: dict[str, str] | None = None) -> dict:  # type: ignore[type-arg]
    return {"method": "POST", "path": "/v1/chat/completions", "model": model,
            "headers": headers if headers is not None else {"content-type": "application/json"}}


# -- 12: memory bounds ----------------------------------------------------------------------


def test_bodies_that_never_end_are_bounded_per_session_and_time_out(serve) -> None:  # type: ignore[no-untyped-def]
    """The attack of issue 12: six streams of 16 MiB without END held ~100 MB with no timeout."""
    s = serve(body_timeout="3s")  # default session_body_budget: 64 MiB
    before = s.rss()
    chunk = b"x" * p.MAX_FRAME
    streams = [1, 3, 5, 7, 9, 11]
    for sid in streams:
        s.send(p.encode_json(p.REQUEST, sid, chat_head()))
        for _ in range(p.MAX_REQUEST_BODY // p.MAX_FRAME):
            s.send(p.encode(p.DATA, sid, chunk))
    s.ping()
    held = s.rss() - before
    # Four bodies fill the budget; the fifth and sixth are refused as soon as they would exceed it.
    refused = {sid: s.errors(sid) for sid in streams if s.errors(sid)}
    assert sorted(refused) == [9, 11], refused
    assert all(e[0]["status"] == 429 and e[0]["code"] == "body_budget_exceeded" and e[0]["retry_after"]
               for e in refused.values())
    assert held < 80 * MiB, f"the session holds {held / MiB:.0f} MiB"

    # No END within body_timeout: each of the four is refused and its memory released.
    for sid in (1, 3, 5, 7):
        error = s.until(sid, (p.ERROR,), timeout=10).json()
        assert error["status"] == 408 and error["code"] == "body_timeout"
    assert s.rss() - before < 24 * MiB
    # The session goes on: a late END is ignored, new requests are served.
    s.send(p.encode(p.END, 1))
    assert s.health(13) == 200
    assert s.close() == b""


def test_one_body_larger_than_the_session_budget_is_too_large(serve) -> None:  # type: ignore[no-untyped-def]
    s = serve(session_body_budget="2M")
    s.send(p.encode_json(p.REQUEST, 1, chat_head()))
    for _ in range(3 * MiB // p.MAX_FRAME):
        s.send(p.encode(p.DATA, 1, b"y" * p.MAX_FRAME))
    s.send(p.encode(p.END, 1))
    error = s.until(1, (p.ERROR,)).json()
    assert error["status"] == 413 and error["code"] == "payload_too_large"
    assert s.health(3) == 200


def test_bodies_held_through_a_cold_start_are_bounded(serve) -> None:  # type: ignore[no-untyped-def]
    s = serve(held_body_budget="1M", hold_timeout="4s")
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "z" * 700_000}]}).encode()
    s.request(1, chat_head(), body)
    assert s.until(1, (p.PROGRESS,)).json()["stage"]  # held
    s.request(3, chat_head(), body)
    error = s.until(3, (p.ERROR,)).json()
    assert error["status"] == 503 and error["code"] == "hold_full" and error["retry_after"]
    # A small request still fits beside the first, and the first is held until hold_timeout.
    s.request(5, chat_head(), b"{}")
    assert s.until(5, (p.PROGRESS,)).json()["stage"]
    assert s.until(1, (p.ERROR,), timeout=15).json()["code"] == "model_unavailable"
    assert s.until(5, (p.ERROR,), timeout=15).json()["code"] == "model_unavailable"
    # Released: the next big one may be held again.
    s.request(7, chat_head(), body)
    assert s.until(7, (p.PROGRESS,)).json()["stage"]
    assert s.health(9) == 200


# -- 13: deeply nested JSON ---------------------------------------------------------------------


@pytest.mark.parametrize("depth", [40, 30_000])
def test_a_deeply_nested_request_head_is_refused_and_the_session_goes_on(serve, depth: int) -> None:  # type: ignore[no-untyped-def]
    s = serve()
    nested = b'{"method": "GET", "path": "/health", "model": "", "x": ' + b"[" * depth + b"]" * depth + b"}"
    assert len(nested) <= p.MAX_JSON
    s.send(p.encode(p.REQUEST, 1, nested) + p.encode(p.END, 1))
    error = s.until(1, (p.ERROR,)).json()
    assert error["status"] == 400 and error["code"] == "bad_request" and "deep" in error["message"]
    assert s.health(3) == 200
    assert s.close() == b""


def test_a_deeply_nested_session_frame_ends_the_session_cleanly(serve) -> None:  # type: ignore[no-untyped-def]
    s = serve()
    s.send(p.encode(p.PING, 0, b'{"t": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"))
    error = s.until(0, (p.ERROR,)).json()
    assert error["code"] == "protocol_error" and "deep" in error["message"]
    assert s.close() == b""  # no traceback
    assert s.proc.returncode == 1


def test_the_shared_codec_refuses_deep_json_on_both_ends() -> None:
    ok = {"a": [[{"b": [1]}]]}
    assert p.decode_json(json.dumps(ok).encode()) == ok
    for depth in (p.MAX_JSON_DEPTH + 1, 5000):
        with pytest.raises(p.TooDeep):
            p.decode_json(b'{"a": ' + b"[" * depth + b"]" * depth + b"}")
    # A string full of brackets is not nesting.
    text = {"s": "[" * 1000 + "{" * 1000}
    assert p.decode_json(json.dumps(text).encode()) == text
    # hpcbridge decodes with this very module (one codec for both ends).
    assert "from hpcside import protocol" in (ROOT / "hpcbridge" / "client.py").read_text()


# -- 14: a header value with a newline never reaches the instance -------------------------------


class CaptureUpstream:
    """A real TCP server standing in for an instance: records each request head, answers 200."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.heads: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        data = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in data:
                    more = conn.recv(65536)
                    if not more:
                        return
                    data += more
                head, _, data = data.partition(b"\r\n\r\n")
                self.heads.append(head)
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(data) < length:
                    data += conn.recv(65536)
                data = data[length:]
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")


def test_a_header_value_with_a_newline_never_reaches_the_upstream_request_head(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    upstream = CaptureUpstream()
    state = tmp_path / "state"
    ensure_dirs(state)
    write_json(state / "routing.json", {"version": 1, "generated_at": time.time(), "slurm_ok": True, "models": {
        "m": [{"id": "aaaaaaaaaaaa", "url": f"http://127.0.0.1:{upstream.port}", "token": "tok", "job_id": "1"}]}})
    s = serve()
    for sid, value in ((1, "abc\n"), (3, "abc")):
        s.request(sid, chat_head(headers={"content-type": "application/json", "x-request-id": value}), b"{}")
        assert s.until(sid, (p.RESPONSE, p.ERROR)).json()["status"] == 200
    bad, good = upstream.heads
    assert b"abc\n" not in bad and b"x-request-id" not in bad.lower()
    assert all(not line.endswith(b"\n") and b"\n" not in line for line in bad.split(b"\r\n"))
    assert b"x-request-id: abc" in good.lower()


# -- 16: a held request does not hammer the scheduler --------------------------------------------


def test_a_held_request_triggers_at_most_one_reconcile_per_min_interval(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    min_interval, hold = 2.0, 5.0
    s = serve(min_interval=f"{min_interval:g}s", hold_timeout=f"{hold:g}s")
    starts: set = set()  # type: ignore[type-arg]
    stop = threading.Event()

    def watch() -> None:
        path = tmp_path / "state" / "last-reconcile"
        while not stop.is_set():
            try:
                starts.add(json.loads(path.read_text())["started_at"])
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        s.request(1, chat_head(), b"{}")
        error = s.until(1, (p.ERROR,), timeout=hold + 10).json()
    finally:
        stop.set()
        watcher.join()
    assert error["code"] == "model_unavailable"
    # The first at once, then at most one per min_interval (not one every HOLD_POLL = 0.5 s).
    assert 1 <= len(starts) <= 1 + math.ceil(hold / min_interval), sorted(starts)
