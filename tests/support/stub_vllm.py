#!/usr/bin/env python3
"""A stand-in for vLLM's OpenAI server, standard library only, run inside test jobs.

It checks the instance token (env VLLM_API_KEY) like vLLM's --api-key, answers /health,
/v1/models and /v1/chat/completions (plain and SSE streaming), and never logs a body.
STUB_MODE selects a failure: ok (default), never-ready (/health 503), crash (exit at
once), slow:SECONDS (listen only after a delay, like a model loading).

Priority like vLLM's: ``--scheduling-policy priority`` lets a request carry a nonzero integer
``priority`` (lower = earlier); under ``fcfs`` (the default) such a request is refused with 400,
as vLLM's engine did up to its v0 ("Got priority ... but Priority scheduling is not enabled"; the
0.32 protocol still documents the error, its v1 engine ignores the value). ``--max-num-seqs N``
lets N requests generate at once; the others wait in priority order, as in vLLM's priority
queue (0, the default: no limit). /stub/stats lists each admitted request's x-request-id and
priority in the order they started generating.
"""

import argparse
import hashlib
import heapq
import itertools
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Server(ThreadingHTTPServer):
    request_queue_size = 1024  # like uvicorn's backlog; Python's default of 5 drops SYNs under load
    daemon_threads = True


