"""The training image: hadolint-clean, non-root, SageMaker `train` entry point, pins that match requirements.txt."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import CONTAINERS_DIR, REPO_ROOT

DOCKERFILE = CONTAINERS_DIR / "training.Dockerfile"
HADOLINT = Path(sys.executable).with_name("hadolint")


def test_dockerfile_passes_hadolint() -> None:
    proc = subprocess.run([str(HADOLINT), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_is_pinned_non_root_and_has_the_sagemaker_entry_point() -> None:
    text = DOCKERFILE.read_text()
    base = re.search(r"^FROM (\S+)", text, re.M)
    assert base and re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", base.group(1))
    assert re.search(r"^USER 1000:1000$", text, re.M)
    assert "/usr/local/bin/train" in text and "training.sagemaker_entry" in text
    assert re.search(r'^CMD \["train"\]$', text, re.M)


def test_dockerfile_pins_match_requirements() -> None:
    """The image and the CPU test stack run the same versions: what passes here is what ships."""
    requirements = dict(
        line.split("==", 1)
        for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    pins = dict(re.findall(r"\b([A-Za-z][\w.-]*)==([\w.+-]+)", DOCKERFILE.read_text()))
    assert "torch" in pins and "transformers" in pins
    for name, version in pins.items():
        assert requirements.get(name) == version, (
            f"{name}=={version} in the Dockerfile, {requirements.get(name)} in requirements.txt"
        )
