#!/usr/bin/env bash
# The run command: starts Chat AI on this machine with its embedded defaults (SQLite,
# local memory cache, data in ./var). Installs what it needs on first run. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
HOST=${CHATAI_HOST:-127.0.0.1}
PORT=${CHATAI_PORT:-8000}

step "python environment"
venv_ready requirements.txt

step "browser libraries (npm, package-lock.json)"
assets_ready

step "database (SQLite in ./var unless DB_ENGINE is set)"
.venv/bin/python manage.py migrate --no-input -v 0
echo "ready"

step "not in this build yet"
cat <<MSG
  - the local vLLM runtime with the SmolLM2 model: the chat page and /v1 run, but no
    model is configured on this machine yet (HPC_PLATFORMS or var/hpcside/services.ini)
  Create a local account for the chat: .venv/bin/python manage.py createsuperuser
  The HPC scheduler is ready: python3 -m hpcside --help (see docs/hpcside.md).
MSG

step "web app on http://$HOST:$PORT/ (Ctrl-C stops it)"
exec .venv/bin/daphne -b "$HOST" -p "$PORT" chatai.asgi:application
