#!/bin/bash
{{ sbatch_header }}
# hpcside instance {{ instance }} of service {{ service }}: vLLM on CPU. Generated; do not edit.
{{ preamble }}
# Settings that start fastest on CPU (see docs/hpcside.md); env in the config overrides them.
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" HF_HUB_OFFLINE=1
export VLLM_ENABLE_V1_MULTIPROCESSING="${VLLM_ENABLE_V1_MULTIPROCESSING:-0}"
exec {{ python }} -m vllm.entrypoints.openai.api_server \
  --model {{ model_path }} \
  --host {{ bind_host }} --port "$PORT" \
  --served-model-name {{ model }} \
  --max-model-len {{ max_model_len }}{{ scheduling_args }} \
  --enforce-eager --distributed-executor-backend uni \
  --middleware hpcside_vllm_guard.TokenGuard "$REQUEST_LOG_FLAG" \
  --disable-uvicorn-access-log {{ vllm_args }}
