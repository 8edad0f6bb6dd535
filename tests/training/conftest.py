"""Fixtures for the training tests (helpers live in train_helpers.py, a module name no other area uses)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

# The suite runs with --import-mode=importlib, which does not put test directories on sys.path; the test modules
# import their shared helpers as `train_helpers`, so make this directory importable once, here.
sys.path.insert(0, str(Path(__file__).resolve().parent))

SENTENCES = [
    "the quick brown fox jumps over the lazy dog.",
    "a checkpoint is complete when the marker is written.",
    "every rank reads its own share of the data.",
]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repetitive corpus: a model that learns anything drives the loss down fast on it."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n\n".join(rng.choice(SENTENCES) for _ in range(600)), encoding="utf-8")
    return path
