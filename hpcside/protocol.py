"""The session protocol between hpcbridge (web side) and ``serve`` (login node).

One implementation of the codec for both ends (the web side imports this module).
Standard library only. Specification: docs/protocol.md.

A frame is ``length:u32 | type:u8 | stream:u32 | payload`` (big-endian), where
``length`` counts the type, stream and payload bytes. Control payloads are JSON objects;
DATA payloads are raw bytes. Frames above MAX_FRAME, unknown types or malformed JSON are
protocol errors: the receiver sends an ERROR frame on stream 0 and closes the session.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

PROTOCOL = "chatai-pipe"
VERSION = 1
MAX_FRAME = 256 * 1024  # payload bytes per frame; a body is split across DATA frames
MAX_REQUEST_BODY = 16 * 1024 * 1024
MAX_JSON = 64 * 1024  # control frames are small
MAX_JSON_DEPTH = 32  # ours nest 3 deep; deeper ones are refused before any code walks them
MAX_STREAM_ID = 2**31 - 1
HEADER = struct.Struct(">IBI")

# Types. Client -> server: HELLO REQUEST DATA END CANCEL PING.
# Server -> client: HELLO RESPONSE PROGRESS DATA END ERROR PONG.
HELLO, REQUEST, RESPONSE, DATA, END, CANCEL, ERROR, PROGRESS, PING, PONG = range(1, 11)
NAMES = {HELLO: "HELLO", REQUEST: "REQUEST", RESPONSE: "RESPONSE", DATA: "DATA", END: "END",
         CANCEL: "CANCEL", ERROR: "ERROR", PROGRESS: "PROGRESS", PING: "PING", PONG: "PONG"}
JSON_TYPES = frozenset({HELLO, REQUEST, RESPONSE, ERROR, PROGRESS, PING, PONG})


class ProtocolError(Exception):
    """The peer broke the protocol; the session must end."""


class TooDeep(ProtocolError):
    """A control payload nests deeper than MAX_JSON_DEPTH.

    On a request stream the receiver refuses that stream only (ERROR 400) and the session goes
    on; on stream 0 it is a protocol error like any other malformed control frame.
    """


@dataclass(frozen=True)
class Frame:
    type: int
    stream: int
    payload: bytes = b""

    def json(self) -> Dict[str, Any]:
        return decode_json(self.payload)

    def __repr__(self) -> str:  # never prints payload bytes: they may be user content
        return f"Frame({NAMES.get(self.type, self.type)}, stream={self.stream}, {len(self.payload)} bytes)"


def encode(type_: int, stream: int, payload: bytes = b"") -> bytes:
    if type_ not in NAMES:
        raise ValueError(f"unknown frame type {type_}")
    if not 0 <= stream <= MAX_STREAM_ID:
        raise ValueError("stream id out of range")
    if len(payload) > MAX_FRAME:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_FRAME}")
    return HEADER.pack(len(payload) + 5, type_, stream) + payload


def encode_json(type_: int, stream: int, obj: Dict[str, Any]) -> bytes:
    return encode(type_, stream, json.dumps(obj, separators=(",", ":")).encode())


def encode_data(stream: int, data: bytes) -> bytes:
    """DATA frames for any amount of bytes (split at MAX_FRAME)."""
    if len(data) <= MAX_FRAME:
        return encode(DATA, stream, data)
    return b"".join(encode(DATA, stream, data[i:i + MAX_FRAME]) for i in range(0, len(data), MAX_FRAME))


def decode_json(payload: bytes) -> Dict[str, Any]:
    if len(payload) > MAX_JSON:
        raise ProtocolError("control frame too large")
    try:
        obj = json.loads(payload.decode("utf-8"))
    except RecursionError:  # thousands of brackets: the parser itself gives up
        raise TooDeep(f"control frame nests deeper than {MAX_JSON_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("control frame is not JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("control frame is not a JSON object")
    # Counting brackets is C speed; only a payload with many of them is walked.
    if payload.count(b"[") + payload.count(b"{") > MAX_JSON_DEPTH and _depth(obj) > MAX_JSON_DEPTH:
        raise TooDeep(f"control frame nests deeper than {MAX_JSON_DEPTH} levels")
    return obj


def _depth(obj: Any) -> int:
    """How deep lists and objects nest in ``obj``, without recursion (stops past the limit)."""
    deepest = 0
    todo = [(obj, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            break
        todo.extend((child, depth + 1) for child in children)
    return deepest


class Decoder:
    """Incremental decoder: ``feed(bytes)`` returns the complete frames so far.

    Memory is bounded by one frame (MAX_FRAME + header); anything malformed raises
    ProtocolError and the decoder stays broken (the session ends).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._broken: Optional[str] = None

    def feed(self, data: bytes) -> List[Frame]:
        if self._broken:
            raise ProtocolError(self._broken)
        self._buf += data
        frames = []
        while len(self._buf) >= HEADER.size:
            length, type_, stream = HEADER.unpack_from(self._buf)
            if length < 5 or length - 5 > MAX_FRAME:
                self._broken = f"frame length {length} out of bounds"
                raise ProtocolError(self._broken)
            if type_ not in NAMES:
                self._broken = f"unknown frame type {type_}"
                raise ProtocolError(self._broken)
            if stream > MAX_STREAM_ID:
                self._broken = "stream id out of range"
                raise ProtocolError(self._broken)
            if len(self._buf) < 4 + length:
                break
            payload = bytes(self._buf[HEADER.size:4 + length])
            del self._buf[:4 + length]
            frames.append(Frame(type_, stream, payload))
        return frames

    @property
    def pending(self) -> int:
        return len(self._buf)


def hello_client(name: str) -> bytes:
    return encode_json(HELLO, 0, {"protocol": PROTOCOL, "versions": [VERSION], "client": name})


def hello_server(name: str) -> bytes:
    return encode_json(HELLO, 0, {"protocol": PROTOCOL, "version": VERSION, "server": name,
                                  "max_frame": MAX_FRAME, "max_request_body": MAX_REQUEST_BODY})


def check_hello(obj: Dict[str, Any], server_side: bool) -> int:
    """The agreed version, or ProtocolError with a message both sides can show."""
    if obj.get("protocol") != PROTOCOL:
        raise ProtocolError(f"not a {PROTOCOL} peer")
    if server_side:
        versions = obj.get("versions")
        if not isinstance(versions, list) or VERSION not in versions:
            raise ProtocolError(f"no common protocol version (server speaks {VERSION})")
        return VERSION
    if obj.get("version") != VERSION:
        raise ProtocolError(f"server speaks protocol version {obj.get('version')!r}, we speak {VERSION}")
    return VERSION
