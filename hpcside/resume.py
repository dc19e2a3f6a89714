"""Continuing a cut stream on another instance: what the client was sent, and the request that goes on.

The router forwards a streamed reply event by event through a ``Transcript``. It keeps what
a continuation needs and nothing more: the stream's id and creation time, the text of the
one choice sent so far (in memory only, for as long as the stream runs), how many content
events carried it, and whether the reply had already finished. When the instance dies
mid-stream, ``continuation()`` builds the same request with the text already sent as a
partial assistant message (vLLM's ``continue_final_message``; for completions, prompt plus
text), and the events of the new reply are rewritten to look like the rest of the first
(same id and created, no second role delta, usage summed). Pure: no I/O, no clock.

What cannot be continued (several choices, tool calls, structured output, token-id prompts)
says so, and the router ends the stream with one error event and ``[DONE]``.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

from .sse import split_events

DONE = b"data: [DONE]\n\n"
# Fields that constrain generation from its first token on: a continuation would restart them.
_STRUCTURED = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
               "structured_outputs", "tools", "functions")


class Transcript:
    """One SSE stream as the client receives it. ``kind`` is "chat" or "completions"."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.pending = b""
        self.id: Optional[str] = None
        self.created: Optional[int] = None
        self.parts: List[str] = []
        self.events = 0  # content events sent: vLLM sends about one token per event
        self.finished = False  # a finish_reason was sent: only usage and [DONE] may follow
        self.done = False  # [DONE] was sent
        self.why_not = ""  # set when the stream can no longer be continued
        self.continued = 0  # continuations so far: their events are rewritten
        self.tokens_before = 0  # content events sent before the current continuation

    @property
    def text(self) -> str:
        return "".join(self.parts)

    # -- forwarding --------------------------------------------------------------------

    def feed(self, data: bytes) -> bytes:
        """The complete events in ``data`` (plus what was pending), ready to send; a partial one waits."""
        blocks, self.pending = split_events(self.pending + data)
        out = []
        for block in blocks:
            sent = self._event(block)
            if sent is not None:
                out.append(sent + b"\n\n")
        return b"".join(out)

    def tail(self) -> bytes:
        """What is left when the upstream ended cleanly (an event without its blank line)."""
        rest, self.pending = self.pending, b""
        if not rest.strip():
            return b""
        sent = self._event(rest.rstrip(b"\n"))
        return b"" if sent is None else sent + b"\n\n"

    def _event(self, block: bytes) -> Optional[bytes]:
        if not block.startswith(b"data:") or b"\n" in block:
            return block  # a comment or a multi-line event: passed on untouched
        payload = block[5:].strip()
        if payload == b"[DONE]":
            self.done = True
            return block
        try:
            obj = json.loads(payload)
        except ValueError:
            self.why_not = self.why_not or "the instance sent an event that is not JSON"
            return block
        if not isinstance(obj, dict):
            return block
        if "error" in obj:
            self.why_not = self.why_not or "the instance reported an error"
            return block
        if self.id is None:
            self.id, self.created = obj.get("id"), obj.get("created")
        self._note_choices(obj)
        if not self.continued:
            return block
        return self._rewrite(obj)

    def _note_choices(self, obj: Dict[str, Any]) -> None:
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            if choice.get("index", 0) != 0:
                self.why_not = self.why_not or "a stream with several choices cannot be continued"
            if self.kind == "chat":
                delta = choice.get("delta") or {}
                text = delta.get("content") if isinstance(delta, dict) else None
                if isinstance(delta, dict) and (delta.get("tool_calls") or delta.get("function_call")):
                    self.why_not = self.why_not or "a stream with tool calls cannot be continued"
            else:
                text = choice.get("text")
            if isinstance(text, str) and text:
                self.parts.append(text)
                self.events += 1
            if choice.get("finish_reason") is not None:
                self.finished = True

    def _rewrite(self, obj: Dict[str, Any]) -> Optional[bytes]:
        """An event of a continuation, made to look like the rest of the first reply."""
        obj["id"], obj["created"] = self.id, self.created
        choices = []
        for choice in obj.get("choices") or ():
            if isinstance(choice, dict) and isinstance(choice.get("delta"), dict):
                delta = choice["delta"]
                delta.pop("role", None)  # the client had its role delta from the first reply
                if not delta.get("content") and len(delta) <= 1 and choice.get("finish_reason") is None \
                        and not choice.get("logprobs"):
                    continue  # nothing left to say
            choices.append(choice)
        usage = obj.get("usage")
        if isinstance(usage, dict):
            # The continuation's prompt held the text already sent; count that text as completion again.
            before = self.tokens_before
            prompt = max(0, int(usage.get("prompt_tokens") or 0) - before)
            completion = int(usage.get("completion_tokens") or 0) + before
            obj["usage"] = {**usage, "prompt_tokens": prompt, "completion_tokens": completion,
                            "total_tokens": prompt + completion}
        elif not choices:
            return None
        obj["choices"] = choices
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode()

    # -- after a cut -------------------------------------------------------------------

    def continuation(self, body: bytes) -> Optional[bytes]:
        """The request that goes on from what the client has; None with ``why_not`` set if it cannot."""
        if self.why_not:
            return None
        try:
            req = json.loads(body)
        except ValueError:
            self.why_not = "the request is not JSON"
            return None
        if not isinstance(req, dict):
            self.why_not = "the request is not a JSON object"
            return None
        if req.get("n") not in (None, 1) or req.get("best_of") not in (None, 1):
            self.why_not = "a request for several choices cannot be continued"
            return None
        if any(req.get(name) for name in _STRUCTURED if name != "response_format") or \
                (isinstance(req.get("response_format"), dict) and req["response_format"].get("type") != "text"):
            self.why_not = "a request with tools or structured output cannot be continued"
            return None
        text = self.text
        for name in ("max_tokens", "max_completion_tokens"):
            limit = req.get(name)
            if isinstance(limit, int) and not isinstance(limit, bool):
                left = limit - self.events
                if left <= 0:
                    self.finished = True  # the reply had used its tokens: nothing to add
                    self.why_not = "the reply had reached max_tokens"
                    return None
                req[name] = left
        if text and not self._extend(req, text):
            return None
        req.pop("echo", None)
        self.continued += 1
        self.tokens_before = self.events
        return json.dumps(req).encode()

    def _extend(self, req: Dict[str, Any], text: str) -> bool:
        if self.kind == "chat":
            messages = req.get("messages")
            if not isinstance(messages, list) or not messages:
                self.why_not = "the request has no messages"
                return False
            messages = list(messages)
            last = messages[-1]
            if req.get("continue_final_message") and isinstance(last, dict) and last.get("role") == "assistant" \
                    and isinstance(last.get("content"), str):
                messages[-1] = {**last, "content": last["content"] + text}
            else:
                messages.append({"role": "assistant", "content": text})
            req["messages"] = messages
            req["continue_final_message"] = True
            req["add_generation_prompt"] = False
            return True
        prompt = req.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            req["prompt"] = [prompt[0] + text]
        elif isinstance(prompt, str):
            req["prompt"] = prompt + text
        else:
            self.why_not = "a completion of token ids or several prompts cannot be continued"
            return False
        return True

    def ending(self, message: str) -> bytes:
        """The end of a stream that cannot go on: one OpenAI-shaped error event, then [DONE]."""
        out = b""
        if not self.finished and not self.done:
            error = {"error": {"message": message, "type": "server_error", "code": "stream_interrupted",
                               "param": None}}
            out += b"data: " + json.dumps(error).encode() + b"\n\n"
        if not self.done:
            out += DONE
            self.done = True
        return out
