# --- hpcside preamble: environment, token, port and endpoint (same for every template) ---
set -euo pipefail
umask 077
{{ env_exports }}
# The instance's own token reaches vLLM through the environment, never a command line.
VLLM_API_KEY="$(cat {{ token_file }})"
export VLLM_API_KEY
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
# A random free port on this node, picked when the job starts.
PORT="$({{ python }} -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')"
HOST={{ endpoint_host }}
if [ -z "$HOST" ]; then HOST="$(hostname)"; fi
printf '{"host": "%s", "port": %s, "job_id": "%s"}\n' "$HOST" "$PORT" "${SLURM_JOB_ID:-}" > {{ endpoint_file }}.tmp
mv {{ endpoint_file }}.tmp {{ endpoint_file }}
# --- end of preamble ---
