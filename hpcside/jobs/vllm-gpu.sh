#!/bin/bash
{{ sbatch_header }}
# hpcside instance {{ instance }} of service {{ service }}: vLLM on GPUs. Generated; do not edit.
{{ preamble }}
exec {{ vllm }} serve {{ model_path }} \
  --host {{ bind_host }} --port "$PORT" \
  --served-model-name {{ model }} \
  --tensor-parallel-size {{ tensor_parallel_size }} \
  --max-model-len {{ max_model_len }}{{ scheduling_args }} \
  --middleware hpcside_vllm_guard.TokenGuard "$REQUEST_LOG_FLAG" \
  --disable-uvicorn-access-log {{ vllm_args }}
