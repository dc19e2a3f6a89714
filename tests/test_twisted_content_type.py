"""chatai/contenttype.py: Twisted's Content-Type parsing, short-cut for the API's media types with the same
answers as Twisted's own parser, in process."""

from __future__ import annotations

import pytest
from twisted.web import http

from chatai.contenttype import fast, speed_up_twisted_content_type

SAMPLES = [b"application/json", b"application/json; charset=utf-8", b"Application/JSON;charset=UTF-8",
           b" application/json ", b"text/event-stream", b"text/plain; charset=latin-1",
           b"multipart/form-data; boundary=xyz", b"application/x-www-form-urlencoded", b"", b"garbage",
           b"text/html; charset=utf-8"]


def test_it_answers_like_twisteds_own_parser() -> None:
    twisted_parse = getattr(http._parseContentType, "original", http._parseContentType)
    quick = fast(twisted_parse)
    for line in SAMPLES:
        assert quick(line) == twisted_parse(line), line


def test_only_other_media_types_reach_the_slow_parser() -> None:
    seen: list[bytes] = []

    def slow(line: bytes) -> bytes:
        seen.append(line)
        return b"other/type"

    quick = fast(slow)
    assert quick(b"application/json; charset=utf-8") == b"application/json"
    assert quick(b"TEXT/EVENT-STREAM") == b"text/event-stream"
    assert quick(b"multipart/form-data; boundary=x") == b"other/type"
    assert seen == [b"multipart/form-data; boundary=x"]


def test_installing_it_twice_wraps_twisteds_parser_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "_parseContentType", http._parseContentType)  # restored after the test
    assert speed_up_twisted_content_type(http)
    installed = http._parseContentType
    assert installed.chatai_fast  # type: ignore[attr-defined]
    assert speed_up_twisted_content_type(http)
    assert http._parseContentType is installed
    assert http._parseContentType(b"text/plain") == b"text/plain"


def test_a_twisted_without_the_parser_is_left_alone() -> None:
    class NoParser:
        pass

    assert speed_up_twisted_content_type(NoParser()) is False
