"""A strict Content-Security-Policy on every page: nothing from a third party, no inline script.

Model output is rendered in the browser; even if a rendering bug let markup through, the policy
stops it running script or loading anything from elsewhere. Styles allow inline attributes only
because KaTeX positions formulas with them (styles cannot run script; remote fonts and images stay
blocked by font-src and img-src). Form posts may also go to the SSO provider (its logout).
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from django.conf import settings
from django.http import HttpRequest, HttpResponse


def policy() -> str:
    form_action = ["'self'"]
    for name in ("OIDC_OP_AUTHORIZATION_ENDPOINT", "OIDC_OP_LOGOUT_ENDPOINT"):
        url = getattr(settings, name, "")
        if url:
            parts = urlsplit(url)
            origin = f"{parts.scheme}://{parts.netloc}"
            if origin not in form_action:
                form_action.append(origin)
    return ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "font-src 'self'; connect-src 'self'; media-src 'none'; object-src 'none'; frame-src 'none'; "
            "worker-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action " + " ".join(form_action))


class ContentSecurityPolicyMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        self.header = policy()

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        response.setdefault("Content-Security-Policy", self.header)
        response.setdefault("Permissions-Policy", "camera=(), microphone=(), geolocation=(), payment=()")
        response.setdefault("Cross-Origin-Opener-Policy", "same-origin")
        return response
