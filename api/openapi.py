"""The OpenAPI 3 document of /api (the DRF resource API) and /v1 (the lean OpenAI-compatible front).

Written by hand: /v1 is not DRF, and one hand-kept document lets both parts share one error shape.
tests/test_schemathesis.py runs schemathesis against it on the live app, so it cannot drift from
what the app answers without a test failing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

JSON = "application/json"


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(properties: dict[str, Any], required: Sequence[str] = (), **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required), **extra}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


STRING = {"type": "string"}
INT = {"type": "integer"}
DATETIME = {"type": "string", "format": "date-time"}

ERRORS = {
    "400": "The request is not valid: `param` names the field.",
    "401": "No credentials, or an unknown, expired or revoked key.",
    "403": "Not allowed (CSRF check failed, not staff, or a key asking for a key wider than itself).",
    "404": "No such thing (or a model the caller may not use).",
    "413": "The request body is too large.",
    "429": "A rate limit or the failed-authentication limit (code `rate_limit_exceeded`: see Retry-After), or "
           "a token budget used up (type and code `insufficient_quota`: the message names the budget and when "
           "it resets; retrying before then does not help).",
    "502": "The platform or provider failed.",
    "503": "No instance of the model could be had in time.",
    "504": "The model did not answer in time.",
}


def errors(*codes: str) -> dict[str, Any]:
    out: dict[str, Any] = {c: {"$ref": f"#/components/responses/E{c}"} for c in codes}
    out["default"] = {"$ref": "#/components/responses/Error"}
    return out


def ok(schema: dict[str, Any], description: str = "OK", status: str = "200") -> dict[str, Any]:
    return {status: {"description": description, "content": {JSON: {"schema": schema}}}}


DATE_RANGE = [
    {"name": "from", "in": "query", "required": False, "description": "First day (in the site's TIME_ZONE), inclusive.",
     "schema": {"type": "string", "format": "date"}},
    {"name": "to", "in": "query", "required": False, "description": "Last day (in the site's TIME_ZONE), inclusive.",
     "schema": {"type": "string", "format": "date"}},
]
USAGE_FILTER = [*DATE_RANGE, {"name": "project", "in": "query", "required": False,
                              "description": "Only the rows charged to this project (by name).",
                              "schema": {"type": "string", "minLength": 1, "maxLength": 100}}]
PROJECT_NAME = {"type": "string", "minLength": 1, "maxLength": 100}

COUNTS = {"model": STRING, "requests": INT, "errors": INT, "prompt_tokens": INT, "completion_tokens": INT}

NUMBER = {"type": "number"}
HOURS = {"node_hours": NUMBER, "gpu_hours": NUMBER, "cpu_hours": NUMBER}
CHARGED = {"requests": INT, "prompt_tokens": INT, "completion_tokens": INT, **HOURS}
NODE_TIME = {"instances": INT, "elapsed_hours": NUMBER, "busy_hours": NUMBER, "idle_hours": NUMBER, **HOURS,
             **{f"idle_{k}": NUMBER for k in HOURS}}
MONTH = [{"name": "month", "in": "query", "required": False,
          "description": "A calendar month in the site's time zone, YYYY-MM (default: this month).",
          "schema": {"type": "string", "pattern": "^(19[7-9][0-9]|[2-9][0-9]{3})-(0[1-9]|1[0-2])$",
                     "example": "2026-12"}}]

SCHEMAS: dict[str, Any] = {
    # The gateway's own errors carry all four fields; an upstream's error in OpenAI's shape passes as it came.
    "Error": obj({"error": obj({"message": STRING, "type": STRING, "param": nullable(STRING),
                                "code": {"nullable": True, "anyOf": [STRING, INT]}}, ["message", "type"])},
                 ["error"]),
    "Key": obj({"prefix": STRING, "name": STRING, "created_at": DATETIME, "expires_at": nullable(DATETIME),
                "revoked_at": nullable(DATETIME), "last_used_at": nullable(DATETIME),
                "allowed_models": {"type": "array", "items": STRING},
                "state": {"type": "string", "enum": ["active", "expired", "revoked"]},
                "project": nullable({"type": "string", "description": "The project its usage is charged to."})},
               ["prefix", "name", "created_at", "expires_at", "revoked_at", "last_used_at", "allowed_models",
                "state", "project"]),
    "KeyCreate": obj({"name": {"type": "string", "minLength": 1, "maxLength": 100},
                      "expires_days": nullable({"type": "integer", "minimum": 1, "maximum": 3650}),
                      "models": {"type": "array", "maxItems": 100, "items": {"type": "string", "maxLength": 200},
                                 "description": "Only these models; empty: all the user may use (for a request "
                                                "made with a key: that key's models)."},
                      "project": nullable({**PROJECT_NAME,
                                           "description": "Charge its usage to this project of mine (default: my "
                                                          "default project; for a request made with a key: that "
                                                          "key's project, and no other)."})},
                     ["name"]),
    "LimitState": obj({"limit": INT, "used": INT, "remaining": INT, "reset_seconds": nullable(INT)},
                      ["limit", "used", "remaining", "reset_seconds"]),
    "Me": obj({"username": STRING, "email": STRING, "is_staff": {"type": "boolean"},
               "groups": {"type": "array", "items": STRING},
               "key": {"allOf": [ref("Key")], "nullable": True, "description": "The key of this request, if any."},
               "models": {"type": "array", "items": obj({"id": STRING, "name": STRING, "status": STRING},
                                                         ["id", "name", "status"])},
               "limits": {"type": "array", "items": obj(
                   {"scope": {"type": "string", "enum": ["user", "key"]},
                    "limits": {"type": "object", "additionalProperties": ref("LimitState"),
                               "description": "requests_per_minute/hour/day, tokens_per_minute/day, "
                                              "parallel_streams: only those that are limited."}},
                   ["scope", "limits"])},
               "budgets": {"type": "array", "items": ref("Budget"),
                           "description": "The token budgets this caller's requests count against (the "
                                          "project's, each group's for each member, the user's own), this period."},
               "projects": {"type": "array", "items": ref("Project"),
                            "description": "My projects by name; the first is my default."},
               "project": nullable({"type": "string", "description": "The project this request is charged to: "
                                                                     "the key's, or the chat's choice (default: "
                                                                     "the first of mine)."})},
              ["username", "groups", "key", "models", "limits", "budgets", "projects", "project"]),
    "Project": obj({"name": STRING, "slurm_account": {"type": "string", "description": "Empty when none."}},
                   ["name", "slurm_account"]),
    "ProjectChoice": obj({"project": nullable({**PROJECT_NAME, "description": "One of my projects; null: my "
                                                                              "default."})}, ["project"]),
    "ProjectInUse": obj({"project": nullable(STRING), "projects": {"type": "array", "items": ref("Project")}},
                        ["project", "projects"]),
    "Budget": obj({"name": STRING, "scope": {"type": "string", "enum": ["project", "group", "user"]},
                   "owner": {"type": "string", "description": "The project's or group's name, or the username."},
                   "limit": INT, "used": INT, "remaining": INT,
                   "period": {"type": "string", "enum": ["day", "week", "month"]},
                   "period_start": DATETIME, "resets_at": DATETIME},
                  ["name", "scope", "owner", "limit", "used", "remaining", "period", "period_start", "resets_at"]),
    "UsageRow": obj({"day": {"type": "string", "format": "date"}, "project": nullable(STRING), **COUNTS},
                    ["day", "project", *COUNTS]),
    "AdminUsage": obj({
        "by_user": {"type": "array", "items": obj({"user": nullable(STRING), **COUNTS}, ["user", *COUNTS])},
        "by_group": {"type": "array", "items": obj({"group": nullable(STRING), **COUNTS}, ["group", *COUNTS])},
        "by_project": {"type": "array", "items": obj({"project": nullable(STRING), **COUNTS},
                                                     ["project", *COUNTS])}},
        ["by_user", "by_group", "by_project"]),
    "Chargeback": obj({
        "month": STRING, "start": DATETIME, "end": DATETIME,
        "now": {**DATETIME, "description": "Running instances are counted until now."},
        "time_zone": STRING, "project": nullable({**STRING, "description": "The project asked for, if any."}),
        "projects": {"type": "array", "items": obj({"project": STRING, **CHARGED}, ["project", *CHARGED]),
                     "description": "Per project ('(no project)' for usage charged to none), no project last."},
        "lines": {"type": "array", "items": obj({"project": STRING, "platform": STRING, "model": STRING, **CHARGED},
                                                ["project", "platform", "model", *CHARGED]),
                  "description": "Per project, platform and model (platform empty: an external provider)."},
        "idle": {"type": "array", "items": obj({"platform": STRING, "model": STRING, **NODE_TIME},
                                               ["platform", "model", *NODE_TIME]),
                 "description": "Per platform and model: its instances' hours, busy and idle (charged to no project)."},
        "totals": obj({**CHARGED, **NODE_TIME}, list({**CHARGED, **NODE_TIME})),
        "running_instances": INT,
        "unmatched_requests": {**INT, "description": "Requests served by instances with no node-time row yet."}},
        ["month", "start", "end", "now", "time_zone", "project", "projects", "lines", "idle", "totals",
         "running_instances", "unmatched_requests"]),
    "Platform": obj({"name": STRING, "up": {"type": "boolean"}, "connections": INT, "streams": INT,
                     "failures": INT, "last_error": STRING, "retry_in": {"type": "number"},
                     "last_pong": {"type": "object"},
                     "models": {"type": "array", "items": obj(
                         {"id": STRING, "status": STRING, "instances": INT, "demand": INT,
                          "start_estimate": nullable({"type": "number"})},
                         ["id", "status", "instances", "demand"])}},
                    ["name", "up", "connections", "streams", "failures", "models"]),
    # /v1, OpenAI's shapes (only what this gateway guarantees; more fields pass through).
    "Model": obj({"id": STRING, "object": {"type": "string", "enum": ["model"]}, "created": INT, "owned_by": STRING,
                  "name": STRING, "description": STRING, "status": STRING, "demand": INT, "instances": INT,
                  "max_model_len": nullable(INT)}, ["id", "object", "owned_by", "status"]),
    "ModelList": obj({"object": {"type": "string", "enum": ["list"]}, "data": {"type": "array", "items": ref("Model")}},
                     ["object", "data"]),
    "ChatMessage": obj({"role": STRING, "content": {"nullable": True, "oneOf": [
        STRING, {"type": "array", "items": {"type": "object"}}]}}, ["role"]),
    "ChatCompletionRequest": obj({
        "model": {"type": "string", "minLength": 1, "maxLength": 200, "example": "stub-model"},
        "messages": {"type": "array", "minItems": 1, "items": ref("ChatMessage")},
        "stream": {"type": "boolean"}, "stream_options": nullable({"type": "object"}),
        "max_tokens": nullable({"type": "integer", "minimum": 1}), "temperature": nullable({"type": "number"})},
        ["model", "messages"]),
    "ChatCompletion": obj({"id": STRING, "object": STRING, "created": INT, "model": STRING,
                           "choices": {"type": "array", "items": {"type": "object"}},
                           "usage": {"type": "object"}}, ["choices"]),
    "CompletionRequest": obj({
        "model": {"type": "string", "minLength": 1, "maxLength": 200, "example": "stub-model"},
        "prompt": {"oneOf": [STRING, {"type": "array"}]}, "stream": {"type": "boolean"},
        "stream_options": nullable({"type": "object"}), "max_tokens": nullable({"type": "integer", "minimum": 1})},
        ["model", "prompt"]),
    "Completion": obj({"id": STRING, "object": STRING, "created": INT, "model": STRING,
                       "choices": {"type": "array", "items": {"type": "object"}}, "usage": {"type": "object"}},
                      ["choices"]),
    "EmbeddingRequest": obj({"model": {"type": "string", "minLength": 1, "maxLength": 200},
                             "input": {"oneOf": [STRING, {"type": "array"}]}}, ["model", "input"]),
    "EmbeddingList": obj({"object": STRING, "data": {"type": "array", "items": {"type": "object"}},
                          "model": STRING, "usage": {"type": "object"}}, ["data"]),
}

# One event of the stream, as the SSE media type models it (OpenAPI 3.0: `schema` is per event;
# comments carry no data and are not events). `data` is a chunk's JSON, or [DONE].
SSE = {"text/event-stream": {"schema": {"type": "object", "required": ["data"], "properties": {
                                 "data": {"type": "string"}, "event": {"type": "string"},
                                 "id": {"type": "string"}, "retry": {"type": "integer"}}},
                             "description": "With stream: server-sent events, `data: {chunk}` lines, comment lines "
                                            "(`: queued (12s)`) during a cold start, and `data: [DONE]`."}}


# The tightest token budget that applies to the caller (absent when none applies).
BUDGET_HEADERS = {
    "x-budget-limit-tokens": {"description": "The tightest budget's tokens per period.", "schema": INT},
    "x-budget-remaining-tokens": {"description": "Tokens left of it (this request's own not yet counted).",
                                  "schema": INT},
    "x-budget-reset": {"description": "When its period ends (ISO 8601).", "schema": STRING},
    "x-budget-scope": {"description": "project, group or user.", "schema": STRING},
}


def _v1_generate(summary: str, request: str, response: str, stream: bool = True) -> dict[str, Any]:
    content: dict[str, Any] = {JSON: {"schema": ref(response)}}
    if stream:
        content.update(SSE)
    return {"post": {"tags": ["v1"], "summary": summary, "operationId": f"v1_{request}",
                     "requestBody": {"required": True, "content": {JSON: {"schema": ref(request)}}},
                     "responses": {"200": {"description": "The model's answer.", "content": content,
                                           "headers": BUDGET_HEADERS},
                                   **errors("400", "401", "403", "404", "413", "429", "502", "503", "504")}}}


def schema(base_url: str = "/") -> dict[str, Any]:
    """The whole document; ``base_url`` is this site's root as the client sees it."""
    api = {"tags": ["api"]}
    return {
        "openapi": "3.0.3",
        "info": {"title": "Chat AI", "version": "1",
                 "description": "/api: who you are, your keys, your usage, and (staff) everyone's usage and the "
                                "platforms. /v1: the OpenAI-compatible API. Authenticate with `Authorization: "
                                "Bearer <API key>` or the signed-in session (unsafe methods need the CSRF token "
                                "in X-CSRFToken). Every error has the shape of the Error schema."},
        "servers": [{"url": base_url.rstrip("/") or "/"}],
        "security": [{"bearer": []}, {"session": []}],
        "tags": [{"name": "api", "description": "The resource API (DRF)."},
                 {"name": "admin", "description": "Staff only."},
                 {"name": "v1", "description": "The OpenAI-compatible API (lean ASGI front)."}],
        "paths": {
            "/api/me": {"get": {**api, "operationId": "me", "summary": "Who I am, my models, my limits, what is left",
                                "responses": {**ok(ref("Me")), **errors("401", "429")}}},
            "/api/me/project": {"put": {
                **api, "operationId": "me_project", "summary": "Charge my chat to another of my projects",
                "description": "Kept in the signed-in session: the chat's requests are charged to it from the "
                               "next one on. A request made with a key gets 403 (a key's project is fixed); a "
                               "project I am not a member of gets 400 naming `project`.",
                "requestBody": {"required": True, "content": {JSON: {"schema": ref("ProjectChoice")}}},
                "responses": {**ok(ref("ProjectInUse")), **errors("400", "401", "403", "429")}}},
            "/api/keys": {
                "get": {**api, "operationId": "keys_list", "summary": "My API keys (never their secrets)",
                        "responses": {**ok(obj({"data": {"type": "array", "items": ref("Key")}}, ["data"])),
                                      **errors("401", "429")}},
                "post": {**api, "operationId": "keys_create",
                         "summary": "Create a key: the secret is in this response only",
                         "description": "A request made with a key cannot create a key wider than that key: its "
                                        "models and expiry are inherited when not given, refused (403) when wider.",
                         "requestBody": {"required": True, "content": {JSON: {"schema": ref("KeyCreate")}}},
                         "responses": {**ok({"allOf": [ref("Key"), obj({"secret": STRING}, ["secret"])]},
                                            "The new key, with its secret (shown once).", "201"),
                                       **errors("400", "401", "403", "429")}}},
            "/api/keys/{prefix}": {"delete": {
                **api, "operationId": "keys_revoke", "summary": "Revoke one of my keys",
                "parameters": [{"name": "prefix", "in": "path", "required": True, "schema": STRING,
                                "description": "The 12 characters after `cai-`."}],
                "responses": {**ok(ref("Key")), **errors("401", "403", "404", "429")}}},
            "/api/usage": {"get": {**api, "operationId": "usage",
                                   "summary": "My requests per day, model and project",
                                   "parameters": USAGE_FILTER,
                                   "responses": {**ok(obj({"data": {"type": "array", "items": ref("UsageRow")}},
                                                          ["data"])), **errors("400", "401", "429")}}},
            "/api/admin/usage": {"get": {"tags": ["admin"], "operationId": "admin_usage",
                                         "summary": "Everyone's requests per user, group and project, and model",
                                         "parameters": USAGE_FILTER,
                                         "responses": {**ok(ref("AdminUsage")), **errors("400", "401", "403", "429")}}},
            "/api/admin/chargeback": {"get": {
                "tags": ["admin"], "operationId": "admin_chargeback",
                "summary": "A month's node hours charged back to projects, idle time apart",
                "description": "Each instance's busy hours (the union of its requests' intervals) divided among "
                               "projects by the tokens each had served by it; idle hours per platform and model. "
                               "Hours rounded to 3 decimals (docs/accounting.md).",
                "parameters": [*MONTH, {"name": "project", "in": "query", "required": False, "schema": PROJECT_NAME,
                                        "description": "Only this project's rows in projects and lines ('(no "
                                                       "project)' for usage charged to none); idle and totals "
                                                       "stay whole."}],
                "responses": {**ok(ref("Chargeback")), **errors("400", "401", "403", "429")}}},
            "/api/admin/platforms": {"get": {"tags": ["admin"], "operationId": "admin_platforms",
                                             "summary": "Each platform: link, models, instances, demand",
                                             "responses": {**ok(obj({"data": {"type": "array",
                                                                              "items": ref("Platform")}}, ["data"])),
                                                           **errors("401", "403", "429")}}},
            "/api/schema": {"get": {**api, "operationId": "schema", "summary": "This document",
                                    "responses": {**ok({"type": "object"}), **errors("401", "429")}}},
            "/v1/models": {"get": {"tags": ["v1"], "operationId": "v1_models", "summary": "The models I may use",
                                   "responses": {**ok(ref("ModelList")), **errors("401", "429")}}},
            "/v1/models/{model}": {"get": {
                "tags": ["v1"], "operationId": "v1_model", "summary": "One model",
                "parameters": [{"name": "model", "in": "path", "required": True, "schema": STRING}],
                "responses": {**ok(ref("Model")), **errors("401", "404", "429")}}},
            "/v1/chat/completions": _v1_generate("Chat completion (plain or streamed)", "ChatCompletionRequest",
                                                 "ChatCompletion"),
            "/v1/completions": _v1_generate("Text completion (plain or streamed)", "CompletionRequest", "Completion"),
            "/v1/embeddings": _v1_generate("Embeddings", "EmbeddingRequest", "EmbeddingList", stream=False),
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "An API key, cai-..."},
                                "session": {"type": "apiKey", "in": "cookie", "name": "sessionid"}},
            "schemas": SCHEMAS,
            "responses": {
                **{f"E{code}": {"description": text, "content": {JSON: {"schema": ref("Error")}}}
                   for code, text in ERRORS.items()},
                "Error": {"description": "Any other error, in the same shape.",
                          "content": {JSON: {"schema": ref("Error")}}}},
        },
    }
