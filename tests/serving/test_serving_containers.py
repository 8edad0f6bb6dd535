"""The serving images: hadolint-clean, non-root, health-checked, SageMaker-ready, pinned like the repository."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

DOCKERFILES = [
    "containers/serving.Dockerfile",
    "containers/serving-vllm.Dockerfile",
    "containers/serving-cuda.Dockerfile",
]
HADOLINT = Path(sys.executable).with_name("hadolint")


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[re.sub(r"\[.*\]", "", name).lower()] = version
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_clean(dockerfile: str) -> None:
    result = subprocess.run([str(HADOLINT), dockerfile], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_image_contract(dockerfile: str) -> None:
    text = (REPO_ROOT / dockerfile).read_text().replace("\\\n", " ")  # join continuation lines
    base = re.search(r"^FROM (\S+)", text, re.M)
    assert base and re.search(r":v?\d+\.\d+\.\d+", base.group(1)), "base image pinned to an exact release"
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*serving\.healthcheck", text, re.M)
    assert re.search(r"^EXPOSE 8080$", text, re.M)
    assert re.search(r'^ENTRYPOINT \[.*"-m", "serving"\]$', text, re.M)
    assert re.search(r'^CMD \["serve"\]$', text, re.M)  # `docker run <image> serve` is SageMaker's invocation


def test_image_pins_match_the_repository() -> None:
    root = pins(REPO_ROOT / "requirements.txt")
    for name in ("serving/requirements.txt", "serving/requirements-gateway.txt"):
        for package, version in pins(REPO_ROOT / name).items():
            assert root.get(package) == version, (
                f"{name}: {package}=={version} but requirements.txt has {root.get(package)}"
            )
    cpu = (REPO_ROOT / "containers/serving.Dockerfile").read_text()
    assert f"torch=={root['torch']}" in cpu
    assert "torch" not in pins(REPO_ROOT / "serving/requirements-gateway.txt")


def test_docs_list_every_flag_and_metric() -> None:
    """docs/serving.md is the contract the infra and dashboard authors read: keep it complete."""
    from dataclasses import fields

    from serving.config import ServingConfig
    from serving.metrics import Metrics

    docs = (REPO_ROOT / "docs/serving.md").read_text()
    for f in fields(ServingConfig):
        assert f"`--{f.name.replace('_', '-')}`" in docs and f"`SERVING_{f.name.upper()}`" in docs, f.name
    for metric in Metrics().registry.collect():
        name = metric.name + ("_total" if metric.type == "counter" else "")
        assert f"`{name}`" in docs, name


def test_cuda_image_runs_the_builtin_engine_on_the_gpu() -> None:
    """What a builtin-engine stack runs on its GPUs: CUDA torch at the repository's pin, engine and device baked."""
    text = (REPO_ROOT / "containers/serving-cuda.Dockerfile").read_text()
    root = pins(REPO_ROOT / "requirements.txt")
    assert f"torch=={root['torch']}" in text
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu\d+$", text, re.M)
    for env in ("SERVING_ENGINE=builtin", "SERVING_DEVICE=cuda", "NVIDIA_DRIVER_CAPABILITIES=compute,utility"):
        assert env in text
    training = (REPO_ROOT / "containers/training.Dockerfile").read_text()
    index = re.search(r"whl/(cu\d+)", training)
    assert index and f"whl/{index.group(1)}" in text  # one CUDA build of torch across the GPU images
