"""The instance token on EVERY path of a vLLM job: ASGI middleware loaded inside vLLM.

vLLM's own ``--api-key`` guards only paths under /v1 (and a few other prefixes): /tokenize,
/detokenize, /metrics, /health, /pooling and the rest answer anyone who can reach the compute
node's port, and on a cluster that is every user. The job templates start vLLM with
``--middleware hpcside_vllm_guard.TokenGuard`` (vLLM 0.32 adds a class given by import path
with ``app.add_middleware``), so every HTTP request and WebSocket needs ``Authorization: Bearer
<VLLM_API_KEY>``, checked in constant time, before any of vLLM's code sees it. It costs no extra
network hop (bench/vllm_guard.py measures it).

Standard library only and self-contained: the scheduler copies this file into the state
directory as ``pylib/hpcside_vllm_guard.py`` and the job puts only that directory on PYTHONPATH
(putting the hpcside package's parent there would let whatever else lies beside it, such as the
account's home, shadow vLLM's own imports).

``python -m hpcside_vllm_guard request-log-flag`` prints the vLLM flag that turns request
logging off for the vLLM installed beside the interpreter (``--no-enable-log-requests`` since
vLLM 0.10, ``--disable-log-requests`` before), read from vLLM's source without importing it.
"""

from __future__ import annotations

import hmac
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable, List, MutableMapping, Optional

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

TOKEN_ENV = "VLLM_API_KEY"  # noqa: S105 - the name of the variable, not a secret
_UNAUTHORIZED = b'{"error": "Unauthorized"}'
_HEADERS: List[List[bytes]] = [[b"content-type", b"application/json"],
                               [b"content-length", str(len(_UNAUTHORIZED)).encode()],
                               [b"www-authenticate", b"Bearer"]]


class TokenGuard:
    """Pure ASGI middleware: HTTP and WebSocket scopes need the bearer token; lifespan passes."""

    def __init__(self, app: ASGIApp, token: Optional[str] = None) -> None:
        token = os.environ.get(TOKEN_ENV, "") if token is None else token
        if not token:
            # Fail closed: a job without its token must not serve an open port.
            raise RuntimeError(f"{TOKEN_ENV} is empty: refusing to serve without a token")
        self.app = app
        self.expected = b"Bearer " + token.encode("utf-8")

    def allowed(self, scope: Scope) -> bool:
        for name, value in scope.get("headers") or ():
            if name == b"authorization":
                # compare_digest takes the same time wherever the first difference is.
                return hmac.compare_digest(value, self.expected)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind in ("http", "websocket") and not self.allowed(scope):
            if kind == "http":
                await send({"type": "http.response.start", "status": 401, "headers": _HEADERS})
                await send({"type": "http.response.body", "body": _UNAUTHORIZED})
            else:
                await send({"type": "websocket.close", "code": 1008})  # before accept: HTTP 403
            return
        await self.app(scope, receive, send)


def request_log_flag(package_dir: Optional[Path] = None) -> str:
    """The flag that turns vLLM's request logging off, for the vLLM this interpreter would import."""
    if package_dir is None:
        spec = importlib.util.find_spec("vllm")  # finds the package without importing it
        locations = list(spec.submodule_search_locations or []) if spec else []
        package_dir = Path(locations[0]) if locations else None
    text = ""
    if package_dir is not None:
        try:
            text = (package_dir / "engine" / "arg_utils.py").read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = ""
    if "--enable-log-requests" not in text and "--disable-log-requests" in text:
        return "--disable-log-requests"  # vLLM before 0.10: logging was on unless disabled
    # vLLM 0.10 and later (and anything unrecognised: an unknown flag stops vLLM, never logs).
    return "--no-enable-log-requests"


def main(argv: List[str]) -> int:
    if argv == ["request-log-flag"]:
        print(request_log_flag())
        return 0
    print("usage: python -m hpcside_vllm_guard request-log-flag", file=sys.stderr)
    return 2


__all__ = ["TokenGuard", "request_log_flag"]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
