# --- hpcside preamble: environment, token, port and endpoint (same for every template) ---
set -euo pipefail
umask 077
{{ env_exports }}
# The instance's own token reaches vLLM through the environment, never a command line.
VLLM_API_KEY="$(cat {{ token_file }})"
export VLLM_API_KEY
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
# No request or response content in the job output, whatever the environment above says.
export VLLM_DEBUG_LOG_API_SERVER_RESPONSE=false
# The token guard (vLLM --middleware): the only module in this directory, so nothing is shadowed.
export PYTHONPATH={{ guard_dir }}${PYTHONPATH:+:$PYTHONPATH}
# Request logging off explicitly, with the flag this vLLM knows (renamed in vLLM 0.10).
REQUEST_LOG_FLAG="$({{ python }} -m hpcside_vllm_guard request-log-flag)"
# A random free port on this node, picked when the job starts.
PORT="$({{ python }} -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')"
HOST={{ endpoint_host }}
if [ -z "$HOST" ]; then HOST="$(hostname)"; fi
printf '{"host": "%s", "port": %s, "job_id": "%s"}\n' "$HOST" "$PORT" "${SLURM_JOB_ID:-}" > {{ endpoint_file }}.tmp
mv {{ endpoint_file }}.tmp {{ endpoint_file }}
# --- end of preamble ---
