"""What many test modules share: the repository's paths. Fixtures live in the conftest.py files beside the tests."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
