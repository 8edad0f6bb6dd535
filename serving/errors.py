"""Every error leaves the service as an OpenAI error body, mapped here and only here.

`{"error": {"message", "type", "param", "code"}}` with the HTTP status OpenAI uses: 400 bad request, 401 bad key,
404 unknown model, 429 rate limit, 503 overloaded / draining, 502 upstream unreachable.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("serving.errors")

_BRANCH_TAG = re.compile(r"str|int|float|bool|none|dict|list|.*\[.*\]")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "overloaded_error",
}


class APIError(Exception):
    """An error answered in OpenAI's error format, with its HTTP status (and `Retry-After` when given)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
        type_: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after
        self.type = type_ or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, object]:
        """The OpenAI error body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        """`Retry-After` (whole seconds, at least 1) when the client should retry."""
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after + 0.499)))}

    def response(self) -> JSONResponse:
        """The error as a JSON response."""
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers())


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 `invalid_request_error`."""
    return APIError(400, message, param=param, code=code)


def from_validation_error(exc: RequestValidationError | ValidationError) -> APIError:
    """The first validation problem as a 400 naming the offending parameter.

    Only the first error is read, without its input: `ValidationError.errors()` builds every error with a copy of
    the offending input, which for a body of a million bad list items took seconds on the event loop."""
    if isinstance(exc, ValidationError):
        errors = exc.errors(include_input=False, include_url=False) if exc.error_count() else []
    else:
        errors = list(exc.errors()[:1])
    # a union (`str | list[str]`) reports each branch: the branch of the wrong type is not the client's problem
    fitting = [e for e in errors if not str(e.get("type", "")).endswith("_type")]
    first: Mapping[str, Any] = (fitting or errors or [{}])[0]
    if first.get("type") == "json_invalid":
        return bad_request("Request body is not valid JSON.", code="invalid_json")
    if first.get("type") == "unsupported_parameter":
        ctx = first.get("ctx") or {}
        return bad_request(str(first.get("msg")), param=ctx.get("param"), code="unsupported_parameter")
    # without the union branch tags pydantic puts in `loc` (`stop.list[str]` is the parameter `stop`)
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _BRANCH_TAG.fullmatch(str(p))]
    param = ".".join(loc) or (first.get("ctx") or {}).get("param")  # a whole-body rule names its field in ctx
    return bad_request(
        f"Invalid request: {param or 'body'}: {first.get('msg', 'invalid value')}",
        param=param,
        code=_validation_code(str(first.get("type", "")), param),
    )


def _validation_code(kind: str, param: str | None) -> str:
    """OpenAI's codes for a bad parameter (`missing_required_parameter`, `invalid_type`, `invalid_value`); a body
    that is not an object at all is `invalid_request`."""
    if param is None:
        return "invalid_request"
    if kind == "missing":
        return "missing_required_parameter"
    return "invalid_type" if kind.endswith(("_type", "_parsing")) else "invalid_value"


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error, FastAPI's and unexpected ones included, in OpenAI's error format."""

    async def on_api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return exc.response()

    async def on_validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return from_validation_error(exc).response()

    async def on_http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        response = APIError(exc.status_code, str(exc.detail)).response()
        response.headers.update(exc.headers or {})  # e.g. `Allow` on 405 (RFC 9110 section 15.5.6: MUST)
        return response

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return APIError(500, "Internal server error.", type_="server_error").response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
