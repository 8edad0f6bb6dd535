"""Per-key requests-per-minute and tokens-per-minute limits over a sliding 60 s window.

A request is counted against RPM when it is admitted (before its body is read or validated, so invalid requests are
limited too) and refunded if the server sheds it with 503 (a client obeying `Retry-After` must not lock itself out).

Tokens are reserved, not charged after the fact: once the engine knows the prompt length, the request reserves
prompt + max_tokens, and is refused (429) if that does not fit next to what the key used in the window plus what its
other in-flight requests reserved. At the end the reservation is replaced by the tokens really used. So concurrent
requests cannot overshoot the budget: at most `tpm` tokens per key per window, in flight included.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from serving.auth import ApiKey
from serving.errors import APIError

WINDOW_S = 60.0


class _Window:
    def __init__(self) -> None:
        self.requests: collections.deque[float] = collections.deque()
        self.tokens: collections.deque[tuple[float, int]] = collections.deque()
        self.token_sum = 0
        self.reserved = 0  # tokens reserved by this key's in-flight requests

    def expire(self, now: float) -> None:
        while self.requests and self.requests[0] <= now - WINDOW_S:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= now - WINDOW_S:
            self.token_sum -= self.tokens.popleft()[1]


@dataclass
class Admission:
    """One admitted request: its RPM slot and its token reservation, until `settle`."""

    key: ApiKey
    at: float
    reserved: int = 0
    settled: bool = False


class RateLimiter:
    """Per-key RPM and TPM over a sliding window; thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._windows: dict[str, _Window] = collections.defaultdict(_Window)
        self._lock = threading.Lock()

    def admit(self, key: ApiKey) -> Admission:
        """Count one request for the key, or raise 429 with Retry-After."""
        now = self._clock()
        with self._lock:
            w = self._windows[key.key_id]
            w.expire(now)
            if len(w.requests) >= key.rpm:
                retry = w.requests[0] + WINDOW_S - now
                raise APIError(
                    429,
                    f"Rate limit reached: {key.rpm} requests per minute for this key.",
                    code="rate_limit_exceeded",
                    retry_after=retry,
                )
            if w.token_sum + w.reserved >= key.tpm:
                raise self._tpm_error(w, key, 0, now)
            w.requests.append(now)
        return Admission(key, now)

    def reserve(self, admission: Admission, tokens: int) -> None:
        """Reserve the most tokens this request can use, or raise 429 when they do not fit the key's budget now."""
        key = admission.key
        if tokens > key.tpm:
            raise APIError(
                429,
                f"Request too large: it may use {tokens} tokens (prompt + max_tokens), more than this key's limit of "
                f"{key.tpm} tokens per minute. Lower max_tokens or shorten the prompt.",
                code="request_too_large",
                param="max_tokens",
            )
        now = self._clock()
        with self._lock:
            w = self._windows[key.key_id]
            w.expire(now)
            if w.token_sum + w.reserved + tokens > key.tpm:
                raise self._tpm_error(w, key, tokens, now)
            w.reserved += tokens
            admission.reserved += tokens

    def settle(self, admission: Admission, used_tokens: int, *, refund_request: bool = False) -> None:
        """The request ended: release its reservation and charge what it really used (once; later calls no-op).

        `refund_request` gives back its RPM slot too (the server shed it: it did no work)."""
        if admission.settled:
            return
        admission.settled = True
        now = self._clock()
        with self._lock:
            w = self._windows[admission.key.key_id]
            w.reserved -= admission.reserved
            if refund_request:
                with contextlib.suppress(ValueError):  # ValueError: already expired from the window
                    w.requests.remove(admission.at)
            if used_tokens > 0:
                w.tokens.append((now, used_tokens))
                w.token_sum += used_tokens

    def _tpm_error(self, w: _Window, key: ApiKey, tokens: int, now: float) -> APIError:
        # when the window's own usage frees enough; in-flight reservations free sooner, so at least 1 s
        retry = max(1.0, self._tokens_free_at(w, key.tpm - w.reserved - tokens) - now) if w.tokens else 1.0
        return APIError(
            429,
            f"Rate limit reached: {key.tpm} tokens per minute for this key "
            f"({w.token_sum} used in the last minute, {w.reserved} reserved by requests in flight).",
            code="tokens_rate_limit_exceeded",
            retry_after=retry,
        )

    @staticmethod
    def _tokens_free_at(w: _Window, budget: int) -> float:
        """When the window's charged tokens drop to `budget` or below (the last entry's expiry if never)."""
        remaining = w.token_sum
        for at, n in w.tokens:
            remaining -= n
            if remaining <= budget:
                return at + WINDOW_S
        return w.tokens[-1][0] + WINDOW_S
