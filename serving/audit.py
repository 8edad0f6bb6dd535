"""One structured (JSON) audit line per API request on the `serving.audit` logger.

Fields: request id, key id, endpoint, model, status, prompt/completion tokens, latency, time to first token, finish
reason. Never prompt or completion text, never the key itself.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass

log = logging.getLogger("serving.audit")


@dataclass(frozen=True)
class AuditRecord:
    """One audit line per API request: who (key id, never the key), what, and how it ended."""

    request_id: str
    key_id: str
    endpoint: str
    model: str
    status: int
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    ttft_ms: float | None
    stream: bool
    finish_reason: str | None
    error_code: str | None = None


def configure_audit_log() -> None:
    """Audit lines go to stdout as bare JSON (collectors parse them); other logs stay on stderr."""
    if log.handlers:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def write(record: AuditRecord) -> None:
    """Write the record as one JSON line on the audit logger (stdout)."""
    log.info(json.dumps({"event": "request", **asdict(record)}, separators=(",", ":")))
