"""A real nginx in front of live daphne workers, configured as docs/deploy.md says.

The server block is read from the deploy guide itself, so a change there is what the tests
run. Only what a test on loopback cannot have is changed: it listens on a free port of
127.0.0.1 without TLS (no certificate; X-Forwarded-Proto still says https, as the guide sets
it), the upstream names the test's workers, and logs and temporary files go to its directory.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.harness.accounts import stop_process_group
from tests.harness.net import wait_http
from tests.harness.slurm import free_port

DEPLOY_GUIDE = Path(__file__).resolve().parent.parent.parent / "docs" / "deploy.md"


def deploy_guide_config() -> str:
    """The indented nginx block under "### The reverse proxy (nginx)" in docs/deploy.md."""
    text = DEPLOY_GUIDE.read_text()
    section = text.split("### The reverse proxy (nginx)", 1)[1]
    lines: list[str] = []
    for line in section.splitlines()[1:]:
        if line.startswith("    ") or (not line.strip() and lines):
            lines.append(line[4:])
        elif lines:
            break
    return "\n".join(lines).strip() + "\n"


class Nginx:
    def __init__(self, upstreams: list[str]) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).exists():
            raise RuntimeError("nginx is missing: scripts/test.sh installs it (apt-get install nginx-light)")
        self.dir = Path(tempfile.mkdtemp(prefix="chatai-nginx-"))
        self.port = free_port()
        site = deploy_guide_config()
        site = re.sub(r"upstream chatai \{[^}]*\}",
                      "upstream chatai { " + " ".join(f"server {u};" for u in upstreams) + " keepalive 32; }", site)
        site = re.sub(r"listen 443[^;]*;", f"listen 127.0.0.1:{self.port};", site)
        site = re.sub(r"\n\s*ssl_certificate(_key)?\s[^;]*;", "", site)
        site = re.sub(r"access_log [^;]*;", f"access_log {self.dir}/access.log combined;", site)
        temp = "".join(f"{kind}_temp_path {self.dir}/{kind};\n"
                       for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (self.dir / "nginx.conf").write_text(
            f"daemon off;\nworker_processes 1;\npid {self.dir}/nginx.pid;\nerror_log {self.dir}/error.log;\n"
            f"events {{ worker_connections 256; }}\n"
            f"http {{\n{temp}{site}}}\n")
        self.proc = subprocess.Popen([binary, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_http(f"{self.url}/healthz", 15, "nginx", self.error_log)
        except RuntimeError:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def error_log(self) -> str:
        path = self.dir / "error.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else "(no error log)"

    def stop(self) -> None:
        stop_process_group(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)
