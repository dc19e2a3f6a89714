"""The stream logic of /v1 (gateway/sse.py and hpcside/sse.py), in process: pure functions, no server."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway import sse
from hpcside.sse import split_events


def ev(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def chunk(content: str) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": content}}]}


USAGE = {"id": "c1", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}
ERROR = {"error": {"message": "boom", "type": "server_error", "code": None}}


def relay_in_pieces(raw: bytes, size: int, wants_usage: bool) -> tuple[bytes, sse.Relay]:
    relay = sse.Relay(wants_usage)
    out = b"".join(relay.feed(raw[i:i + size]) for i in range(0, len(raw), size))
    return out + relay.tail(), relay


def events(raw: bytes) -> list[bytes]:
    return [block for block in raw.split(b"\n\n") if block]


def test_the_splitter_returns_whole_events_and_keeps_the_partial_one() -> None:
    assert split_events(b"data: a\n\ndata: b\n\ndata: c") == ([b"data: a", b"data: b"], b"data: c")
    assert split_events(b"data: a") == ([], b"data: a")
    assert split_events(b"data: a\n\n") == ([b"data: a"], b"")


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13, 1000])
def test_events_reach_the_client_whole_whatever_the_byte_boundaries(size: int) -> None:
    raw = ev(chunk("Hel")) + b": queued (3s)\n\n" + ev(chunk("lo")) + sse.DONE
    relay = sse.Relay(wants_usage=False)
    sent: list[bytes] = []
    for i in range(0, len(raw), size):
        out = relay.feed(raw[i:i + size])
        assert not out or out.endswith(b"\n\n")  # never half an event
        sent.append(out)
    assert b"".join(sent) == raw
    assert relay.tail() == b""
    assert (relay.tally.chunks, relay.tally.chars) == (2, 5)


@pytest.mark.parametrize("size", [1, 4, 1000])
def test_the_relay_knows_when_the_end_of_the_answer_has_gone_out(size: int) -> None:
    """A client that hangs up after [DONE] (the openai client stops reading there) got the whole answer:
    the gateway accounts it as 200, not as a stream the client cut short (499)."""
    raw = ev(chunk("Hel")) + ev(chunk("lo"))
    relay = sse.Relay(wants_usage=False)
    for i in range(0, len(raw), size):
        relay.feed(raw[i:i + size])
    assert not relay.done
    for i in range(0, len(sse.DONE), size):
        relay.feed(sse.DONE[i:i + size])
    assert relay.done
    assert not sse.Relay(False).feed(b"data: [DONE]") and not sse.Relay(False).done  # not whole yet: not sent
    relay = sse.Relay(False)
    relay.feed(b'data: {"text": "[DONE]"}\n\n: [DONE]\n\n')  # the word in a chunk or a comment is not the end
    assert not relay.done
    relay.feed(b"data:[DONE]\n\n")  # no space after the colon
    assert relay.done


@pytest.mark.parametrize("position", [0, 1, 2])
@pytest.mark.parametrize("wants_usage", [True, False])
def test_the_usage_chunk_is_taken_wherever_it_comes_and_sent_only_if_asked(position: int, wants_usage: bool) -> None:
    parts = [ev(chunk("ab")), ev(chunk("cd"))]
    parts.insert(position, ev(USAGE))
    raw = b"".join(parts) + sse.DONE
    for size in (1, 7, len(raw)):
        out, relay = relay_in_pieces(raw, size, wants_usage)
        assert relay.tally.usage == USAGE["usage"]
        expected = raw if wants_usage else raw.replace(ev(USAGE), b"")
        assert out == expected


def test_usage_that_rides_on_a_chunk_with_text_is_never_dropped() -> None:
    both = {**chunk("xyz"), "usage": {"prompt_tokens": 2, "completion_tokens": 1}}
    out, relay = relay_in_pieces(ev(both) + sse.DONE, 4, wants_usage=False)
    assert out == ev(both) + sse.DONE
    assert relay.tally.usage == {"prompt_tokens": 2, "completion_tokens": 1}
    assert relay.tally.chars == 3


def test_comments_done_and_error_events_pass_untouched_and_count_nothing() -> None:
    raw = b": loading the model (12s)\n\n" + ev(ERROR) + b"data:not json\n\n" + sse.DONE
    out, relay = relay_in_pieces(raw, 3, wants_usage=False)
    assert out == raw
    assert relay.tally == sse.Tally()


def test_an_event_without_the_space_after_data_is_counted_too() -> None:
    raw = b'data:{"choices":[{"text":"four"}]}\n\n'
    out, relay = relay_in_pieces(raw, 5, wants_usage=False)
    assert out == raw
    assert (relay.tally.chunks, relay.tally.chars) == (1, 4)


def test_text_of_reasoning_and_of_completions_is_counted_but_roles_are_not() -> None:
    obj = {"choices": [{"delta": {"role": "assistant", "content": "ab", "reasoning_content": "cde"}},
                       {"text": "fghi"}, "not a choice"]}
    assert sse.text_size(obj) == 9
    assert sse.text_size({"choices": [{"delta": {"role": "assistant"}}]}) == 0


def test_an_unfinished_last_event_is_passed_on_as_it_is_when_upstream_ends() -> None:
    out, _ = relay_in_pieces(ev(chunk("a")) + b'data: {"cho', 4, wants_usage=False)
    assert out == ev(chunk("a")) + b'data: {"cho'


def test_usage_decides_what_is_charged_when_upstream_sent_it() -> None:
    tally = sse.Tally(usage={"prompt_tokens": 7, "completion_tokens": 3}, chunks=50, chars=900)
    assert sse.charged_tokens(tally, accepted=True, prompt_estimate=99) == (7, 3)


@pytest.mark.parametrize("figure", [-1, 3_000_000_000, "12x", "7", float("inf"), float("nan"), 2.5, True, [7], {}])
def test_usage_figures_that_are_not_counts_are_charged_by_the_estimate(figure: Any) -> None:
    """An external provider's usage is a third party's word: -1 or 3e9 broke the usage row's column
    and stalled the writer, "12x" or infinity raised in the accounting and kept the request's slot."""
    tally = sse.Tally(usage={"prompt_tokens": 7, "completion_tokens": figure}, chunks=3, chars=30)
    assert sse.charged_tokens(tally, accepted=True, prompt_estimate=12) == (12, 8)
    assert sse.charged_tokens(tally, accepted=False, prompt_estimate=12) == (0, 0)


