"""OpenAI-shaped errors: every failure leaves as ``{"error": {"message", "type", "param",
"code"}}`` with the right status — 400 for bad bodies (not FastAPI's 422), never a bare 500.

Messages are written by us and never quote request bodies, so private text submitted in a
request cannot be echoed back through an error.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("dpicl.proxy")


__all__ = [
    "APIError",
    "budget_exceeded",
    "install_error_handlers",
    "internal_error",
    "model_not_found",
    "not_found",
    "storage_unavailable",
    "validation_error",
]


class APIError(Exception):
    """An error the client sees as OpenAI's ``{"error": {...}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def not_found(what: str, ident: str | None = None, param: str | None = None) -> APIError:
    msg = f"No such {what}" + (f": {ident!r}" if ident else "")
    return APIError(404, msg, "invalid_request_error", param, "not_found")


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        "invalid_request_error",
        "model",
        "model_not_found",
    )


def storage_unavailable() -> APIError:
    return APIError(
        503,
        "The budget ledger is unavailable; nothing was charged or generated. Retry later.",
        "service_unavailable",
        None,
        "storage_unavailable",
    )


def budget_exceeded(requested: float, remaining: float, which: str) -> APIError:
    """429 for a job the ledger refused: nothing was charged, and retrying cannot help
    (budget is never refunded), so the OpenAI client is told not to retry."""
    return APIError(
        429,
        f"Privacy budget exceeded ({which} budget): requested ε={requested:.4g}, "
        f"largest admissible ε for a job of this shape={remaining:.4g}. "
        "Privacy budget is never refunded.",
        "privacy_budget_exceeded",
        "epsilon",
        "privacy_budget_exceeded",
        headers={"x-should-retry": "false"},
    )


def internal_error() -> APIError:
    """500 for anything unexpected; the exception's text is never returned."""
    return APIError(500, "Internal server error.", "api_error", None, None)


_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


_LIMIT_KINDS = frozenset({"less_than", "less_than_equal", "too_long", "limit_exceeded"})
"""pydantic error types of a value over a bound (the API's ceilings, proxy.limits.CEILINGS)."""


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str | None]:
    """(message, param, code) of the first validation error."""
    errs = exc.errors()
    if not errs:
        return "Invalid request body.", None, None
    first = errs[0]
    loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path")]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "missing":
        return f"Missing required parameter: '{param}'.", param, None
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param, None
    if kind in ("json_invalid", "model_attributes_type", "dict_type") and not param:
        return "The request body must be a JSON object.", None, None
    # pydantic's own message describes the constraint, not the submitted value
    code = "limit_exceeded" if kind in _LIMIT_KINDS else None
    return f"Invalid value for '{param}': {first.get('msg', 'invalid')}.", param, code


def validation_error(exc: RequestValidationError) -> APIError:
    """400 (not FastAPI's 422) for a body that fails its schema."""
    message, param, code = _validation_message(exc)
    return APIError(400, message, "invalid_request_error", param, code)


def install_error_handlers(app: FastAPI) -> None:
    """Every failure leaves OpenAI-shaped: our errors, body validation (400, not 422),
    Starlette's 404/405 and anything unexpected (500, its text never logged or returned)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        message = exc.detail if isinstance(exc.detail, str) else "Request failed."
        if status == 404 and message == "Not Found":
            message = f"Unknown URL: {request.method} {request.url.path}"
        if status == 405:
            message = f"Method {request.method} not allowed on {request.url.path}"
        err = APIError(status, message, _STATUS_TYPES.get(status, "api_error"))
        return err.response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # the exception's text is not logged: it might quote private data
        log.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path)
        return internal_error().response()
