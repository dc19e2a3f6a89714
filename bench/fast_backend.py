#!/usr/bin/env python3
"""A fast stand-in for vLLM's OpenAI server (standard library, asyncio), for benchmarks only.

Answers /health, /v1/models and /v1/chat/completions (plain, or SSE when the body asks to
stream) over HTTP/1.1 keep-alive, at tens of thousands of requests per second, so that what
a benchmark measures is the path in front of it. Checks the bearer token in VLLM_API_KEY
like vLLM's --api-key. Takes the same arguments as the test stub (--host --port --model).
"""

import argparse
import asyncio
import json
import os
import time

WORDS = ["The", " capital", " of", " France", " is", " Paris", "."]


def reply(model: str) -> bytes:
    return json.dumps({"id": "chatcmpl-fast", "object": "chat.completion", "created": int(time.time()),
                       "model": model, "choices": [{"index": 0, "finish_reason": "stop", "message": {
                           "role": "assistant", "content": "".join(WORDS)}}],
                       "usage": {"prompt_tokens": 7, "completion_tokens": 7, "total_tokens": 14}}).encode()


def chunks(model: str, usage: bool) -> bytes:
    out = []
    for word in WORDS:
        out.append({"id": "chatcmpl-fast", "object": "chat.completion.chunk", "created": 0, "model": model,
                    "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]})
    if usage:
        out.append({"id": "chatcmpl-fast", "object": "chat.completion.chunk", "created": 0, "model": model,
                    "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 7, "total_tokens": 14}})
    body = b"".join(b"data: " + json.dumps(o).encode() + b"\n\n" for o in out) + b"data: [DONE]\n\n"
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


def response(status: str, content_type: bytes, body: bytes) -> bytes:
    return (b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: " + content_type + b"\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--scheduling-policy", default="fcfs")  # the job template passes it; no scheduler here
    args = parser.parse_args()
    token = os.environ.get("VLLM_API_KEY", "")
    models = json.dumps({"object": "list", "data": [{"id": args.model, "object": "model", "owned_by": "bench",
                                                     "max_model_len": 2048}]}).encode()
    plain = reply(args.model)
    unauthorized = response("401 Unauthorized", b"application/json", b'{"error": "Unauthorized"}')

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                method, path = lines[0].split(b" ")[:2]
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
                if path == b"/health":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                elif token and headers.get(b"authorization", b"") != b"Bearer " + token.encode():
                    writer.write(unauthorized)
                elif path == b"/v1/models":
                    writer.write(response("200 OK", b"application/json", models))
                elif method == b"POST" and path in (b"/v1/chat/completions", b"/v1/completions"):
                    req = json.loads(body)
                    if req.get("stream"):
                        usage = bool((req.get("stream_options") or {}).get("include_usage"))
                        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                     b"Transfer-Encoding: chunked\r\n\r\n" + chunks(args.model, usage))
                    else:
                        writer.write(response("200 OK", b"application/json", plain))
                else:
                    writer.write(response("404 Not Found", b"application/json", b'{"error": "not found"}'))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            writer.close()

    async def serve() -> None:
        server = await asyncio.start_server(handle, args.host, args.port, backlog=1024)
        print(f"fast backend: serving {args.model} on port {args.port}", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
