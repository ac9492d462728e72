"""JSON errors for every failure a client can see: {"error": {"code", "message", "field"}}."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Awaitable, Callable

from aiohttp import web

from chat_pipeline.errors import DEPENDENCY_ERRORS

__all__ = ["DEPENDENCY_ERRORS", "ApiError", "describe_without_text", "error_middleware"]


log = logging.getLogger("gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers

    def response(self) -> web.Response:
        body = {"error": {"code": self.code, "message": self.message, "field": self.field}}
        return web.json_response(body, status=self.status, headers=self.headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.content_type != "application/json":
            code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
                exc.status, "http_error"
            )
            return ApiError(exc.status, code, exc.reason).response()
        raise
    except DEPENDENCY_ERRORS as exc:
        log.warning(
            "%s %s: a dependency is unavailable (%s)", request.method, request.path,
            type(exc).__name__,
        )  # fmt: skip
        return ApiError(
            503,
            "unavailable",
            "the service is briefly unavailable; retry shortly",
            headers={"Retry-After": "2"},
        ).response()
    except Exception as exc:
        # Never a traceback to the client. The error log says which exceptions were raised
        # where, not what they say: drivers' and validators' messages quote the input (a
        # visitor's text). The whole exception is logged at debug level only.
        log.error(
            "unhandled error on %s %s\n%s", request.method, request.path, describe_without_text(exc)
        )
        log.debug("unhandled error on %s %s", request.method, request.path, exc_info=True)
        return ApiError(500, "internal", "internal error").response()


def describe_without_text(exc: BaseException) -> str:
    """A traceback of ``exc`` and the exceptions it was raised from, with their types and
    frames (source lines) but without their messages."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or (
            None if current.__suppress_context__ else current.__context__
        )
    parts = []
    for i, item in enumerate(reversed(chain)):
        if i:
            parts.append("raised while handling the above:\n")
        parts.append("Traceback (most recent call last):\n")
        parts.extend(traceback.format_tb(item.__traceback__))
        kind = type(item)
        parts.append(f"{kind.__module__}.{kind.__qualname__} (message not logged)\n")
    return "".join(parts).rstrip("\n")
