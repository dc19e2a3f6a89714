"""The stream logic of /v1, pure: no I/O, no clock, no Django.

A streamed reply goes to the client event by event (``Relay``: whole events only, split by
hpcside's one SSE splitter). On the way, each event's text is counted, never kept, and the
upstream's usage is taken (``Tally``); the usage-only chunk that the gateway asked for goes to
the client only if the client asked too. What a request is charged at the end is
``charged_tokens``: the upstream's usage, or for a reply the model accepted that ended without
one (the client left, the provider sent none) an estimate from the characters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gateway.errors import upstream_error
from hpcside.sse import split_events

DONE = b"data: [DONE]\n\n"
CHARS_PER_TOKEN = 4  # the usual rule of thumb for English text and BPE tokenizers


# -- reading events --------------------------------------------------------------------------

def event_object(block: bytes) -> dict[str, Any] | None:
    """The JSON object of a ``data: {...}`` event (without its blank line); None for a comment,
    ``[DONE]``, a payload that is not a JSON object, or anything else."""
    if not block.startswith(b"data:"):
        return None
    payload = block[5:].lstrip(b" ")
    if not payload.startswith(b"{"):
        return None
    try:
        obj = json.loads(payload)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def text_size(obj: dict[str, Any]) -> int:
    """Characters of text in a streamed event (chat delta content or reasoning, completion text)."""
    size = 0
    for choice in obj.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        for piece in (choice.get("text"), *((delta.get("content"), delta.get("reasoning_content"))
                                            if isinstance(delta, dict) else ())):
            if isinstance(piece, str):
                size += len(piece)
    return size


def is_usage_only(obj: dict[str, Any]) -> bool:
    """The final chunk that ``stream_options.include_usage`` adds: usage and no choices."""
    return bool(obj.get("usage")) and not obj.get("choices")


# -- counting --------------------------------------------------------------------------------

@dataclass
class Tally:
    """What a reply told about its tokens: the upstream's usage if any, and the streamed text's
    size (events that carried text, characters). Counts only, never text."""

    usage: dict[str, Any] | None = None
    chunks: int = 0
    chars: int = 0

    def take_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.usage = usage

    def note(self, obj: dict[str, Any]) -> None:
        size = text_size(obj)
        if size:
            self.chunks += 1
            self.chars += size
        if obj.get("usage"):
            self.take_usage(obj["usage"])


def estimate_tokens(chars: int) -> int:
    return -(-chars // CHARS_PER_TOKEN)


# Tokens one request may report: more than any model's context. A larger figure is not a count.
MAX_REPORTED_TOKENS = 10_000_000


def reported_count(value: Any) -> int | None:
    """A token count from an upstream's usage: a whole number from 0 to MAX_REPORTED_TOKENS (an
    absent or null field is 0); None for anything else (negative, huge, a string, NaN, a bool)."""
    if value is None:
        return 0
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_REPORTED_TOKENS:
        return None
    return value


def charged_tokens(tally: Tally, accepted: bool, prompt_estimate: int) -> tuple[int, int]:
    """(prompt, completion) tokens to charge. The upstream's usage if it sent one that holds counts;
    else, for a reply the model accepted, the prompt's estimate and the larger of the streamed chunks
    that carried text and the streamed characters / 4; else nothing. An external provider's usage is
    a third party's word: figures that are not counts (3e9, -1, "12x") would have broken the usage
    row's column and stalled the writer, or raised here and kept the request's slot and budget hold."""
    if tally.usage is not None:
        prompt = reported_count(tally.usage.get("prompt_tokens"))
        completion = reported_count(tally.usage.get("completion_tokens"))
        if prompt is not None and completion is not None:
            return prompt, completion
    if accepted:
        return prompt_estimate, max(tally.chunks, estimate_tokens(tally.chars))
    return 0, 0


def _text_chars(value: Any) -> int:
    """Characters of prompt text in a message content, prompt or input (strings, parts, lists); a list
    of token ids counts CHARS_PER_TOKEN characters per token. Walked without recursion: a hostile
    body may nest lists a thousand deep (the model answers that with its own 400, not us with a 500)."""
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, int):
            total += CHARS_PER_TOKEN
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.append(item.get("text") or item.get("content") or "")
    return total


def _json_chars(value: Any) -> int:
    """Characters of the names and strings in a JSON value (a tool's schema, say), without recursion."""
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            total += sum(len(k) for k in item)
            stack.extend(item.values())
        elif item is not None:
            total += 1
    return total


# The parts of a chat request besides its messages that the model reads as prompt (the chat template
# renders tools and functions into it; a JSON schema for the answer guides it).
PROMPT_FIELDS = ("tools", "functions", "tool_choice", "response_format")


def prompt_estimate(data: dict[str, Any], kind: str) -> int:
    """The prompt's tokens as estimated from its text, for a request that ends without usage, and for
    the hold a budget takes on admission: message contents, and a chat's tools, functions and schema."""
    if kind == "chat":
        size = sum(_text_chars(m.get("content")) for m in data.get("messages") or [] if isinstance(m, dict))
        size += sum(_json_chars(data.get(name)) for name in PROMPT_FIELDS)
    else:
        size = _text_chars(data.get("prompt" if kind == "completions" else "input"))
    return estimate_tokens(size)


def usage_in_body(body: bytes) -> Any:
    """The ``usage`` of a whole (not streamed) JSON reply, or None."""
    try:
        return json.loads(body).get("usage")
    except (ValueError, AttributeError):
        return None


# -- relaying --------------------------------------------------------------------------------

class Relay:
    """One upstream SSE stream as the client receives it: whole events as they complete (a partial
    one waits for its end), every event counted into ``tally``, and the usage-only chunk dropped
    unless the client asked for usage (``wants_usage``). ``done`` once ``[DONE]`` has been handed on:
    the answer is whole, and a client that hangs up after it (the openai client stops reading there)
    has not cut it short."""

    def __init__(self, wants_usage: bool) -> None:
        self.wants_usage = wants_usage
        self.tally = Tally()
        self.pending = b""
        self.done = False

    def feed(self, data: bytes) -> bytes:
        """The complete events in ``data`` (plus what was pending), ready to send."""
        blocks, self.pending = split_events(self.pending + data)
        out: list[bytes] = []
        for block in blocks:
            obj = event_object(block)
            if obj is not None:
                self.tally.note(obj)
                if not self.wants_usage and is_usage_only(obj):
                    continue
            elif block.startswith(b"data:") and block[5:].strip() == b"[DONE]":
                self.done = True
            out.append(block + b"\n\n")
        return b"".join(out)

    def tail(self) -> bytes:
        """What is left when the upstream ended: passed on as it is."""
        rest, self.pending = self.pending, b""
        return rest


# -- endings ---------------------------------------------------------------------------------

def error_object(body: bytes, status: int = 502) -> Any:
    """An upstream's error reply as the object to send, in OpenAI's shape (gateway.errors.upstream_error)."""
    return upstream_error(status, body)


def error_ending(error: Any) -> bytes:
    """The end of a stream that failed: one event with the error, then ``[DONE]``."""
    return b"data: " + json.dumps(error).encode() + b"\n\n" + DONE


def progress_comment(stage: str, message: str, elapsed: float, staff: bool) -> bytes:
    """A cold start's progress as an SSE comment (OpenAI clients ignore comments). The message names
    nodes and Slurm's reasons: staff see it; everybody else sees the stage word only."""
    text = (message or stage) if staff else (stage or "waiting")
    return f": {' '.join(text.split())} ({elapsed:.0f}s)\n\n".encode()
