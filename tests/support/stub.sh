#!/bin/bash
{{ sbatch_header }}
# Test template: a stand-in HTTP server instead of vLLM; model_path is the stub's script.
{{ preamble }}
exec {{ python }} {{ model_path }} --host {{ bind_host }} --port "$PORT" --model {{ model }}{{ scheduling_args }}
