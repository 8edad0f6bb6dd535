"""Per-key requests-per-minute and tokens-per-minute limits over a sliding 60 s window.

A request is admitted when the key is under both limits; its tokens (prompt + completion) are charged when it ends,
so one large request can overshoot the TPM budget once, and the next requests wait for the window to slide.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

from serving.auth import ApiKey
from serving.errors import APIError

WINDOW_S = 60.0


class _Window:
    def __init__(self) -> None:
        self.requests: collections.deque[float] = collections.deque()
        self.tokens: collections.deque[tuple[float, int]] = collections.deque()
        self.token_sum = 0

    def expire(self, now: float) -> None:
        while self.requests and self.requests[0] <= now - WINDOW_S:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= now - WINDOW_S:
            self.token_sum -= self.tokens.popleft()[1]


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._windows: dict[str, _Window] = collections.defaultdict(_Window)
        self._lock = threading.Lock()

    def admit(self, key: ApiKey) -> None:
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
            if w.token_sum >= key.tpm:
                retry = self._tokens_free_at(w, key.tpm) - now
                raise APIError(
                    429,
                    f"Rate limit reached: {key.tpm} tokens per minute for this key.",
                    code="tokens_rate_limit_exceeded",
                    retry_after=retry,
                )
            w.requests.append(now)

    def charge(self, key: ApiKey, tokens: int) -> None:
        if tokens <= 0:
            return
        with self._lock:
            w = self._windows[key.key_id]
            w.tokens.append((self._clock(), tokens))
            w.token_sum += tokens

    @staticmethod
    def _tokens_free_at(w: _Window, tpm: int) -> float:
        remaining = w.token_sum
        for at, n in w.tokens:
            remaining -= n
            if remaining < tpm:
                return at + WINDOW_S
        return w.tokens[-1][0] + WINDOW_S
