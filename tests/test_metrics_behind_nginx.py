"""/metrics fails closed behind the documented nginx (docs/deploy.md), in front of a live daphne.

Behind a proxy on the same machine every request reaches daphne from 127.0.0.1. A client that
is not on this machine is played by one connecting from 127.0.0.2 (its own loopback address:
not a proxy, not on any allow-list).
"""

from __future__ import annotations

import http.client
import urllib.parse
from collections.abc import Iterator

import pytest

from tests.harness.nginx import Nginx
from tests.live import LiveApp

pytestmark = [pytest.mark.nginx, pytest.mark.live]

TOKEN = "scrape-secret-0123456789"
REMOTE = "127.0.0.2"


class Site:
    def __init__(self, **env: str) -> None:
        self.app = LiveApp(services=" ", extra_env=env).start()
        try:
            self.nginx = Nginx([f"127.0.0.1:{port}" for port in self.app.ports])
        except Exception:
            self.app.stop()
            raise

    def stop(self) -> None:
        self.nginx.stop()
        self.app.stop()


def get(url: str, path: str, *, source: str = "127.0.0.1",
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=20, source_address=(source, 0))
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def documented() -> Iterator[Site]:
    """As docs/deploy.md sets it up: a metrics token, nginx trusted, https from the proxy, OIDC on."""
    site = Site(METRICS_TOKEN=TOKEN, TRUSTED_PROXIES="127.0.0.1", SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto",
                OIDC_RP_CLIENT_ID="chat-ai", OIDC_RP_CLIENT_SECRET="s",
                OIDC_OP_AUTHORIZATION_ENDPOINT="https://sso.example.edu/auth",
                OIDC_OP_TOKEN_ENDPOINT="https://sso.example.edu/token",
                OIDC_OP_USER_ENDPOINT="https://sso.example.edu/userinfo",
                OIDC_OP_JWKS_ENDPOINT="https://sso.example.edu/certs")
    yield site
    site.stop()


def test_with_a_token_the_token_is_required_through_nginx_and_directly(documented: Site) -> None:
    site = documented
    assert get(site.nginx.url, "/metrics", source=REMOTE)[0] == 403
    assert get(site.nginx.url, "/metrics", source=REMOTE, headers=bearer("wrong"))[0] == 403
    assert get(site.nginx.url, "/metrics")[0] == 403  # on this machine, through the proxy
    assert get(site.app.url, "/metrics")[0] == 403  # directly from this machine: the token is still required
    status, _, body = get(site.nginx.url, "/metrics", source=REMOTE, headers=bearer(TOKEN))
    assert status == 200 and b"chatai_platform_up" in body
    assert get(site.app.url, "/metrics", headers=bearer(TOKEN))[0] == 200


def test_redirect_uris_are_https_behind_the_tls_proxy(documented: Site) -> None:
    status, headers, _ = get(documented.nginx.url, "/oidc/authenticate/", source=REMOTE)
    assert status == 302
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(headers["location"]).query)
    assert query["redirect_uri"] == ["https://127.0.0.1/oidc/callback/"]


def test_without_token_or_list_nothing_is_served_through_the_proxy() -> None:
    site = Site()  # the defaults: no token, no allow-list, no trusted proxy
    try:
        assert get(site.nginx.url, "/metrics", source=REMOTE)[0] == 403
        assert get(site.nginx.url, "/metrics")[0] == 403  # even from this machine: it came through the proxy
        assert get(site.app.url, "/metrics")[0] == 200  # a scraper on this machine, directly
        assert get(site.app.url, "/metrics", headers={"X-Forwarded-For": "127.0.0.1"})[0] == 403
    finally:
        site.stop()


def test_an_allow_list_uses_the_address_a_trusted_proxy_forwarded() -> None:
    site = Site(METRICS_ALLOWED_IPS="127.0.0.1", TRUSTED_PROXIES="127.0.0.1")
    try:
        assert get(site.nginx.url, "/metrics", source=REMOTE)[0] == 403
        spoofed = {"X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1"}
        assert get(site.nginx.url, "/metrics", source=REMOTE, headers=spoofed)[0] == 403
        assert get(site.nginx.url, "/metrics")[0] == 200  # the client is on the list
    finally:
        site.stop()
