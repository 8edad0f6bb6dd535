"""Body I/O: the request body read bounded in size and time, parsed as JSON that every later step can handle, and
a non-streaming answer awaited only while its client is still there."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from typing import Any, TypeVar

import anyio
from fastapi import Request

from serving.errors import APIError, bad_request

T = TypeVar("T")


class ClientGoneError(Exception):
    """The client disconnected before its (non-streaming) answer was ready."""


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` (from Content-Length, before reading)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared), limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large(size, limit)
                chunks.append(chunk)
    except TimeoutError as exc:
        raise APIError(408, f"Request body not received within {timeout_s:g}s.", code="request_timeout") from exc
    return b"".join(chunks)


def too_large(size: int, limit: int) -> APIError:
    return APIError(
        413, f"Request body is larger than this server's limit of {limit} bytes (--max-request-bytes).",
        code="request_too_large",
    )  # fmt: skip


def parse_json(data: bytes) -> Any:
    try:
        raw = json.loads(data)
        # a lone surrogate (`"\ud800"`) is valid JSON but no string a tokenizer (or our own JSON output) can encode
        json.dumps(raw, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_request("Request body holds a string with an unpaired surrogate.", code="invalid_json") from exc
    except RecursionError as exc:
        raise bad_request("Request body is nested too deeply.", code="invalid_json") from exc
    except ValueError as exc:
        # JSONDecodeError and UnicodeDecodeError, and the int() limit: a JSON integer of more than
        # sys.get_int_max_str_digits() (4300) digits raises a plain ValueError inside json.loads
        raise bad_request("Request body is not valid JSON (or holds a number too long to read).",
                          code="invalid_json") from exc  # fmt: skip
    return raw


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await work, cancelling it if the client disconnects first (the engine then drops the request)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGoneError()
    finally:
        if not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait({task})