def test_usage_figures_that_are_counts_are_taken() -> None:
    for usage, charged in [({"prompt_tokens": 7.0, "completion_tokens": 0}, (7, 0)),
                           ({"prompt_tokens": None, "completion_tokens": 3}, (0, 3)), ({}, (0, 0)),
                           ({"prompt_tokens": sse.MAX_REPORTED_TOKENS, "completion_tokens": 1},
                            (sse.MAX_REPORTED_TOKENS, 1))]:
        assert sse.charged_tokens(sse.Tally(usage=usage, chunks=3, chars=30), True, 12) == charged


def test_a_reply_cut_before_its_usage_is_charged_an_estimate() -> None:
    # 10 chunks of 2 characters: 10 chunks beat 20 / 4 = 5 tokens; 30 characters in 3 chunks: 8 tokens.
    assert sse.charged_tokens(sse.Tally(chunks=10, chars=20), accepted=True, prompt_estimate=12) == (12, 10)
    assert sse.charged_tokens(sse.Tally(chunks=3, chars=30), accepted=True, prompt_estimate=12) == (12, 8)


def test_a_request_the_model_never_accepted_is_charged_nothing() -> None:
    assert sse.charged_tokens(sse.Tally(chunks=3, chars=30), accepted=False, prompt_estimate=12) == (0, 0)


def test_the_prompt_estimate_counts_text_parts_and_token_ids() -> None:
    chat = {"messages": [{"role": "user", "content": "12345678"},
                         {"role": "user", "content": [{"type": "text", "text": "abcd"}]}, "junk"]}
    assert sse.prompt_estimate(chat, "chat") == 3  # 12 characters
    assert sse.prompt_estimate({"prompt": [1, 2, 3]}, "completions") == 3
    assert sse.prompt_estimate({"input": "abcde"}, "embeddings") == 2


def test_the_prompt_estimate_counts_a_chats_tools_and_answer_schema() -> None:
    """A budget's hold must see a prompt carried in tools (the chat template renders them into it)."""
    schema = {"type": "object", "properties": {"city": {"type": "string", "description": "x" * 4000}}}
    chat = {"messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "weather", "parameters": schema}}]}
    assert sse.prompt_estimate(chat, "chat") > 1000
    assert sse.prompt_estimate({**chat, "tools": None, "response_format": {"type": "json_schema",
                                                                           "json_schema": schema}}, "chat") > 1000


def test_a_prompt_nested_thousands_deep_is_estimated_without_recursion() -> None:
    deep: Any = "abcd"
    for _ in range(100_000):
        deep = [deep]
    assert sse.prompt_estimate({"messages": [{"role": "user", "content": deep}], "tools": deep}, "chat") == 2


def test_usage_of_a_whole_reply_is_read_from_its_json() -> None:
    assert sse.usage_in_body(json.dumps({"usage": {"prompt_tokens": 1}}).encode()) == {"prompt_tokens": 1}
    assert sse.usage_in_body(b"not json") is None
    assert sse.usage_in_body(b"[1, 2]") is None


def test_an_upstream_error_ends_the_stream_with_one_error_event_and_done() -> None:
    assert sse.error_ending(sse.error_object(json.dumps(ERROR).encode())) == ev(ERROR) + sse.DONE
    plain = sse.error_ending(sse.error_object(b"Bad Gateway" + b"x" * 1000))
    first, done = events(plain)
    assert json.loads(first[6:])["error"]["message"] == "Bad Gateway" + "x" * 489
    assert done == b"data: [DONE]"


def test_progress_names_nodes_to_staff_only() -> None:
    assert sse.progress_comment("queued", "queued in Slurm  (Priority)", 12.4, staff=True) == \
        b": queued in Slurm (Priority) (12s)\n\n"
    assert sse.progress_comment("queued", "queued in Slurm (Priority)", 12.4, staff=False) == b": queued (12s)\n\n"
    assert sse.progress_comment("", "", 1, staff=False) == b": waiting (1s)\n\n"
