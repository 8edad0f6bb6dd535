"""Serving a model from S3 (a real moto server): downloaded to a cache, then loaded like a local directory."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import openai
import pytest

from serving.config import ConfigError, load_config
from serving.model_source import MANIFEST
from tests.helpers import REPO_ROOT
from tests.serving.conftest import ServerFactory


def test_serves_a_model_downloaded_from_s3(
    aws_env: str, start_server: ServerFactory, debug_model_dir: Path, tmp_path: Path
) -> None:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="serving-models")
    for f in debug_model_dir.iterdir():
        s3.upload_file(str(f), "serving-models", f"models/debug/{f.name}")
    server = start_server(
        "--model", "s3://serving-models/models/debug", "--model-cache-dir", str(tmp_path / "cache"),
        "--allow-unauthenticated",
    )  # fmt: skip
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["debug"]
    r = client.completions.create(model="debug", prompt="from s3", max_tokens=3)
    assert r.usage is not None and r.usage.completion_tokens >= 1
    cached = next((tmp_path / "cache").iterdir())
    assert (cached / MANIFEST).is_file() and (cached / "config.json").is_file()


def test_config_from_env_and_flags() -> None:
    env = {"SERVING_MODEL": "/models/m", "SERVING_PORT": "9000", "SERVING_MAX_QUEUE": "7"}
    cfg = load_config([], env)
    assert (cfg.model, cfg.port, cfg.max_queue, cfg.model_id) == ("/models/m", 9000, 7, "m")
    assert load_config(["--port", "8081"], env).port == 8081  # flags win
    with pytest.raises(ConfigError):
        load_config([], {"SERVING_PORT": "9000"})  # neither model nor upstream
    with pytest.raises(ConfigError):
        load_config([], {**env, "SERVING_MAX_QUEUE": "lots"})


def test_gateway_path_does_not_import_torch() -> None:
    """The GPU image's gateway runs beside vLLM's stack without depending on its torch: keep torch out of it."""
    import subprocess
    import sys

    code = (
        "import sys, serving.server, serving.app, serving.backends.upstream, serving.__main__; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


def test_sagemaker_serve_argument_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    import serving.__main__ as entry

    seen: list[object] = []
    monkeypatch.setattr(entry, "run", lambda cfg: seen.append(cfg) or 0)
    monkeypatch.setenv("SERVING_MODEL", "/opt/ml/model")
    assert entry.main(["serve"]) == 0
    assert seen[0].port == 8080  # type: ignore[attr-defined]


def test_listening_socket_is_tcp_so_connections_get_nodelay() -> None:
    """asyncio sets TCP_NODELAY on accepted connections only for IPPROTO_TCP sockets; without it every response on a
    keep-alive connection waited ~40 ms for a delayed ACK (measured before this fix)."""
    import socket

    from serving.server import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


# -- the S3 model cache: completeness recorded locally, in a private directory ----------------------------------------


def _upload_model(s3, bucket: str, prefix: str, model_dir: Path) -> None:
    s3.create_bucket(Bucket=bucket)
    for f in model_dir.iterdir():
        s3.upload_file(str(f), bucket, f"{prefix}/{f.name}")


def test_cache_ignores_markers_from_s3_and_dot_keys(aws_env: str, debug_model_dir: Path, tmp_path: Path) -> None:
    from serving.model_source import download_s3_prefix

    s3 = boto3.client("s3")
    _upload_model(s3, "cache-markers", "m", debug_model_dir)
    s3.put_object(Bucket="cache-markers", Key="m/.complete", Body=b"planted")
    s3.put_object(Bucket="cache-markers", Key=f"m/{MANIFEST}", Body=b'{"config.json": "forged"}')
    s3.put_object(Bucket="cache-markers", Key="m/.", Body=b"not a file at the cache path")
    target = download_s3_prefix("s3://cache-markers/m", tmp_path / "cache")
    assert target.is_dir() and (target / "config.json").is_file()
    manifest = json.loads((target / MANIFEST).read_text())
    assert (
        "config.json" in manifest
        and manifest["config.json"]["size"] == (debug_model_dir / "config.json").stat().st_size
    )
    assert "." not in manifest and MANIFEST not in manifest
    assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o700


def test_cache_redownloads_what_the_local_manifest_does_not_vouch_for(
    aws_env: str, debug_model_dir: Path, tmp_path: Path
) -> None:
    from serving.model_source import download_s3_prefix

    s3 = boto3.client("s3")
    _upload_model(s3, "cache-partial", "m", debug_model_dir)
    target = download_s3_prefix("s3://cache-partial/m", tmp_path / "cache")
    # a pod killed mid-download: a truncated file and no manifest
    (target / MANIFEST).unlink()
    (target / "config.json").write_text("{")
    download_s3_prefix("s3://cache-partial/m", tmp_path / "cache")
    assert (target / "config.json").read_bytes() == (debug_model_dir / "config.json").read_bytes()
    # the model changed in S3 under the same prefix (same size, new ETag): the cached copy is replaced
    original = (debug_model_dir / "config.json").read_text()
    changed = original[:-1] + ("x" if original[-1] != "x" else "y")  # same size, other bytes: a new ETag
    s3.put_object(Bucket="cache-partial", Key="m/config.json", Body=changed.encode())
    download_s3_prefix("s3://cache-partial/m", tmp_path / "cache")
    assert (target / "config.json").read_text() == changed


def test_cache_directory_must_be_private(tmp_path: Path) -> None:
    from serving.model_source import default_cache_dir, private_dir

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ValueError, match="writable by others"):
        private_dir(shared)
    assert not str(default_cache_dir()).startswith("/tmp")
    created = private_dir(tmp_path / "new" / "cache")
    assert created.stat().st_mode & 0o777 == 0o700


def test_config_switch_parses_flags_and_env() -> None:
    env = {"SERVING_MODEL": "/models/m"}
    assert load_config([], env).allow_unauthenticated is False
    assert load_config(["--allow-unauthenticated"], env).allow_unauthenticated is True
    assert load_config([], {**env, "SERVING_ALLOW_UNAUTHENTICATED": "true"}).allow_unauthenticated is True
    assert load_config([], {**env, "SERVING_ALLOW_UNAUTHENTICATED": "0"}).allow_unauthenticated is False
    with pytest.raises(ConfigError):
        load_config([], {**env, "SERVING_ALLOW_UNAUTHENTICATED": "maybe"})
