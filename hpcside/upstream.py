"""A small asyncio HTTP/1.1 client for the router's hop to vLLM. Standard library only.

Keep-alive pool per instance, streaming bodies (Content-Length, chunked, or until close),
and a clear difference between "could not connect, nothing was sent" (safe to retry on
another instance) and failures after the request went out.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import AsyncIterator, Dict, List, Optional, Tuple

MAX_HEAD = 64 * 1024
IDLE_PER_HOST = 32


class ConnectFailed(Exception):
    """Nothing reached the instance: the request may go to another one."""


class UpstreamFailed(Exception):
    """The instance failed after the request was sent (or sent a malformed response)."""


@dataclass
class Response:
    status: int
    headers: List[Tuple[str, str]]
    body: AsyncIterator[bytes]
    _conn: Optional[Tuple[asyncio.StreamReader, asyncio.StreamWriter]] = field(default=None, repr=False)

    def header(self, name: str) -> Optional[str]:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


class Pool:
    def __init__(self, connect_timeout: float = 2.0, read_timeout: float = 600.0) -> None:
        self.idle: Dict[Tuple[str, int], List[Tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {}
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout

    async def _connect(self, host: str, port: int) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        idle = self.idle.get((host, port))
        while idle:
            reader, writer = idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer, True
            writer.close()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), self.connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise ConnectFailed(f"cannot connect to {host}:{port}: {type(exc).__name__}") from None
        return reader, writer, False

    def _release(self, host: str, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        idle = self.idle.setdefault((host, port), [])
        if len(idle) < IDLE_PER_HOST and not writer.is_closing():
            idle.append((reader, writer))
        else:
            writer.close()

    async def request(self, host: str, port: int, method: str, path: str, headers: Dict[str, str],
                      body: bytes) -> Response:
        """Send the request and read the response head; the body streams from ``Response.body``."""
        head = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        raw = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        for attempt in range(2):
            reader, writer, reused = await self._connect(host, port)
            try:
                writer.write(raw)
                await writer.drain()
                status_line = await asyncio.wait_for(reader.readline(), self.read_timeout)
            except (OSError, asyncio.TimeoutError):
                writer.close()
                if reused and attempt == 0:
                    continue  # a pooled connection the server had closed: try a fresh one
                raise UpstreamFailed("the instance closed the connection") from None
            except asyncio.CancelledError:
                writer.close()
                raise
            if not status_line:
                writer.close()
                if reused and attempt == 0:
                    continue
                raise UpstreamFailed("the instance closed the connection without answering")
            try:
                return await self._read_head(host, port, status_line, reader, writer, method)
            except BaseException:
                writer.close()
                raise
        raise UpstreamFailed("unreachable")  # pragma: no cover - the loop always returns or raises

    async def _read_head(self, host: str, port: int, status_line: bytes, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter, method: str) -> Response:
        parts = status_line.decode("latin-1").split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise UpstreamFailed("malformed status line from the instance")
        status = int(parts[1])
        headers: List[Tuple[str, str]] = []
        size = 0
        while True:
            line = await asyncio.wait_for(reader.readline(), self.read_timeout)
            size += len(line)
            if size > MAX_HEAD or not line:
                raise UpstreamFailed("malformed response head from the instance")
            if line in (b"\r\n", b"\n"):
                break
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep:
                raise UpstreamFailed("malformed header from the instance")
            headers.append((name.strip(), value.strip()))
        response = Response(status, headers, _empty())
        te = (response.header("transfer-encoding") or "").lower()
        length = response.header("content-length")
        keep = (response.header("connection") or "").lower() != "close"
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            response.body = self._fixed(host, port, reader, writer, 0, keep)
        elif "chunked" in te:
            response.body = self._chunked(host, port, reader, writer, keep)
        elif length is not None and length.isdigit():
            response.body = self._fixed(host, port, reader, writer, int(length), keep)
        else:
            response.body = self._until_close(reader, writer)
        return response

    async def _fixed(self, host: str, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     remaining: int, keep: bool) -> AsyncIterator[bytes]:
        done = False
        try:
            while remaining > 0:
                chunk = await asyncio.wait_for(reader.read(min(remaining, 65536)), self.read_timeout)
                if not chunk:
                    raise UpstreamFailed("the instance closed the connection mid-response")
                remaining -= len(chunk)
                yield chunk
            done = True
        finally:
            if done and keep:
                self._release(host, port, reader, writer)
            else:
                writer.close()

    async def _chunked(self, host: str, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       keep: bool) -> AsyncIterator[bytes]:
        done = False
        try:
            while True:
                line = await asyncio.wait_for(reader.readline(), self.read_timeout)
                size_text = line.split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise UpstreamFailed("malformed chunk from the instance") from None
                if size == 0:
                    while True:  # trailers
                        trailer = await asyncio.wait_for(reader.readline(), self.read_timeout)
                        if trailer in (b"\r\n", b"\n", b""):
                            break
                    done = True
                    return
                try:
                    data = await asyncio.wait_for(reader.readexactly(size + 2), self.read_timeout)
                except asyncio.IncompleteReadError:
                    raise UpstreamFailed("the instance closed the connection mid-response") from None
                yield data[:-2]
        finally:
            if done and keep:
                self._release(host, port, reader, writer)
            else:
                writer.close()

    async def _until_close(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> AsyncIterator[bytes]:
        try:
            while True:
                chunk = await asyncio.wait_for(reader.read(65536), self.read_timeout)
                if not chunk:
                    return
                yield chunk
        finally:
            writer.close()

    def close(self) -> None:
        for conns in self.idle.values():
            for _, writer in conns:
                writer.close()
        self.idle.clear()


async def _empty() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover - makes this an async generator
