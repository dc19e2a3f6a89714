"""A real OpenID Connect provider (npm oidc-provider, OpenID Certified) for the browser tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from tests.harness.accounts import stop_process_group
from tests.harness.net import wait_http
from tests.harness.slurm import free_port

SERVER = Path(__file__).resolve().parent.parent / "support" / "oidc"
ARTIFACTS = SERVER.parent.parent.parent / "test-artifacts"


class OIDCProvider:
    def __init__(self, app_url: str, accounts: dict[str, dict]) -> None:
        if not (SERVER / "node_modules" / "oidc-provider").is_dir():
            raise RuntimeError("oidc-provider is not installed: scripts/test.sh installs it (npm ci in "
                               f"{SERVER})")
        self.port = free_port()
        self.client_id, self.client_secret = "chatai-test", "chatai-test-secret-" + os.urandom(8).hex()
        env = {**os.environ, "OIDC_PORT": str(self.port), "OIDC_CLIENT_ID": self.client_id,
               "OIDC_CLIENT_SECRET": self.client_secret, "OIDC_REDIRECT_URI": f"{app_url}/oidc/callback/",
               "OIDC_POST_LOGOUT_URI": f"{app_url}/", "OIDC_ACCOUNTS": json.dumps(accounts), "NODE_ENV": "test"}
        ARTIFACTS.mkdir(exist_ok=True)
        self.log = open(ARTIFACTS / "oidc-provider.log", "wb")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen([shutil.which("node") or "node", str(SERVER / "server.mjs")], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.discovery = json.loads(wait_http(f"{self.issuer}/.well-known/openid-configuration", 20,
                                                  "the OIDC provider", lambda: "see test-artifacts/oidc-provider.log"))
        except RuntimeError:
            self.stop()
            raise

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app_env(self) -> dict[str, str]:
        """What the web app needs to sign users in here (as an operator would set it)."""
        d = self.discovery
        return {"OIDC_RP_CLIENT_ID": self.client_id, "OIDC_RP_CLIENT_SECRET": self.client_secret,
                "OIDC_OP_AUTHORIZATION_ENDPOINT": d["authorization_endpoint"],
                "OIDC_OP_TOKEN_ENDPOINT": d["token_endpoint"], "OIDC_OP_USER_ENDPOINT": d["userinfo_endpoint"],
                "OIDC_OP_JWKS_ENDPOINT": d["jwks_uri"], "OIDC_OP_LOGOUT_ENDPOINT": d["end_session_endpoint"],
                "OIDC_RP_SCOPES": "openid email profile groups"}  # users by sub, the default

    def stop(self) -> None:
        stop_process_group(self.proc)
        self.log.close()
