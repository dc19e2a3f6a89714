"""External OpenAI-compatible providers served as models, through one pooled aiohttp session.

The user's request goes to the provider unchanged (only ``model`` is renamed when the
provider calls it differently); the provider's answer, success or error, comes back
unchanged. The provider key is read from an environment variable or its ``NAME_FILE``
at request time, so a rotated secret file takes effect without a restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

from common.env import env
from common.upstream import Head, UpstreamError

log = logging.getLogger("gateway.external")
PASS_HEADERS = ("content-type", "openai-processing-ms", "x-request-id", "retry-after")
_sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}


@dataclass(frozen=True)
class Provider:
    model_id: str
    base_url: str  # up to and including /v1
    model: str  # the model's name at the provider
    key_env: str

    def url(self, endpoint: str) -> str:
        return self.base_url.rstrip("/") + endpoint.removeprefix("/v1")


def session() -> aiohttp.ClientSession:
    """One keep-alive pool per event loop (daphne runs one)."""
    loop = asyncio.get_running_loop()
    current = _sessions.get(loop)
    if current is None or current.closed:
        for old in [lp for lp in _sessions if lp.is_closed()]:
            del _sessions[old]
        current = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, ttl_dns_cache=300, enable_cleanup_closed=True),
            timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10, sock_read=600),
            auto_decompress=True, trust_env=True, raise_for_status=False)
        _sessions[loop] = current
    return current


async def stream(provider: Provider, endpoint: str, body: bytes, request_id: str) -> AsyncIterator[Head | bytes]:
    """Yield the provider's Head, then its body as it arrives (like ``Platform.stream``)."""
    key = env(provider.key_env) if provider.key_env else ""
    if provider.key_env and not key:
        log.error("external model %s: no key in %s or %s_FILE", provider.model_id, provider.key_env,
                  provider.key_env)
        raise UpstreamError(503, "provider_not_configured",
                          f"The provider of `{provider.model_id}` is not configured; tell the operators.")
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
               "X-Request-Id": request_id}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        async with session().post(provider.url(endpoint), data=body, headers=headers) as resp:
            yield Head(resp.status, {k.lower(): v for k, v in resp.headers.items() if k.lower() in PASS_HEADERS})
            async for chunk in resp.content.iter_any():
                yield chunk
    except TimeoutError:
        raise UpstreamError(504, "upstream_timeout", f"The provider of `{provider.model_id}` did not answer in time.",
                          retry_after=5) from None
    except aiohttp.ClientError as exc:
        # The exception names host and port only, never the body.
        log.warning("external model %s: %s", provider.model_id, type(exc).__name__)
        raise UpstreamError(502, "upstream_unreachable",
                          f"The provider of `{provider.model_id}` could not be reached.", retry_after=5) from None
