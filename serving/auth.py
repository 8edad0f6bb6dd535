"""API keys: loaded from a file (a mounted secret), kept only as SHA-256 hashes, compared in constant time.

File format, one key per line (`#` comments and blank lines ignored):

    <key-id> <key or sha256:<hex>> [rpm=<n>] [tpm=<n>]

A plaintext key is hashed at load and the plaintext dropped; prefer `sha256:` entries in secrets
(`python -m serving.auth hash <key>` prints one). The key id, never the key, appears in logs and metrics.
"""

from __future__ import annotations

import hashlib
import hmac
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from serving.errors import APIError


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    rpm: int
    tpm: int


ANONYMOUS = "anonymous"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    def __init__(self, entries: list[tuple[str, ApiKey]]) -> None:
        self._entries = entries  # (sha256 hex, key)

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def parse(cls, text: str, default_rpm: int, default_tpm: int) -> KeyStore:
        entries: list[tuple[str, ApiKey]] = []
        ids: set[str] = set()
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) < 2:
                raise ValueError(f"api keys line {lineno}: expected '<key-id> <key> [rpm=N] [tpm=N]'")
            key_id, secret, *opts = parts
            if key_id in ids:
                raise ValueError(f"api keys line {lineno}: duplicate key id {key_id!r}")
            ids.add(key_id)
            limits = {"rpm": default_rpm, "tpm": default_tpm}
            for opt in opts:
                name, _, value = opt.partition("=")
                if name not in limits or not value.isdigit() or int(value) <= 0:
                    raise ValueError(f"api keys line {lineno}: bad option {opt!r} (rpm=N or tpm=N)")
                limits[name] = int(value)
            digest = secret.removeprefix("sha256:").lower() if secret.startswith("sha256:") else hash_key(secret)
            if len(digest) != 64:
                raise ValueError(f"api keys line {lineno}: sha256 digest must be 64 hex characters")
            entries.append((digest, ApiKey(key_id, limits["rpm"], limits["tpm"])))
        return cls(entries)

    @classmethod
    def from_file(cls, path: str | Path, default_rpm: int, default_tpm: int) -> KeyStore:
        return cls.parse(Path(path).read_text(), default_rpm, default_tpm)

    def authenticate(self, token: str | None, default_rpm: int, default_tpm: int) -> ApiKey:
        """The key for a presented token; 401 when missing or unknown (anonymous when auth is disabled)."""
        if not self.enabled:
            return ApiKey(ANONYMOUS, default_rpm, default_tpm)
        if not token:
            raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key")
        digest = hash_key(token)
        found: ApiKey | None = None
        # compare against every entry so the time taken does not depend on which (if any) key matched
        for stored, key in self._entries:
            if hmac.compare_digest(stored, digest):
                found = key
        if found is None:
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return found


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key from `Authorization: Bearer <key>`, or from SageMaker custom attributes (`api_key=<key>`).

    SageMaker's runtime signs requests with SigV4 (its own Authorization header) and forwards
    `CustomAttributes` to the container as `X-Amzn-SageMaker-Custom-Attributes`: that is how a per-tenant key
    reaches an endpoint behind IAM.
    """
    for attr in headers.get("x-amzn-sagemaker-custom-attributes", "").split(";"):
        name, _, value = attr.strip().partition("=")
        if name == "api_key" and value:
            return value
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "hash":
        print("usage: python -m serving.auth hash <key>", file=sys.stderr)
        return 2
    print(f"sha256:{hash_key(argv[1])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
