"""/v1 is routed once (gateway.urls.route): the lean ASGI front and Django's resolver reach the same
views the same way. In process, no server."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from django.test import AsyncClient
from django.urls import resolve

from chatai.asgi import ApiApp
from gateway import views
from gateway.urls import dispatch, route


def test_each_path_names_its_view() -> None:
    assert route("chat/completions") == (views.chat_completions, {})
    assert route("completions") == (views.completions, {})
    assert route("embeddings") == (views.embeddings, {})
    assert route("models") == (views.models, {})
    assert route("models/org/llama-3") == (views.model_detail, {"model": "org/llama-3"})
    assert route("models/") == (views.not_found, {"rest": "models/"})
    assert route("files") == (views.not_found, {"rest": "files"})


def test_djangos_resolver_has_one_pattern_for_v1_that_goes_through_route() -> None:
    for path in ("/v1/chat/completions", "/v1/models/a/b", "/v1/anything"):
        match = resolve(path)
        assert match.func is dispatch
        assert match.kwargs == {"rest": path[len("/v1/"):]}


def call_front(path: str) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "scheme": "http", "server": ("testserver", 80), "client": ("127.0.0.1", 5000),
             "headers": [(b"host", b"testserver")]}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(ApiApp(route)(scope, receive, send))
    return sent


def test_an_unknown_endpoint_answers_alike_through_the_front_and_through_django() -> None:
    start, body = call_front("/v1/files")
    assert start["status"] == 404
    front = json.loads(body["body"])
    response = asyncio.run(AsyncClient().get("/v1/files"))
    assert response.status_code == 404
    assert json.loads(response.content) == front
    assert front["error"]["code"] == "unknown_url" and front["error"]["message"] == "Unknown endpoint /v1/files."