class Seats:
    """At most ``limit`` requests generate at once (0: no limit); the rest wait, lowest priority
    first, then in arrival order."""

    def __init__(self, limit):
        self.limit, self.busy, self.waiting = limit, 0, []
        self.cond = threading.Condition()
        self.order = itertools.count()

    def take(self, priority):
        with self.cond:
            if not self.limit:
                return
            me = (priority, next(self.order))
            heapq.heappush(self.waiting, me)
            while self.busy >= self.limit or self.waiting[0] != me:
                self.cond.wait()
            heapq.heappop(self.waiting)
            self.busy += 1
            self.cond.notify_all()

    def give(self):
        with self.cond:
            if self.limit:
                self.busy -= 1
                self.cond.notify_all()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "stub-vllm"

    def log_message(self, *args):  # no access log: paths only, but keep job output empty
        pass

    def _json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self):
        if self.headers.get("Authorization") == "Bearer " + os.environ.get("VLLM_API_KEY", ""):
            return True
        self._json(401, {"error": "Unauthorized"})
        return False

    def do_GET(self):
        if self.path == "/stub/stats":  # for the tests only: what the stub saw
            self._json(200, {"cancelled": self.server.cancelled, "requests": self.server.requests,
                             "last_headers": self.server.last_headers,
                             "last_body_sha256": self.server.last_body_sha256,
                             "started": self.server.started})
        elif self.path == "/health":
            mode = os.environ.get("STUB_MODE", "ok")
            self.send_response(503 if mode == "never-ready" else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/v1/models":
            if self._authorized():
                self._json(200, {"object": "list", "data": [
                    {"id": self.server.model, "object": "model", "owned_by": "vllm", "max_model_len": 2048}]})
        else:
            self._json(404, {"error": "not found"})

    def _usage(self, n):
        return {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        self.server.requests += 1
        self.server.last_headers = {k.lower(): v for k, v in self.headers.items()}
        self.server.last_body_sha256 = hashlib.sha256(raw).hexdigest()
        if not self._authorized():
            return
        if self.path not in ("/v1/chat/completions", "/v1/completions"):
            self._json(404, {"error": "not found"})
            return
        try:
            req = json.loads(raw)
        except ValueError:
            self._json(400, {"error": {"message": "bad json", "type": "BadRequestError", "code": 400}})
            return
        priority = req.get("priority", 0)
        if not isinstance(priority, int) or isinstance(priority, bool):
            self._json(400, {"error": {"message": "priority must be an integer", "type": "BadRequestError",
                                       "param": "priority", "code": 400}})
            return
        if priority and self.server.policy != "priority":
            self._json(400, {"error": {"message": f"Got priority {priority} but Priority scheduling is not enabled.",
                                       "type": "BadRequestError", "param": "priority", "code": 400}})
            return
        self.server.seats.take(priority if self.server.policy == "priority" else 0)
        try:
            self.server.started.append([self.headers.get("x-request-id", ""), priority])
            del self.server.started[:-1000]  # the recent ones are enough for a test
            self._answer(req)
        finally:
            self.server.seats.give()

    def _answer(self, req):
        if req.get("stub_status"):  # an upstream error, as vLLM words them
            status = int(req["stub_status"])
            body = json.dumps({"error": {"message": f"stub error {status}", "type": "BadRequestError",
                                         "param": "stub_status", "code": status}}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if status == 429:
                self.send_header("Retry-After", "7")
            self.end_headers()
            self.wfile.write(body)
            return
        words = ["The", " capital", " of", " France", " is", " Paris", "."]
        delay = float(req.get("stub_delay", 0))
        repeat = int(req.get("stub_repeat", 1))
        # The browser tests cannot add fields: they steer the stub with words in the prompt.
        messages = req.get("messages") or [{}]
        last = str(messages[-1].get("content", "")) if isinstance(messages[-1], dict) else ""
        if "stub:xss" in last:
            words = ["Look: <img src=x onerror=\"window.__pwned=1\"> ", "[click me](javascript:window.__pwned=2)",
                     " <script>window.__pwned=3</script> ", "![pic](http://198.51.100.7/track.png) done."]
        elif "stub:rich" in last:
            words = ["```python\nprint('hello')\n```\n\n", "Energy: $E=mc^2$.", "\n\n$$\\int_0^1 x\\,dx$$\n"]
        elif "stub:slow" in last:
            delay, repeat = 0.2, 50
        # Greedy decoding continues a partial assistant message (vLLM's continue_final_message) or a
        # completion prompt where it stopped: the rest of the same words.
        done_text = ""
        if req.get("continue_final_message") and isinstance(messages[-1], dict) \
                and messages[-1].get("role") == "assistant":
            done_text = str(messages[-1].get("content") or "")
        elif self.path == "/v1/completions":
            prompt = req.get("prompt")
            done_text = str(prompt[0] if isinstance(prompt, list) and prompt else prompt or "")
        words = words * repeat
        skip = _already(words, done_text)
        words = words[skip:]
        prompt_tokens = 7 + skip
        chat = self.path == "/v1/chat/completions"
        created = int(time.time())
        if not req.get("stream"):
            time.sleep(delay * len(words))
            self._json(200, {"id": "chatcmpl-stub", "object": "chat.completion", "created": created,
                             "model": req.get("model"), "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "".join(words)}}],
                             "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
                                       "total_tokens": prompt_tokens + len(words)}})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        stream_id = f"chatcmpl-{os.getpid()}-{self.server.requests}" if chat else f"cmpl-{os.getpid()}"

        def chunk(obj):
            data = ("data: " + (obj if isinstance(obj, str) else json.dumps(obj)) + "\n\n").encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def choice(text, finish):
            if chat:
                return {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        base = {"id": stream_id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": req.get("model")}
        try:
            if chat:  # vLLM's first event: the role, no content
                chunk({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]})
            sent = words
            for i, word in enumerate(sent):
                chunk({**base, "choices": [choice(word, "stop" if i == len(sent) - 1 else None)]})
                time.sleep(delay)
            if (req.get("stream_options") or {}).get("include_usage"):
                chunk({**base, "choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                                        "completion_tokens": len(sent),
                                                        "total_tokens": prompt_tokens + len(sent)}})
            chunk("[DONE]")
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.server.cancelled += 1


def _already(words, text):
    """How many of ``words`` the end of ``text`` already holds."""
    best, acc = 0, ""
    for i, word in enumerate(words):
        acc += word
        if text.endswith(acc):
            best = i + 1
    return best


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--scheduling-policy", choices=("fcfs", "priority"), default="fcfs")
    parser.add_argument("--max-num-seqs", type=int, default=0)
    args = parser.parse_args()
    mode = os.environ.get("STUB_MODE", "ok")
    if mode == "crash":
        print("stub: crashing on purpose", file=sys.stderr)
        sys.exit(1)
    if mode.startswith("slow:"):
        time.sleep(float(mode.split(":", 1)[1]))
    server = Server((args.host, args.port), Handler)
    server.model = args.model
    server.cancelled = 0
    server.requests = 0
    server.last_headers = {}
    server.last_body_sha256 = ""
    server.policy = args.scheduling_policy
    server.seats = Seats(args.max_num_seqs)
    server.started = []
    print(f"stub: serving {args.model} on port {args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
