"""API keys: loaded from a file (a mounted secret), kept only as SHA-256 hashes, compared in constant time.

File format, one key per line (blank lines and comments ignored; a comment is a line starting with `#`, or
`#` after whitespace: a key is everything up to the next whitespace, `#` included):

    <key-id> <key or sha256:<hex>> [rpm=<n>] [tpm=<n>]    # comment

Malformed lines, duplicate ids, duplicate keys, bad digests and plaintext keys shorter than 16 characters are errors
naming the line number and the problem, never any part of the line (a line that failed to parse may hold a key in
any of its columns: a missing id or swapped columns put the key where the id should be). A file with no keys is a
start-up error unless the server runs with --allow-unauthenticated (serving.server.load_keys).

A plaintext key is hashed at load and the plaintext dropped; prefer `sha256:` entries in secrets
(`python -m serving.auth hash <key>` prints one). The key id, never the key, appears in logs and metrics.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from serving.errors import APIError


@dataclass(frozen=True)
class ApiKey:
    """An authenticated caller: its key id (in audit lines and limits) and its per-minute limits."""

    key_id: str
    rpm: int
    tpm: int


ANONYMOUS = "anonymous"
_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
MIN_KEY_CHARS = 16
"""Shortest plaintext key accepted: a short key is guessable, and a short second column usually means swapped columns
(the key in the id's place, where it would be logged on every audit line)."""


class KeyFileError(ValueError):
    """A malformed keys file; the message never contains key material."""


def hash_key(key: str) -> str:
    """The sha256 hex digest a keys file may hold instead of the key itself."""
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """The configured API keys (as sha256 digests); empty when the server runs unauthenticated."""

    def __init__(self, entries: list[tuple[str, ApiKey]], *, deny_all: bool = False) -> None:
        self._entries = entries  # (sha256 hex, key)
        # a reloaded keys file that holds no keys revokes them all: it never turns authentication off
        self._deny_all = deny_all and not entries

    @property
    def enabled(self) -> bool:
        """False when no keys are configured (`--allow-unauthenticated`)."""
        return bool(self._entries) or self._deny_all

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def parse(cls, text: str, default_rpm: int, default_tpm: int) -> KeyStore:
        """Errors name the line and the problem, never the line's text: it may hold a key."""
        entries: list[tuple[str, ApiKey]] = []
        ids: dict[str, int] = {}
        digests: dict[str, int] = {}
        for lineno, raw in enumerate(text.splitlines(), 1):
            parts = raw.split()
            # a comment is a whole line, or the rest of a line after whitespace: `#` inside a key is part of the key
            for i, part in enumerate(parts):
                if part.startswith("#"):
                    parts = parts[:i]
                    break
            if not parts:
                continue
            where = f"line {lineno}"
            if len(parts) < 2:
                raise KeyFileError(f"{where}: expected '<key-id> <key> [rpm=N] [tpm=N]' (line not shown)")
            key_id, secret, *opts = parts
            if not _KEY_ID.fullmatch(key_id):
                raise KeyFileError(f"{where}: the key id must be 1-64 of A-Z a-z 0-9 . _ - (line not shown)")
            if secret.partition("=")[0] in ("rpm", "tpm"):
                raise KeyFileError(f"{where}: no key between the key id and the options (line not shown)")
            if key_id in ids:
                raise KeyFileError(f"{where}: duplicate key id, first on line {ids[key_id]} (line not shown)")
            ids[key_id] = lineno
            limits = {"rpm": default_rpm, "tpm": default_tpm}
            for opt in opts:
                name, _, value = opt.partition("=")
                if name not in limits or not value.isdigit() or int(value) <= 0:
                    raise KeyFileError(f"{where}: options must be rpm=N or tpm=N with N > 0 (line not shown)")
                limits[name] = int(value)
            if secret.startswith("sha256:"):
                digest = secret.removeprefix("sha256:").lower()
                if not _SHA256.fullmatch(digest):
                    raise KeyFileError(f"{where}: a sha256: digest must be 64 hex characters (line not shown)")
            elif len(secret) < MIN_KEY_CHARS:
                raise KeyFileError(
                    f"{where}: the key is shorter than {MIN_KEY_CHARS} characters; use a long random key, and the "
                    "order '<key-id> <key>' (line not shown)"
                )
            else:
                digest = hash_key(secret)
            if digest in digests:
                raise KeyFileError(f"{where}: the same key as line {digests[digest]} (line not shown)")
            digests[digest] = lineno
            entries.append((digest, ApiKey(key_id, limits["rpm"], limits["tpm"])))
        return cls(entries)

    @classmethod
    def from_file(cls, path: str | Path, default_rpm: int, default_tpm: int) -> KeyStore:
        """The keys of a keys file (`KeyFileError` naming the line when it is malformed)."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise KeyFileError("not UTF-8 text") from None
        return cls.parse(text, default_rpm, default_tpm)

    def authenticate(self, token: str | None, default_rpm: int, default_tpm: int) -> ApiKey:
        """The key for a presented token; 401 when missing or unknown (anonymous when auth is disabled)."""
        if not self.enabled:
            return ApiKey(ANONYMOUS, default_rpm, default_tpm)
        if self._deny_all:
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
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


class KeyFile:
    """The keys file as a source that changes: `load` reads it, `changed` tells whether it is no longer what was
    loaded (its modification time, size or inode differ: a Kubernetes Secret volume swaps a symlink to a new file, an
    editor rewrites it in place). Reloading lets a revoked key be refused without a restart (docs/serving.md)."""

    def __init__(self, path: str | Path, default_rpm: int, default_tpm: int) -> None:
        self.path = Path(path)
        self.default_rpm = default_rpm
        self.default_tpm = default_tpm
        self._loaded: tuple[int, int, int] | None = None

    def _stamp(self) -> tuple[int, int, int]:
        st = os.stat(self.path)  # follows the Secret volume's symlinks to the file itself
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def load(self) -> KeyStore:
        """The keys now in the file (OSError or `KeyFileError` when it cannot be read or parsed)."""
        stamp = self._stamp()
        store = KeyStore.from_file(self.path, self.default_rpm, self.default_tpm)
        self._loaded = stamp
        return store

    def changed(self) -> bool:
        """Whether the file differs from the last `load` (False while it is briefly missing mid-swap)."""
        try:
            return self._stamp() != self._loaded
        except OSError:
            return False


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
    """`python -m serving.auth hash <key>`: print the `sha256:<hex>` form for a keys file."""
    if len(argv) != 2 or argv[0] != "hash":
        print("usage: python -m serving.auth hash <key>", file=sys.stderr)
        return 2
    print(f"sha256:{hash_key(argv[1])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
