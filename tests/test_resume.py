"""The pure part of continuing a cut stream (hpcside/resume.py): events, splicing, the next request."""

from __future__ import annotations

import json
from typing import Any

from hpcside.resume import Transcript


def ev(obj: Any) -> bytes:
    return b"data: " + (obj.encode() if isinstance(obj, str) else json.dumps(obj).encode()) + b"\n\n"


def chunk(content: str, sid: str = "chatcmpl-1", created: int = 100, finish: Any = None,
          role: bool = False) -> dict[str, Any]:
    delta: dict[str, Any] = {"content": content}
    if role:
        delta["role"] = "assistant"
    return {"id": sid, "object": "chat.completion.chunk", "created": created, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def parse(raw: bytes) -> list[Any]:
    out: list[Any] = []
    for block in raw.split(b"\n\n"):
        if block.startswith(b"data: "):
            payload = block[6:]
            out.append(payload.decode() if payload == b"[DONE]" else json.loads(payload))
    return out


REQUEST = {"model": "m", "messages": [{"role": "user", "content": "capital?"}], "stream": True, "max_tokens": 10}


def test_events_are_passed_on_whole_whatever_the_byte_boundaries() -> None:
    raw = ev(chunk("", role=True)) + ev(chunk("The")) + b": a comment\n\n" + ev(chunk(" capital"))
    for size in (1, 3, 7, len(raw)):
        t = Transcript("chat")
        out = b"".join(t.feed(raw[i:i + size]) for i in range(0, len(raw), size))
        assert out == raw
        assert t.text == "The capital" and t.events == 2 and t.id == "chatcmpl-1"


def test_a_partial_event_waits_for_its_end() -> None:
    t = Transcript("chat")
    whole = ev(chunk("Paris"))
    assert t.feed(whole[:-3]) == b""
    assert t.feed(whole[-3:]) == whole


def test_the_continuation_asks_to_continue_the_partial_assistant_message() -> None:
    t = Transcript("chat")
    t.feed(ev(chunk("", role=True)) + ev(chunk("The")) + ev(chunk(" capital")))
    req = json.loads(t.continuation(json.dumps(REQUEST).encode()) or b"")
    assert req["messages"][-1] == {"role": "assistant", "content": "The capital"}
    assert req["continue_final_message"] is True and req["add_generation_prompt"] is False
    assert req["max_tokens"] == 8


def test_a_request_that_already_continued_a_message_gets_the_text_appended_to_it() -> None:
    t = Transcript("chat")
    t.feed(ev(chunk(" of")))
    body = {**REQUEST, "continue_final_message": True, "add_generation_prompt": False,
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "The capital"}]}
    req = json.loads(t.continuation(json.dumps(body).encode()) or b"")
    assert req["messages"] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "The capital of"}]


def test_the_continued_events_keep_the_first_id_and_lose_the_second_role_delta() -> None:
    t = Transcript("chat")
    t.feed(ev(chunk("", role=True)) + ev(chunk("The")))
    assert t.continuation(json.dumps(REQUEST).encode())
    out = parse(t.feed(ev(chunk("", sid="chatcmpl-2", created=200, role=True))
                       + ev(chunk(" capital", sid="chatcmpl-2", created=200, finish="stop"))
                       + ev({"id": "chatcmpl-2", "created": 200, "choices": [],
                             "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10}})
                       + ev("[DONE]")))
    assert [o["id"] for o in out[:-1]] == ["chatcmpl-1", "chatcmpl-1"]
    assert out[0]["created"] == 100 and out[0]["choices"][0]["delta"] == {"content": " capital"}
    assert out[1]["usage"] == {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10}
    assert out[-1] == "[DONE]" and t.done and t.text == "The capital"


def test_a_completion_continues_from_prompt_plus_text() -> None:
    t = Transcript("completions")
    t.feed(ev({"id": "cmpl-1", "created": 1, "choices": [{"index": 0, "text": " Paris", "finish_reason": None}]}))
    req = json.loads(t.continuation(json.dumps({"model": "m", "prompt": ["Q:"], "echo": True}).encode()) or b"")
    assert req["prompt"] == ["Q: Paris"] and "echo" not in req


def test_what_cannot_be_continued_says_why() -> None:
    cases = [({**REQUEST, "n": 2}, "several choices"),
             ({**REQUEST, "response_format": {"type": "json_object"}}, "structured output"),
             ({**REQUEST, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
             ({**REQUEST, "max_tokens": 1}, "max_tokens")]
    for body, why in cases:
        t = Transcript("chat")
        t.feed(ev(chunk("The")))
        assert t.continuation(json.dumps(body).encode()) is None
        assert why in t.why_not
    t = Transcript("completions")
    t.feed(ev({"id": "c", "choices": [{"index": 0, "text": "x", "finish_reason": None}]}))
    assert t.continuation(json.dumps({"model": "m", "prompt": [1, 2, 3]}).encode()) is None
    t = Transcript("chat")
    t.feed(ev({"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0}]}}]}))
    assert t.continuation(json.dumps(REQUEST).encode()) is None and "tool calls" in t.why_not


def test_the_ending_of_a_stream_that_cannot_go_on_is_one_error_event_and_done() -> None:
    t = Transcript("chat")
    t.feed(ev(chunk("The")))
    out = parse(t.ending("the model instance failed"))
    assert out[0]["error"]["code"] == "stream_interrupted" and out[1] == "[DONE]"
    assert t.ending("again") == b""  # [DONE] is sent once
    finished = Transcript("chat")
    finished.feed(ev(chunk(".", finish="stop")))
    assert parse(finished.ending("cut after the last token")) == ["[DONE]"]
